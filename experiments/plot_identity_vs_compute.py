"""Plot stage 4's headline numbers against training steps from experiments/identity_vs_compute.sh's output:
identity (with the real-val ceiling and the tokenizer-reconstruction ceiling as lines), classifier FD,
precision/recall, TSTR and copy rate. Writes OUT/identity_vs_compute.png and OUT/curve.json.

    python experiments/plot_identity_vs_compute.py --run_dir /tmp/identity_vs_compute [--steps_per_multiple 1400]
"""
import argparse
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def headline(report: dict) -> dict:
    """The numbers the curve follows, from one stage 4 report.json."""
    identity = report["identity"]
    return {"identity": identity["generated_top1"], "ceiling_real_val": identity["real_val_top1"],
            "ceiling_tokenizer": (identity.get("tokenizer_reconstructions") or {}).get("top1"),
            "fd_classifier": report["fd"]["classifier"], "precision": report["manifold"]["generated"]["precision"],
            "recall": report["manifold"]["generated"]["recall"], "tstr_top1": report["tstr_top1"],
            "copy_rate": report["memorization"]["copy_rate"],
            "augmentation_gain": report["augmentation"]["gain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--steps_per_multiple", type=int, default=1400)
    args = parser.parse_args()
    run = Path(args.run_dir)
    rows = []
    for report in sorted(run.glob("eval_*x/report.json"), key=lambda p: int(p.parent.name[5:-1])):
        multiple = int(report.parent.name[5:-1])
        rows.append({"multiple": multiple, "steps": multiple * args.steps_per_multiple,
                     **headline(json.loads(report.read_text()))})
    if not rows:
        raise SystemExit(f"no eval_*x/report.json under {run}")
    (run / "curve.json").write_text(json.dumps(rows, indent=1))
    steps = [r["steps"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    ax.plot(steps, [r["identity"] for r in rows], "o-", label="generated")
    ax.plot(steps, [r["ceiling_real_val"] for r in rows], "k--", label="real val (ceiling)")
    if rows[0]["ceiling_tokenizer"] is not None:
        ax.plot(steps, [r["ceiling_tokenizer"] for r in rows], "k:", label="tokenizer reconstructions")
    ax.plot(steps, [r["tstr_top1"] for r in rows], "s-", label="TSTR top-1")
    ax.set_ylabel("top-1 on real-person classifier"), ax.set_ylim(0, 1), ax.legend(fontsize=8)
    axes[1].plot(steps, [r["fd_classifier"] for r in rows], "o-")
    axes[1].set_ylabel("classifier FD to real train")
    axes[2].plot(steps, [r["precision"] for r in rows], "o-", label="precision")
    axes[2].plot(steps, [r["recall"] for r in rows], "s-", label="recall")
    axes[2].plot(steps, [r["copy_rate"] for r in rows], "^-", label="copy rate")
    axes[2].set_ylim(0, 1.05), axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2), ax.set_xlabel("training steps"), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "identity_vs_compute.png", dpi=110)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
