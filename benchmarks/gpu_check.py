"""The GPU check: stages 1-3 through the functions the stage scripts call, on whatever CUDA device is present.

    python benchmarks/gpu_check.py               # one GPU, <= 6 minutes on an H100, nothing downloaded
    python benchmarks/gpu_check.py --cpu_smoke   # tiny sizes on the CPU (< 1 minute): the check itself runs

- stage 1: data.latents.extract_features with the full-size f16d32 tokenizer (random weights, saved in the
  published .pt layout) on 64 simulated spectrograms: images/s (a second, warm pass is timed);
- stage 2: training.train_dit.train (the Lightning Trainer, DDP-ready module, fused AdamW, clipping) for
  ~30 steps each of LightningDiT-B/1 in 16-mixed and bf16-mixed and XL/1 in bf16-mixed with
  --grad_checkpointing, all with --grad_clip 1.0: latents/s (steps after the first 10), peak memory, MFU
  (analytic FLOPs of benchmarks/bench_train.py over the card's dense bf16/fp16 peak), ok or the error;
- stage 3: models.sampling.sample_images (sampling + decoding) with the B/1 model trained above:
  images/s at the default sampler and at the seed's 250 Euler steps.

Writes benchmarks/results/gpu_check.json (--cpu_smoke: /tmp/gpu_check_cpu_smoke.json): device, torch, lightning,
cuda_runtime, cuda_driver, stage1, stage2 (model, precision, grad_clip, batch_size, grad_checkpointing, steps, ok,
latents_per_s, peak_mem_gb, mfu, last_ckpt_gb, best_ckpt_gb, error), stage3. The file is rewritten after each
part, so a run stopped by a time limit keeps what finished; a part that fails is recorded with its error and
the others still run. Each run's checkpoints are deleted as soon as they are no longer needed (XL/1's
last.ckpt is ~11 GB).
"""
import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # harness, bench_train
from harness import ROOT, peak_tflops, sync   # noqa: E402  (harness also puts the repository on sys.path)
from bench_train import train_flops_per_latent   # noqa: E402

CUDA_OR_CPU = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # where stage 1 encodes

RESULTS = ROOT / "benchmarks" / "results"
FULL = dict(users=4, train_per_user=12, val_per_user=4, image_size=256, num_workers=4, batch_size=32, steps=30,
            warmup=10,
            samples_per_user=16, seed_steps=250,
            stage2=[("LightningDiT-B/1", "16-mixed", False), ("LightningDiT-B/1", "bf16-mixed", False),
                    ("LightningDiT-XL/1", "bf16-mixed", True)])
SMOKE = dict(users=2, train_per_user=4, val_per_user=2, image_size=64, num_workers=0, batch_size=4, steps=4,
             warmup=1,
             samples_per_user=2, seed_steps=8,
             stage2=[("LightningDiT-S/2", "16-mixed", False), ("LightningDiT-S/2", "bf16-mixed", False),
                     ("LightningDiT-S/2", "bf16-mixed", True)])
SMOKE_DIT = ["--depth", "1", "--hidden_size", "32", "--num_heads", "2"]
# The noisy-latent classifier stage 2 trains before its first step: 600 steps by default, minutes on a busy CPU (it ran
# 14 minutes in a fresh-clone CI run, three times over); 20 run its whole path. The GPU check keeps the default.
SMOKE_STAGE2 = [*SMOKE_DIT, "--classifier_steps", "20"]


#################################################################################
#                                   Helpers                                     #
#################################################################################

def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def cuda_driver_version() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def write_result(result: dict[str, Any], path: Path) -> None:
    """The JSON as it stands (atomic: an interrupted write keeps the previous one)."""
    from common.io import write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=1, default=str) + "\n")


def size_gb(path: Path) -> float | None:
    return round(path.stat().st_size / 2**30, 4) if path.is_file() else None


