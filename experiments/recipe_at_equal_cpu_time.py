"""Which stage-2 recipe and guidance scale work best on the demo at equal CPU time? (issue: a better recipe)

Simulates the demo data and encodes it once, then for each recipe trains the demo DiT (--config plus the
recipe's flags) through the real orchestrator, samples, and evaluates with stage 4; stage 2's CPU time is
measured from the child processes' rusage, so other load on the machine does not count. Guidance scales are
compared on the base recipe's checkpoint. Every run samples --num_samples_per_user images per person (12 by
default, twice the demo's 6: identity on 36 samples moves by +-0.1 from draw to draw).
--config defaults to configs/studies/demo_lr5e-4.yaml, the demo's recipe when the published numbers were measured
(2026-11-26: lr 5e-4, guidance 2.0); --config configs/demo.yaml compares against today's.
Writes experiments/results/recipe_experiment.json and prints a table.

    python experiments/recipe_at_equal_cpu_time.py --work_dir /tmp/recipe [--recipes base logit_normal ...]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.demo import DEMO_DATA  # noqa: E402

TOKENIZER = ROOT / "assets" / "demo_vavae.safetensors"
RECIPES = {
    "base": [],
    "logit_normal": ["--timestep_sampling", "logit_normal"],
    "logit_normal+cosine": ["--timestep_sampling", "logit_normal", "--cosine_loss_weight", "1.0"],
    "warmup": ["--warmup_steps", "100"],
    "batch64": ["--batch_size", "64"],          # the same 200 epochs (images seen): half the steps
    "fp32": ["--precision", "32-true"],
}
GUIDANCE = [1.0, 2.0, 4.0]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline(out: Path, data: Path, config: str, samples: int, *flags: str) -> float:
    """Run run_complete_pipeline.py with `config`; returns the CPU seconds its stages used."""
    before = children_cpu()
    cmd = [sys.executable, str(ROOT / "run_complete_pipeline.py"), "--config", config,
           "--data_dir", str(data), "--vavae_path", str(TOKENIZER), "--output_dir", str(out), "--num_samples_per_user", str(samples), *flags]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return children_cpu() - before


def scores(out: Path) -> dict:
    report = json.loads((out / "evaluation" / "report.json").read_text())
    return {"identity": report["identity"]["generated_top1"], "ceiling": report["identity"]["real_val_top1"],
            "fd": report["fd"]["classifier"], "precision": report["manifold"]["generated"]["precision"],
            "recall": report["manifold"]["generated"]["recall"], "tstr": report["tstr_top1"],
            "diversity_ratio": report["diversity"]["mean_ratio"], "copy_rate": report["memorization"]["copy_rate"],
            "augmentation_gain": report.get("augmentation", {}).get("gain")}


def compare_guidance(work: Path, data: Path, config: str, samples: int, results: dict) -> None:
    for scale in GUIDANCE:
        out = work / f"guidance_{scale:g}"
        if not (out / "trained_models").is_dir():
            shutil.copytree(work / "base" / "latent_features", out / "latent_features")
            shutil.copytree(work / "base" / "trained_models", out / "trained_models")
        pipeline(out, data, config, samples, "--stages", "3", "4", "--guidance_scale", str(scale))
        results["guidance"][f"{scale:g}"] = scores(out)
        print("guidance", scale, results["guidance"][f"{scale:g}"], flush=True)


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--output", default=str(ROOT / "experiments" / "results" / "recipe_experiment.json"))
    parser.add_argument("--num_samples_per_user", type=int, default=12)
    parser.add_argument("--config", default=str(ROOT / "configs" / "studies" / "demo_lr5e-4.yaml"),
                        help="the base recipe (keys are flag names of run_complete_pipeline.py or of a stage)")
    args = parser.parse_args()
    config = str(Path(args.config).resolve())
    work = Path(args.work_dir).resolve()
    base = work / "base"
    subprocess.run([sys.executable, str(ROOT / "run_complete_pipeline.py"), "--demo", "--config", config, "--output_dir", str(base),
                    "--stages", "1"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    data = base / "data"
    results = {"machine": f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch threads",
               "data": f"demo: {DEMO_DATA}; assets/demo_vavae.safetensors", "config": args.config,
               "num_samples_per_user": args.num_samples_per_user, "recipes": {}, "guidance": {}}
    for name in args.recipes:
        out = work / name
        if not (out / "latent_features").is_dir():
            shutil.copytree(base / "latent_features", out / "latent_features")
        start = time.time()
        cpu = pipeline(out, data, config, args.num_samples_per_user, "--stages", "2", *RECIPES[name])     # an interrupted run resumes
        pipeline(out, data, config, args.num_samples_per_user, "--stages", "3", "4", *RECIPES[name])
        results["recipes"][name] = {"flags": RECIPES[name], "stage2_cpu_s": round(cpu, 1),
                                    "wall_s": round(time.time() - start, 1), **scores(out)}
        print(name, results["recipes"][name], flush=True)
        if name == "base":      # guidance scales on the base model, before the other recipes
            compare_guidance(work, data, config, args.num_samples_per_user, results)
        save(results, args.output)
    print("| recipe | stage 2 CPU s | identity (ceiling) | classifier FD | precision / recall | TSTR |")
    print("|---|---|---|---|---|---|")
    for name, r in results["recipes"].items():
        print(f"| {name} | {r['stage2_cpu_s']:.0f} | {r['identity']:.2f} ({r['ceiling']:.2f}) | {r['fd']:.1f} | "
              f"{r['precision']:.2f} / {r['recall']:.2f} | {r['tstr']:.2f} |")


if __name__ == "__main__":
    main()
