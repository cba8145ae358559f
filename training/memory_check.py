"""Stage 2's memory check, the user-facing side of the estimate in training/memory.py: the setup stage 2 would
train with from its flags and stage 1's file headers (setup_from_args, read_header), the report --check_memory
prints with the flag changes that would fit (memory_report, describe, suggestions, largest_batch,
smaller_models), and the refusal before a CUDA run that would not fit this device's free memory
(check_cuda_memory)."""
import argparse
import json
from pathlib import Path

import torch

from common.device import resolve_precision
from common.errors import PipelineError
from models.lightningdit import LightningDiT_models, model_config
from training.memory import GB, TrainingSetup, checkpoint_report, estimate_memory

# Without stage 1 output: VA-VAE f16d32 latents of 256x256 images, 31 users with ~150 images each.
DEFAULT_LATENT = dict(in_channels=32, input_size=16, users=31, latents=31 * 150)


def check_cuda_memory(args: argparse.Namespace, log=print) -> None:
    """Before a CUDA training: refuse (with advice) a run whose estimate exceeds this device's free memory."""
    from training.launch import local_rank   # Lightning (~6 s): loaded by then in training; not for --check_memory
    # This rank's GPU, as Lightning assigns them (srun sets SLURM_LOCALID, not LOCAL_RANK); modulo for a task
    # that sees only its own GPU (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank).
    device = local_rank() % max(1, torch.cuda.device_count())
    free, total = torch.cuda.mem_get_info(device)
    fits, text, estimate = memory_report(args, free)
    if not fits:
        raise PipelineError(f"this run needs more memory than cuda:{device} has free ({free / GB:.1f} of "
                            f"{total / GB:.1f} GB).\n{text}\n(--skip_memory_check trains anyway)")
    log(f"memory check: estimated peak {estimate / GB:.1f} GB, {free / GB:.1f} GB free on cuda:{device}")


def memory_report(args: argparse.Namespace, budget: float, cuda: bool = True) -> tuple[bool, str, float]:
    """(fits, the table to print with the flags that would fit otherwise, the estimate) for stage 2's flags."""
    setup, source = setup_from_args(args, cuda)
    est = estimate_memory(setup)
    text = [f"estimated peak memory per device for {args.model} ({describe(setup)}); {source}",
            est.table(budget), checkpoint_report(setup)]
    fits = est.total <= budget
    if not fits:
        found = suggestions(setup, budget, bool(args.init_from))
        text.append(f"flags that fit {budget / GB:.1f} GB: " + "; ".join(found) if found else
                    "no single change fits: combine a smaller --model, --batch_size and --grad_checkpointing")
    return fits, "\n".join(text), est.total


def setup_from_args(args: argparse.Namespace, cuda: bool = True) -> tuple[TrainingSetup, str]:
    """The setup stage 2 would train with these flags; the second value says where data sizes came from."""
    in_channels, input_size, users, n = (DEFAULT_LATENT[k] for k in ("in_channels", "input_size", "users", "latents"))
    source = ("no stage 1 output read: assuming 32x16x16 latents (VA-VAE f16d32, 256 px), "
              f"{users} users, {n} latents")
    latent_dir = Path(args.latent_dir) if getattr(args, "latent_dir", None) else None
    if latent_dir is not None and (latent_dir / "train.safetensors").is_file():
        shapes = {}
        for split in ("train", "val"):
            path = latent_dir / f"{split}.safetensors"
            if path.is_file():
                shapes[split] = read_header(path)
        train = shapes["train"]
        _, in_channels, input_size, _ = train["latents"]["shape"]
        users = len(json.loads(train["__metadata__"].get("users", "[]"))) or users
        n = sum(s["latents"]["shape"][0] for s in shapes.values())
        source = f"from {latent_dir}: {in_channels}x{input_size}x{input_size} latents, {users} users, {n} latents"
    config = model_config(args.model, num_classes=users, input_size=input_size, in_channels=in_channels,
                          depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads)
    # What stage 2 would train in (the same resolver); on a machine without CUDA, cuda=True asks about a GPU
    # run in general, where 16-mixed and bf16-mixed need the same memory.
    precision = resolve_precision(args.precision, "cuda" if cuda else "cpu", warn=False)
    return TrainingSetup(config, args.batch_size, precision, bool(args.grad_checkpointing),
                         args.finetune if args.init_from or args.finetune == "lora" else "full",
                         args.lora_rank, args.devices, n, fused_adam=cuda, half_base=cuda,
                         latent_classifier=args.classifier_steps > 0), source


def read_header(path: Path) -> dict:
    """A safetensors file's JSON header (shapes and metadata) without reading any tensor."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def describe(setup: TrainingSetup) -> str:
    cfg = setup.model_config
    mode = {"full": "full training", "partial": "--finetune partial",
            "lora": f"--finetune lora (rank {setup.lora_rank})"}[setup.finetune]
    return (f"depth {cfg['depth']}, hidden {cfg['hidden_size']}, patch {cfg['patch_size']}, batch "
            f"{setup.batch_size} per device, {setup.precision}, {mode}"
            + (", --grad_checkpointing" if setup.grad_checkpointing else "")
            + (f", {setup.devices} devices (DDP)" if setup.devices > 1 else ""))


def suggestions(setup: TrainingSetup, budget: float, has_init_from: bool) -> list[str]:
    """Flag changes that fit the budget, smallest change first."""
    def fits(change: dict) -> bool:
        return estimate_memory(_with(setup, **change)).total <= budget

    ckpt, ckpt_flag = ({}, "") if setup.grad_checkpointing else ({"grad_checkpointing": True}, " --grad_checkpointing")
    found = []
    if ckpt and fits(ckpt):
        found.append("--grad_checkpointing")
    if setup.finetune != "lora":
        needs = "" if has_init_from else " (with --init_from and the published weights)"
        for change, flags in (({"finetune": "lora"}, "--finetune lora"),
                              ({"finetune": "lora", **ckpt}, "--finetune lora" + ckpt_flag)):
            if fits(change):
                found.append(flags + needs)
                break
    batch = largest_batch(setup, budget, **ckpt)
    if 0 < batch < setup.batch_size:
        found.append(f"--batch_size {batch}{ckpt_flag}")
    if not has_init_from:   # the model must match the weights of --init_from
        for name in smaller_models(setup.model_config):
            config = model_config(name, **{k: setup.model_config[k] for k in ("num_classes", "input_size", "in_channels")})
            if fits({"model_config": config, **ckpt}):
                found.append(f"--model {name}{ckpt_flag}")
                break
    return found


def largest_batch(setup: TrainingSetup, budget: float, **change) -> int:
    """The largest power-of-two batch per device (<= the current one) that fits; 0 if even 1 does not."""
    batch = 1 << max(0, setup.batch_size.bit_length() - 1)
    while batch >= 1:
        if estimate_memory(_with(setup, batch_size=batch, **change)).total <= budget:
            return batch
        batch //= 2
    return 0


def smaller_models(config: dict) -> list[str]:
    """Named sizes with fewer parameters-times-tokens than `config`, largest first."""
    cost = lambda c: c["depth"] * c["hidden_size"] ** 2 * (config["input_size"] // c["patch_size"]) ** 2
    ours = cost(config)
    named = sorted(LightningDiT_models, key=lambda n: cost(LightningDiT_models[n]), reverse=True)
    return [n for n in named if cost(LightningDiT_models[n]) < ours]


def _with(setup: TrainingSetup, **change) -> TrainingSetup:
    return TrainingSetup(**{**setup.__dict__, **change})
