"""Summarise the runs of experiments/identity_levers.sh: one row per run, then one per lever (mean over seeds, and
whether it beats the baseline's seeds beyond their spread).

    python experiments/summarise_levers.py /tmp/identity_levers [--json experiments/results/identity_levers.json]

A lever "beats" the baseline when its worst seed's identity lies above the baseline's best seed's and its mean
TSTR is not below the baseline's lowest seed (identity up without TSTR falling, as issue 24 asks); each run's own
95% interval is printed beside it.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.compare import load_report  # noqa: E402


def run_row(folder: Path) -> dict | None:
    """The headline numbers of one run folder (None while it has no report)."""
    report_path, setup_path = folder / "eval" / "report.json", folder / "setup.json"
    if not report_path.is_file() or not setup_path.is_file():
        return None
    report, setup = load_report(report_path), json.loads(setup_path.read_text())
    trained = folder.parent / f"{setup['trained_as']}_s{setup['seed']}_{setup['steps_x']}x"
    seconds = trained / "stage2_seconds.txt"
    identity, tstr = report["identity"], report.get("tstr", {})
    return {"run": folder.name, **setup,
            "identity": identity["generated_top1"], "identity_ci": identity.get("generated_top1_ci"),
            "ceiling": identity["real_val_top1"], "relative_to_ceiling": identity.get("relative_to_ceiling"),
            "tstr": tstr.get("top1"), "tstr_ci": tstr.get("top1_ci"),
            "fd_classifier": report["fd"]["classifier"], "copy_rate": report["memorization"]["copy_rate"],
            "precision": report["manifold"]["generated"].get("precision"),
            "recall": report["manifold"]["generated"].get("recall"),
            "augmentation_gain": report.get("augmentation", {}).get("gain"),
            "stage2_seconds": int(seconds.read_text()) if seconds.is_file() else None}


def lever_rows(rows: list[dict], baseline: str = "baseline") -> list[dict]:
    """Per (lever, steps multiple): the mean and spread over seeds, and the verdict against the baseline."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["name"], row["steps_x"]), []).append(row)
    out = []
    for (name, steps_x), runs in sorted(groups.items()):
        base = groups.get((baseline, steps_x), [])
        ids, tstrs = [r["identity"] for r in runs], [r["tstr"] for r in runs if r["tstr"] is not None]
        row = {"lever": name, "steps_x": steps_x, "seeds": len(runs), "identity_mean": statistics.mean(ids),
               "identity_range": [min(ids), max(ids)], "tstr_mean": statistics.mean(tstrs) if tstrs else None,
               "relative_to_ceiling_mean": statistics.mean(r["relative_to_ceiling"] for r in runs),
               "fd_classifier_mean": statistics.mean(r["fd_classifier"] for r in runs)}
        if name != baseline and len(base) >= 2 and len(runs) >= 2:
            base_ids, base_tstr = [r["identity"] for r in base], [r["tstr"] for r in base]
            row["beats_baseline"] = min(ids) > max(base_ids) and (row["tstr_mean"] or 0) >= min(base_tstr)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="OUT of experiments/identity_levers.sh")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = [r for d in sorted(Path(args.folder).iterdir()) if d.is_dir() and (r := run_row(d))]
    print(f"{'run':<28}{'identity [95%]':<24}{'/ceiling':>9}{'TSTR':>7}{'FD':>8}{'copies':>8}{'stage 2 s':>10}")
    for r in rows:
        ci = r["identity_ci"] or [float("nan")] * 2
        print(f"{r['run']:<28}{r['identity']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]{'':<9}{r['relative_to_ceiling']:>9.2f}"
              f"{r['tstr']:>7.2f}{r['fd_classifier']:>8.1f}{r['copy_rate']:>8.2f}{r['stage2_seconds'] or 0:>10}")
    levers = lever_rows(rows)
    print()
    for lever in levers:
        print(f"{lever['lever']:<16}{lever['steps_x']}x  seeds {lever['seeds']}  identity {lever['identity_mean']:.2f} "
              f"(seeds {lever['identity_range'][0]:.2f}-{lever['identity_range'][1]:.2f})  TSTR "
              f"{lever['tstr_mean']:.2f}  FD {lever['fd_classifier_mean']:.1f}"
              + (f"  beats baseline: {lever['beats_baseline']}" if "beats_baseline" in lever else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "levers": levers}, indent=1) + "\n")


if __name__ == "__main__":
    main()
