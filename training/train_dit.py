"""Stage 2 logic: build the Trainer (DDP, precision, checkpoints, logs), resume, train, plot."""
import csv
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins import TorchCheckpointIO

from common.errors import PipelineError
from common.io import atomic_path, save_torch
from data.latents import load_latents, load_stats
from models.lightningdit import model_config
from training.dit_module import DiTTrainingModule, NonFiniteLoss


def resolve_precision(precision: str, accelerator: str) -> str:
    """The precision asked for, or the nearest one this machine runs (with a warning)."""
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_cuda and precision in ("16-mixed", "16", "bf16-mixed", "bf16"):
        warnings.warn(f"precision {precision} needs a GPU; no CUDA here, training in 32-true instead")
        return "32-true"
    if on_cuda and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16 (e.g. a T4); training in 16-mixed with loss scaling instead")
        return "16-mixed"
    return precision


def build_module(args, log=print) -> DiTTrainingModule:
    """Latents, stats and user table from stage 1 + the model config from the flags."""
    train_x, train_y, meta = load_latents(args.latent_dir, "train")
    val_x, val_y, _ = load_latents(args.latent_dir, "val")
    mean, std = load_stats(args.latent_dir)
    users = meta.get("users") or [f"ID_{i + 1}" for i in range(int(train_y.max()) + 1)]
    numbers = meta.get("user_numbers") or list(range(1, len(users) + 1))
    config = model_config(args.model, num_classes=len(users), input_size=train_x.shape[-1],
                          in_channels=train_x.shape[1], depth=args.depth, hidden_size=args.hidden_size,
                          num_heads=args.num_heads, use_qknorm=args.use_qknorm or None,
                          class_dropout_prob=args.class_dropout_prob,
                          use_checkpoint=bool(args.grad_checkpointing))
    info = {"users": users, "user_numbers": numbers, "latent_mean": mean, "latent_std": std,
            "tokenizer": meta.get("tokenizer", ""), "tokenizer_sha256": meta.get("tokenizer_sha256", ""),
            "image_size": meta.get("image_size", 256)}
    module = DiTTrainingModule(
        config, train_x, train_y, val_x, val_y, info, lr=args.lr, betas=(0.9, args.beta2),
        weight_decay=args.weight_decay, batch_size=args.batch_size, ema_decay=args.ema_decay, seed=args.seed,
        timestep_sampling=args.timestep_sampling, cosine_loss_weight=args.cosine_loss_weight,
        compile_model=args.compile, backbone_lr_scale=args.backbone_lr_scale)
    n_params = sum(p.numel() for p in module.model.parameters())
    log(f"{args.model} ({n_params / 1e6:.1f}M parameters), {len(users)} users, "
        f"{len(train_x)} train / {len(val_x)} val latents")
    return module