def attempt(part: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part; a failure becomes {"ok": False, "error": ...} instead of ending the check."""
    try:
        return {"ok": True, **part(), "error": None}
    except Exception as err:   # noqa: BLE001 - every failure is a result here
        traceback.print_exc()
        return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:1000]}"}
    finally:
        reset_memory()


class StepTimer(pl.Callback):
    """Wall time between the end of step `warmup` and the last step (synchronised), seen by the Trainer, and
    the analytic training FLOPs per latent of the model being trained."""
    def __init__(self, warmup: int):
        self.warmup, self.marks, self.flops = warmup, {}, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.flops = train_flops_per_latent(pl_module.model)["flops"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (self.warmup, trainer.max_steps):
            sync(pl_module.device)
            self.marks[trainer.global_step] = time.perf_counter()

    def seconds(self, last: int) -> float:
        return self.marks[last] - self.marks[self.warmup]


#################################################################################
#                                   Stages                                      #
#################################################################################

def make_tokenizer(path: Path, smoke: bool) -> Path:
    """Full size: the f16d32 VA-VAE with random weights in the published layout ({"state_dict": ...} .pt)."""
    from models.vavae import VAVAE, VAVAE_CONFIGS, save_vavae
    torch.manual_seed(0)
    if smoke:
        tiny = dict(ch=8, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=64,
                    norm_groups=4)
        save_vavae(VAVAE(**tiny), path.with_suffix(".safetensors"))
        return path.with_suffix(".safetensors")
    torch.save({"state_dict": VAVAE(**VAVAE_CONFIGS["f16d32"]).state_dict()}, path.with_suffix(".pt"))
    return path.with_suffix(".pt")


def check_stage1(data: Path, tokenizer: Path, work: Path, sizes: dict) -> dict[str, Any]:
    from data.cli import ExtractOptions
    from data.latents import extract_features
    n_images = sizes["users"] * (sizes["train_per_user"] + sizes["val_per_user"])
    seconds = []
    for run in ("cold", "warm"):
        sync(CUDA_OR_CPU)
        start = time.perf_counter()
        extract_features(ExtractOptions.defaults(data_dir=str(data), vavae_path=str(tokenizer),
                                                 output_path=str(work / f"latents_{run}"),
                                                 batch_size=sizes["batch_size"], image_size=sizes["image_size"],
                                                 num_workers=sizes["num_workers"]), log=lambda m: None)
        sync(CUDA_OR_CPU)
        seconds.append(time.perf_counter() - start)
    return {"images": n_images, "batch_size": sizes["batch_size"], "tokenizer": tokenizer.name,
            "seconds_cold": round(seconds[0], 2), "seconds_warm": round(seconds[1], 2),
            "images_per_s": round(n_images / seconds[1], 2), "note": "PNG loading + preprocessing + encoder, "
            "tokenizer load included; random weights"}


def check_stage2(latents: Path, out: Path, model: str, precision: str, grad_checkpointing: bool, sizes: dict,
                 smoke: bool) -> dict[str, Any]:
    from training.cli import training_options
    from common.device import resolve_precision
    from training.train_dit import train
    steps, batch = sizes["steps"], sizes["batch_size"]
    flags = ["--latent_dir", latents, "--output_dir", out, "--model", model, "--precision", precision,
             "--grad_clip", 1.0, "--batch_size", batch, "--max_steps", steps, "--val_every_n_epochs", 10**6,
             "--checkpoint_every_n_steps", 10**9, "--log_every_n_steps", 10,
             *(["--grad_checkpointing"] if grad_checkpointing else []), *(SMOKE_STAGE2 if smoke else []),
             *(["--accelerator", "cpu"] if smoke else [])]
    args = training_options(list(map(str, flags)))
    row = {"model": model, "precision": precision, "grad_clip": 1.0, "batch_size": batch,
           "grad_checkpointing": grad_checkpointing, "steps": steps,
           "precision_used": resolve_precision(precision, args.accelerator)}
    timer = StepTimer(sizes["warmup"])
    reset_memory()
    train(args, log=print, callbacks=[timer])
    ckpt_dir = Path(out) / "checkpoints"
    row["last_ckpt_gb"], row["best_ckpt_gb"] = size_gb(ckpt_dir / "last.ckpt"), size_gb(ckpt_dir / "best.ckpt")
    latents_per_s = batch * (steps - sizes["warmup"]) / timer.seconds(steps)
    mfu = None
    if torch.cuda.is_available():
        dtype = torch.float16 if row["precision_used"] == "16-mixed" else torch.bfloat16
        mfu = round(latents_per_s * timer.flops / (peak_tflops(torch.device("cuda"), dtype)[0] * 1e12), 4)
    return {**row, "latents_per_s": round(latents_per_s, 1), "peak_mem_gb": peak_memory_gb(), "mfu": mfu,
            "train_tflops_per_latent": timer.flops / 1e12}


def check_stage3(checkpoint: Path, model_name: str, tokenizer: Path, sizes: dict,
                 device: str) -> list[dict[str, Any]]:
    from generation.generate import load_generator
    from models.sampling import sample_images
    from models.transport import DEFAULT_SAMPLER, DEFAULT_SHIFT, DEFAULT_STEPS
    from models.vavae import load_vavae
    model, info = load_generator(str(checkpoint), device)
    vae = load_vavae(tokenizer, device=device)
    jobs = [(u, k) for u in info.user_numbers for k in range(sizes["samples_per_user"])]
    sample_images(model, vae, info, jobs[:1], num_steps=2, device=device, progress=False)   # warm-up
    rows = []
    for sampler, steps, shift in ((DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_SHIFT),
                                  ("euler", sizes["seed_steps"], 1.0)):
        reset_memory()
        sync(torch.device(device))
        start = time.perf_counter()
        _, nfe = sample_images(model, vae, info, jobs, num_steps=steps, sampler=sampler, shift=shift,
                               device=device, progress=False)
        sync(torch.device(device))
        seconds = time.perf_counter() - start
        rows.append({"model": model_name, "sampler": sampler, "steps": steps, "nfe": nfe,
                     "images": len(jobs), "batch_size": 16, "guidance_scale": 4.0,
                     "images_per_s": round(len(jobs) / seconds, 2), "peak_mem_gb": peak_memory_gb()})
    return rows


#################################################################################
#                                     Main                                      #
#################################################################################

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny sizes on the CPU: checks the check")
    parser.add_argument("--json_out", default=None,
                        help="default benchmarks/results/gpu_check.json (--cpu_smoke: in the temp folder)")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --cpu_smoke to test the check itself")
    sizes, device = (SMOKE, "cpu") if smoke else (FULL, "cuda")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    started = time.time()
    default = Path(tempfile.gettempdir()) / "gpu_check_cpu_smoke.json" if smoke else RESULTS / "gpu_check.json"
    path = Path(args.json_out) if args.json_out else default
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke sizes)",
        "torch": torch.__version__, "lightning": pl.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_driver": cuda_driver_version(), "cpu_smoke": smoke}

    def record(key: str, value: Any) -> None:
        result[key] = value
        result["seconds"] = round(time.time() - started, 1)
        write_result(result, path)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        from data.simulate import write_dataset
        write_dataset(work / "data", sizes["users"], sizes["train_per_user"], sizes["val_per_user"], seed=0,
                      image_size=sizes["image_size"], progress=False)
        tokenizer = make_tokenizer(work / "vavae", smoke)
        print("== stage 1", flush=True)
        record("stage1", attempt(lambda: check_stage1(work / "data", tokenizer, work, sizes)))
        shutil.rmtree(work / "latents_cold", ignore_errors=True)
        latents = work / "latents_warm"
        print("== stage 2", flush=True)
        rows: list[dict[str, Any]] = []
        for i, (model, precision, ckpt) in enumerate(sizes["stage2"]):
            print(f"-- {model} {precision}{' --grad_checkpointing' if ckpt else ''}", flush=True)
            row = attempt(lambda: check_stage2(latents, work / f"dit_{i}", model, precision, ckpt, sizes, smoke))
            if i == 1:   # B/1 bf16-mixed: stage 3 samples its best.ckpt (EMA weights only); last.ckpt can go
                (work / f"dit_{i}" / "checkpoints" / "last.ckpt").unlink(missing_ok=True)
            else:
                shutil.rmtree(work / f"dit_{i}", ignore_errors=True)
            rows.append({"model": model, "precision": precision, "grad_clip": 1.0, "batch_size": sizes["batch_size"],
                         "grad_checkpointing": ckpt, "steps": sizes["steps"], "latents_per_s": None,
                         "peak_mem_gb": None, "mfu": None, **row})
            record("stage2", rows)
        print("== stage 3", flush=True)
        checkpoint = work / "dit_1" / "checkpoints" / "best.ckpt"
        model_name = sizes["stage2"][1][0]
        record("stage3", attempt(lambda: {"runs": check_stage3(checkpoint, model_name, tokenizer, sizes, device)}))
    print(json.dumps(result, indent=1, default=str))
    print(f"wrote {path} ({result['seconds']} s)")
    failed = [part for part in (result["stage1"], *result["stage2"], result["stage3"]) if not part["ok"]]
    if smoke and failed:   # the smoke run checks the check: any failure is its failure (CI runs it)
        sys.exit(f"--cpu_smoke: {len(failed)} part(s) failed: {[part['error'] for part in failed]}")


if __name__ == "__main__":
    main()
