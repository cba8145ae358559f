"""How each stage's time and memory grow with images and people, up to the seed's scale (31 people x 150 train
images), on this machine (docs/performance.md, "The seed's scale").

The simulated people of the demo (data/simulate.py) are written once at the largest scale; each smaller scale is
the first people and the first images of each (symlinks), so that every scale holds the same images. At each
scale the stages run as run_complete_pipeline.py runs them, as child processes with configs/demo.yaml's model
and precision, at a short training length (--max_epochs, default 2: stage 2's time per step, not its quality, is
the question) and a few samples per person. For each stage it records the wall seconds and the peak memory of its process
tree, sampled every 0.25 s by psutil as the sum of each process's proportional set size (PSS: a page shared by k
processes counts 1/k in each, so that the image-decoding workers, which share torch with their parent, are not
counted twice), then writes one JSON (results) and a plot.

    python experiments/scale_study.py --output_dir /tmp/scale --scales 7x150 31x50 31x150
    python experiments/scale_study.py --output_dir /tmp/scale --plot_only   # the plot from results again
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil   # installed with ipykernel (requirements.txt); a well-kept way to read a process tree's memory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.progress import print_line  # noqa: E402
from data.simulate import write_dataset  # noqa: E402
from evaluation.classifier import CACHE_DIR  # noqa: E402

STAGES = ("stage 1", "stage 2", "stage 3", "stage 4")
RESULTS = ROOT / "experiments" / "results" / "scale_study_cpu.json"
FIGURE = ROOT / "docs" / "figures" / "scale_study.png"


#################################################################################
#                      A stage's wall time and peak memory                      #
#################################################################################

def tree_pss_bytes(process: psutil.Process) -> int:
    """Proportional set size of a process and its descendants, bytes (Linux; a process that ended meanwhile
    counts 0)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run_measured(command: list[str], log_path: Path, every_s: float = 0.25) -> dict:
    """Run `command` (cwd: the repository) with its output in log_path; its wall seconds and the peak memory
    (PSS) of its process tree in MB. Raises CalledProcessError when it fails."""
    peak, start = 0, time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        process, done = psutil.Process(child.pid), threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_pss_bytes(process))
                done.wait(every_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = child.wait()
        done.set()
        sampler.join()
    if code != 0:
        raise subprocess.CalledProcessError(code, command, f"see {log_path}")
    return {"seconds": round(time.time() - start, 1), "peak_pss_mb": round(peak / 2**20)}


#################################################################################
#                                   Scales                                      #
#################################################################################

def parse_scale(text: str) -> tuple[int, int]:
    """'31x150' -> (31 people, 150 train images each)."""
    people, images = text.lower().split("x")
    return int(people), int(images)


def subset(full: Path, out: Path, people: int, train_per_user: int, val_per_user: int) -> Path:
    """The first `people` people of `full` with their first images, as symlinks in out/{train,val}/ID_n."""
    for split, count in (("train", train_per_user), ("val", val_per_user)):
        for user in range(1, people + 1):
            folder = out / split / f"ID_{user}"
            folder.mkdir(parents=True, exist_ok=True)
            for image in sorted((full / split / f"ID_{user}").iterdir())[:count]:
                link = folder / image.name
                if not link.exists():
                    link.symlink_to(image)
    return out


def stage_commands(data: Path, run: Path, args: argparse.Namespace, people: int) -> dict[str, list[str]]:
    """The four stages as the orchestrator chains them (configs/demo.yaml), at the study's short length."""
    py, config = sys.executable, str(ROOT / "configs" / "demo.yaml")
    latents, trained, samples = run / "latent_features", run / "trained_models", run / "generated_images"
    return {
        "stage 1": [py, "stage1_extract_features.py", "--config", config, "--data_dir", str(data),
                    "--vavae_path", args.vavae_path, "--output_path", str(latents)],
        "stage 2": [py, "stage2_train_dit.py", "--config", config, "--latent_dir", str(latents), "--output_dir",
                    str(trained), "--vavae_path", args.vavae_path, "--max_epochs", str(args.max_epochs),
                    "--val_every_n_epochs", "1", "--seed", str(args.seed)],
        "stage 3": [py, "stage3_inference.py", "--config", config, "--dit_checkpoint",
                    str(trained / "checkpoints" / "best.ckpt"), "--vavae_path", args.vavae_path, "--output_dir",
                    str(samples), "--num_samples_per_user", str(args.samples_per_user), "--seed", str(args.seed),
                    "--user_ids", *[str(u) for u in range(1, people + 1)]],
        "stage 4": [py, "stage4_evaluate.py", "--data_dir", str(data), "--generated_dir", str(samples),
                    "--output_dir", str(run / "evaluation"), "--vavae_path", args.vavae_path, "--seed",
                    str(args.seed)],
    }


def work_done(run: Path, stage: str) -> dict:
    """What a stage did, read from its outputs: images encoded, steps trained, samples drawn, images judged."""
    if stage == "stage 1":
        summary = json.loads((run / "latent_features" / "split.json").read_text())["users"]
        return {"images": sum(len(u["train"]) + len(u["val"]) for u in summary.values())}
    if stage == "stage 2":
        # the CSV logger's rows carry the global step (the last row's, counted from 0, is the last step's)
        lines = (run / "trained_models" / "lightning_logs" / "csv" / "metrics.csv").read_text().splitlines()
        column = lines[0].split(",").index("step")
        return {"steps": max(int(float(line.split(",")[column])) for line in lines[1:]) + 1}
    if stage == "stage 3":
        return {"samples": sum(1 for _ in (run / "generated_images").rglob("*.png")) - 1}   # less the grid
    users = json.loads((run / "evaluation" / "report.json").read_text())["dataset"]["users"]
    return {"images": sum(u["n_train"] + u["n_val"] + u["n_generated"] for u in users)}


def measure_scale(full: Path, out: Path, people: int, per_user: int, args: argparse.Namespace) -> dict:
    data = subset(full, out / f"data_{people}x{per_user}", people, per_user, args.val_per_user)
    shutil.rmtree(data / CACHE_DIR, ignore_errors=True)   # stage 4 trains its judge, as on a user's first run
    run = out / f"run_{people}x{per_user}"
    shutil.rmtree(run, ignore_errors=True)                # stage 2 would resume a finished run, not train one
    run.mkdir(parents=True)
    row = {"people": people, "train_per_user": per_user, "val_per_user": args.val_per_user, "stages": {}}
    for stage, command in stage_commands(data, run, args, people).items():
        print_line(f"== {people} x {per_user}: {stage}")
        measured = run_measured(command, run / f"{stage.replace(' ', '')}.log")
        row["stages"][stage] = {**measured, **work_done(run, stage)}
        print_line(f"   {json.dumps(row['stages'][stage])}")
    return row


#################################################################################
#                                    Plot                                       #
#################################################################################

def plot(results: dict, path: Path) -> None:
    """Seconds and peak memory of each stage against the train images of each scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(results["scales"], key=lambda r: r["people"] * r["train_per_user"])
    x = [r["people"] * r["train_per_user"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        left.plot(x, [r["stages"][stage]["seconds"] for r in rows], "o-", label=stage)
        right.plot(x, [r["stages"][stage]["peak_pss_mb"] / 1024 for r in rows], "o-", label=stage)
    for axis, label in ((left, "wall seconds"), (right, "peak memory, PSS (GB)")):
        axis.set_xlabel("train images (people x images per person)")
        axis.set_ylabel(label)
        axis.set_xticks(x, [f"{r['people']}x{r['train_per_user']}\n{n}" for r, n in zip(rows, x)])
        axis.grid(alpha=0.3)
    right.axhline(8, color="grey", ls="--", lw=1)
    left.legend()
    fig.suptitle(f"Each stage at growing scale, {results['machine']} (demo model, {results['max_epochs']} epochs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--scales", nargs="+", default=["7x150", "31x50", "31x150"], help="PEOPLExTRAIN_IMAGES")
    p.add_argument("--val_per_user", type=int, default=30)
    p.add_argument("--vavae_path", default=str(ROOT / "assets" / "demo_vavae.safetensors"))
    p.add_argument("--max_epochs", type=int, default=2)
    p.add_argument("--samples_per_user", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot_only", action="store_true")
    args = p.parse_args()
    if args.plot_only:
        plot(json.loads(RESULTS.read_text()), FIGURE)
        return
    out = Path(args.output_dir).resolve()
    scales = [parse_scale(s) for s in args.scales]
    full = out / "simulated"
    if not (full / ".done").exists():
        start = time.time()
        write_dataset(full, max(s[0] for s in scales), max(s[1] for s in scales), args.val_per_user, args.seed)
        (full / ".done").write_text(f"{time.time() - start:.1f}")
    results = {"machine": f"{os.cpu_count()}-core CPU", "date": time.strftime("%Y-%m-%d"),
               "simulation_seconds": float((full / ".done").read_text()), "tokenizer": Path(args.vavae_path).name,
               "max_epochs": args.max_epochs, "samples_per_user": args.samples_per_user, "scales": []}
    # Rows of other scales measured with the same settings stay: a scale run again replaces its own row.
    if RESULTS.exists():
        before = json.loads(RESULTS.read_text())
        if all(before.get(k) == results[k] for k in ("machine", "tokenizer", "max_epochs", "samples_per_user")):
            results["scales"] = [r for r in before["scales"] if (r["people"], r["train_per_user"]) not in scales]
    for people, per_user in scales:
        results["scales"].append(measure_scale(full, out, people, per_user, args))
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, FIGURE)
    print_line(f"results in {RESULTS}, plot in {FIGURE}")


if __name__ == "__main__":
    main()