def train(args, log=print) -> Path:
    """Train (or resume) and return the path of the best checkpoint."""
    pl.seed_everything(args.seed, workers=True, verbose=False)
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    precision = resolve_precision(args.precision, args.accelerator)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 on Ampere+: same results class, much faster
        torch.backends.cudnn.allow_tf32 = True
    if args.finetune == "lora" and not args.init_from:
        raise PipelineError("--finetune lora trains low-rank adapters on a pretrained model: pass --init_from "
                            "with the weights to adapt (e.g. the published lightningdit-xl-imagenet256-*.pt)")
    if torch.cuda.is_available() and args.accelerator != "cpu" and not args.skip_memory_check:
        from training.memory import check_cuda_memory
        check_cuda_memory(args, log)
    module = build_module(args, log)
    if args.init_from:
        from training.init_from import initialise_from
        initialise_from(module, args.init_from, args.finetune, log, args.lora_rank, args.lora_alpha)
    elif args.finetune != "full":
        warnings.warn(f"--finetune {args.finetune} only applies with --init_from; training every weight")
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if last.is_file() and not args.restart else None
    if resume:
        previous = load_checkpoint(last, mmap=True)
        check_same_model(previous["pipeline"]["model_config"], module.model_config, last)
        from training.lora import check_same_lora
        check_same_lora(previous["pipeline"].get("lora"), module.pipeline_info.get("lora"), last)
        log(f"resuming from {last} at step {previous['global_step']} (same command as before; "
            "pass --restart to start over)")
        # Batches are a function of the global step, so a mid-epoch resume is exact (Lightning can't know).
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch")

    # last.ckpt: every N steps (preemption loses little) and after every validation (save_last).
    every = ModelCheckpoint(dirpath=ckpt_dir, filename="last", every_n_train_steps=args.checkpoint_every_n_steps,
                            save_top_k=1, enable_version_counter=False)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                           save_last=True, enable_version_counter=False)
    csv_logger = CSVLogger(out, name="lightning_logs", version="csv")
    loggers = [csv_logger, TensorBoardLogger(out, name="lightning_logs", version="tensorboard")]
    callbacks = [every, best, TQDMProgressBar(refresh_rate=10), KeepMetricsHistory(csv_logger)]
    if args.finetune == "lora":
        from training.lora import HalfPrecisionBase
        callbacks.append(HalfPrecisionBase())
    devices = args.devices
    strategy = "ddp" if (devices if isinstance(devices, int) else 1) * args.num_nodes > 1 else "auto"
    if strategy == "ddp" and args.accelerator == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // devices))
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy,
        precision=precision, max_epochs=args.max_epochs, max_steps=args.max_steps or -1,
        gradient_clip_val=args.grad_clip or None,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        logger=loggers, log_every_n_steps=args.log_every_n_steps, num_sanity_val_steps=0,
        use_distributed_sampler=False, enable_model_summary=False, deterministic=False,
        check_val_every_n_epoch=args.val_every_n_epochs, default_root_dir=out)
    try:
        trainer.fit(module, ckpt_path=resume, weights_only=True)
    except NonFiniteLoss as err:
        raise PipelineError(
            f"training stopped: the loss became NaN/inf by step {err.step} (precision {precision}, lr {args.lr}). "
            f"The last good checkpoint is kept in {ckpt_dir}. Try a lower --lr (e.g. {args.lr / 2:g}), "
            "--precision bf16-mixed or 32-true, --grad_clip 1.0, or --use_qknorm; then rerun the same command "
            "with --restart, or without it to continue from the last good checkpoint.") from None
    if trainer.global_rank == 0:
        plot_loss_curve(out / "lightning_logs" / "csv" / "metrics.csv", out / "loss_curve.png")
        log(f"stage 2 done: checkpoints in {ckpt_dir}, logs in {out / 'lightning_logs'}, curve {out / 'loss_curve.png'}")
    return ckpt_dir / "best.ckpt" if (ckpt_dir / "best.ckpt").is_file() else last


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written beside their final name, then renamed: a kill mid-save keeps the previous
    last.ckpt whole (Lightning's own save stages the file in /tmp and moves it, a copy when /tmp is
    another disk, e.g. a mounted drive)."""
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_torch(checkpoint, path)


class KeepMetricsHistory(pl.Callback):
    """CSVLogger deletes an existing metrics.csv: on resume, log again the rows from before the
    checkpoint's step so that metrics.csv and the loss curve cover the whole run."""
    def __init__(self, logger: CSVLogger):
        self.logger = logger
        path = Path(logger.log_dir) / "metrics.csv"
        self.rows = list(csv.DictReader(path.open(newline=""))) if path.is_file() else []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.global_step == 0:
            return
        for row in self.rows:
            if row.get("step") and int(row["step"]) < trainer.global_step:
                self.logger.experiment.log_metrics(
                    {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}, int(row["step"]))
        self.logger.save()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        # Lightning's logging step is one ahead after resuming from a checkpoint saved at an epoch end;
        # without gradient accumulation it is the global step, as in an uninterrupted run.
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


def plot_loss_curve(metrics_csv: Path, png: Path) -> None:
    """Train loss per step (and its epoch mean) and EMA val loss per epoch, from Lightning's CSV log."""
    if not metrics_csv.is_file():
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            for key in ("train_loss_step", "train_loss_epoch", "val_loss"):
                if row.get(key):
                    series.setdefault(key, []).append((float(row["step"]), float(row[key])))
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"train_loss_step": dict(alpha=0.35, lw=0.8, label="train (step)"),
              "train_loss_epoch": dict(marker="o", ms=3, label="train (epoch mean)"),
              "val_loss": dict(marker="s", ms=3, label="val, EMA, fixed noise")}
    for key, points in series.items():
        ax.plot(*zip(*points), **styles[key])
    ax.set_xlabel("step"), ax.set_ylabel("flow-matching loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    """Resuming needs the architecture of the checkpoint; say which flags differ instead of a shape error."""
    keys = [k for k in sorted(set(saved) | set(current)) if k not in ("use_checkpoint", "class_dropout_prob")]
    diff = [f"{k}: {saved.get(k)} in the checkpoint, {current.get(k)} now"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise PipelineError(f"{path} was trained with a different model ({'; '.join(diff)}). Resume with the "
                            "same --model/--depth/--hidden_size/--num_heads flags and stage 1 latents, or pass "
                            "--restart (or another --output_dir) to train the new model from scratch.")


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A stage 2 checkpoint (weights_only); a clear error for anything else."""
    from common.io import torch_load_weights
    from training.dit_module import CHECKPOINT_KIND
    mmap = mmap and zipfile.is_zipfile(path)
    ckpt = torch_load_weights(path, "a stage 2 checkpoint (checkpoints/best.ckpt or last.ckpt)", mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("pipeline", {}).get("kind") != CHECKPOINT_KIND:
        found = "a VA-VAE tokenizer" if isinstance(ckpt, dict) and any(
            str(k).startswith(("encoder.", "decoder.")) for k in ckpt.get("state_dict", ckpt)) else "another kind of file"
        raise PipelineError(f"{path} is not a stage 2 LightningDiT checkpoint (found {found}). "
                            "Pass --dit_checkpoint <output_dir>/checkpoints/best.ckpt from stage2_train_dit.py.")
    return ckpt
