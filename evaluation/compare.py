"""Do two stage 4 runs differ by more than their noise?

    python -m evaluation.compare outputs/eval_a/report.json outputs/eval_b/report.json
    python stage4_evaluate.py ... --compare_to outputs/eval_a/report.json

Prints each headline metric of both runs with its 95 % interval and "differs" when the intervals are
disjoint, "within noise" when they overlap (a conservative rule: overlapping intervals can still hide a
small real difference, but disjoint ones are not noise).
"""
import argparse
import json
from pathlib import Path

from common.errors import PipelineError, cli_entry
from evaluation.intervals import overlap

# (label, path of the value in report.json, path of its interval)
HEADLINE = (
    ("identity: generated top-1", ("identity", "generated_top1"), ("identity", "generated_top1_ci")),
    ("identity: real val top-1 (ceiling)", ("identity", "real_val_top1"), ("identity", "real_val_top1_ci")),
    ("identity: generated / ceiling", ("identity", "relative_to_ceiling"), ("identity", "relative_to_ceiling_ci")),
    ("identity: tokenizer reconstructions top-1", ("identity", "tokenizer_reconstructions", "top1"),
     ("identity", "tokenizer_reconstructions", "top1_ci")),
    ("identity: real val top-1 over classifier seeds", ("classifier", "real_val_top1_over_seeds", "top1"),
     ("classifier", "real_val_top1_over_seeds", "top1_ci")),
    ("TSTR top-1", ("tstr", "top1"), ("tstr", "top1_ci")),
    ("augmentation gain (generated - classical)", ("augmentation", "gain"), ("augmentation", "gain_ci")),
    ("augmentation gain, low data (generated - classical)",
     ("augmentation", "regimes", "low_data", "comparisons", "generated-classical", "mean"),
     ("augmentation", "regimes", "low_data", "comparisons", "generated-classical", "ci")),
)


def _get(report: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def load_report(path: str | Path) -> dict:
    """A stage 4 report.json; raises PipelineError when it is missing or not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: give a stage 4 report.json (or its folder).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} is not a stage 4 report.json ({err}).") from None
    if not isinstance(report, dict) or "identity" not in report:
        raise PipelineError(f"{path} is not a stage 4 report.json (no identity block).")
    return report


def verdict(a_ci: list[float] | None, b_ci: list[float] | None) -> str:
    """'within noise' when the two 95 % intervals overlap, 'differs' when they are disjoint, else 'no interval'."""
    shared = overlap(tuple(a_ci) if a_ci else None, tuple(b_ci) if b_ci else None)
    return "no interval" if shared is None else "within noise" if shared else "differs"


def compare(a: dict, b: dict) -> list[dict]:
    """One row per headline metric that either report has: label, both values and intervals, the verdict."""
    rows = []
    for label, value_path, ci_path in HEADLINE:
        va, vb = _get(a, value_path), _get(b, value_path)
        if va is None and vb is None:
            continue
        ca, cb = _get(a, ci_path), _get(b, ci_path)
        rows.append({"metric": label, "a": va, "a_ci": ca, "b": vb, "b_ci": cb, "verdict": verdict(ca, cb)})
    return rows


def _cell(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def render(rows: list[dict], name_a: str, name_b: str) -> str:
    """A plain-text table of compare()'s rows."""
    table = [("metric (95 % interval)", name_a, name_b, "")]
    table += [(r["metric"], _cell(r["a"], r["a_ci"]), _cell(r["b"], r["b_ci"]), r["verdict"]) for r in rows]
    widths = [max(len(row[j]) for row in table) for j in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="first report.json (or its folder)")
    parser.add_argument("b", help="second report.json (or its folder)")
    args = parser.parse_args(argv)
    print(render(compare(load_report(args.a), load_report(args.b)), str(args.a), str(args.b)))
    return 0


if __name__ == "__main__":
    main()
