"""Stage 2's run, top to bottom: build the module from stage 1's latents (build_module), build the Trainer with
its checkpoints, logs and DDP settings (build_trainer), take the folder's lock, resume or start, train, validate
the final weights and plot the loss curve (train). Whether and how a run resumes is training/resume.py; the
checkpoint-writing callbacks are training/checkpoints.py, the other Lightning housekeeping training/callbacks.py."""
import os
import warnings
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from common.device import resolve_precision
from common.errors import PipelineError, out_of_memory_advice
from common.lock import run_lock
from data.latent_files import RUN_KEY, check_latents_agree, load_latents, load_stats
from data.repa_targets import load_targets
from models.checkpoint import PipelineInfo
from models.lightningdit import model_config
from training.callbacks import (AtomicCheckpointIO, HalfPrecisionBase, KeepMetricsHistory, plot_loss_curve,
                                progress_callback, quiet_lightning_warnings)
from training.checkpoints import LOCK_NAME, BestCheckpoint, EarlyCheckpoint, LastCheckpoint, RunFlags
from training.cli import TrainOptions
from training.dit_module import DiTTrainingModule
from training.divergence import DivergenceGuard, NonFiniteLoss
from training.init_from import initialise_from
from training.latent_classifier import LatentClassifierTraining
from training.launch import (COLLECTIVE_TIMEOUT, WatchedDDPStrategy, global_rank, is_peer_lost,
                             peer_lost_message)
from training.memory_check import check_cuda_memory
from training.resume import check_devices, divergence_message, prepare_output_dir, resume_point
from training.sample_grid import identity_callbacks, sample_grid_callbacks


OOM_FLAGS = ("a smaller --batch_size (per GPU), --grad_checkpointing, a smaller --model (on 16 GB T4s: "
             "--config configs/kaggle_2xT4.yaml, LightningDiT-B/1), --precision 16-mixed or bf16-mixed (not 32-true)")


def build_module(args: TrainOptions, log=print) -> DiTTrainingModule:
    """Latents, stats and user table from stage 1 + the model config from the flags."""
    train_x, train_y, meta = load_latents(args.latent_dir, "train")
    val_x, val_y, _ = load_latents(args.latent_dir, "val")
    mean, std = load_stats(args.latent_dir)
    check_latents_agree(args.latent_dir, train_x, val_x, mean, std)
    users = meta.get("users") or [f"ID_{i + 1}" for i in range(int(train_y.max()) + 1)]
    numbers = meta.get("user_numbers") or list(range(1, len(users) + 1))
    config = model_config(args.model, num_classes=len(users), input_size=train_x.shape[-1],
                          in_channels=train_x.shape[1], depth=args.depth, hidden_size=args.hidden_size,
                          num_heads=args.num_heads, use_qknorm=args.use_qknorm or None,
                          class_dropout_prob=args.class_dropout_prob,
                          use_checkpoint=bool(args.grad_checkpointing),
                          time_shift_cond=True if args.time_shift_aug > 0 else None)   # off: no key, as published
    if config["input_size"] % config["patch_size"]:
        raise PipelineError(f"{args.latent_dir}: latents of {config['input_size']}x{config['input_size']} cannot be cut "
                            f"into the {config['patch_size']}x{config['patch_size']} patches of {args.model}: pick a "
                            f"model with patch size 1 (e.g. LightningDiT-B/1) or a size that divides it.")
    info = PipelineInfo(model_config=config, users=users, user_numbers=numbers, latent_mean=mean, latent_std=std,
                        tokenizer=meta.get("tokenizer", ""), tokenizer_sha256=meta.get("tokenizer_sha256", ""),
                        image_size=meta.get("image_size", 256), stage1_run=meta.get(RUN_KEY) or "")
    repa_targets = None
    if args.repa_weight > 0:
        repa_targets = load_targets(args.latent_dir, len(train_x), meta.get(RUN_KEY))
    module = DiTTrainingModule(info, train_x, train_y, val_x, val_y, args, repa_targets)
    n_params = sum(p.numel() for p in module.model.parameters())
    log(f"{args.model} ({n_params / 1e6:.1f}M parameters), {len(users)} users, "
        f"{len(train_x)} train / {len(val_x)} val latents")
    return module


def train(args: TrainOptions, log=print, callbacks: Sequence[pl.Callback] = ()) -> Path:
    """Train (or resume) and return the path of the best checkpoint; `callbacks` are added to the Trainer's
    (benchmarks/gpu_check.py times the steps with one).

    Reads args.latent_dir (stage 1: latents (N, 32, 16, 16) float32, normalised here by latent_stats) and writes
    args.output_dir/checkpoints/{last,best,early}.ckpt (torch pickles read back with weights_only=True: best and
    early hold the EMA weights and the PipelineInfo stage 3 needs, last everything a resume needs), lightning_logs/
    and loss_curve.png. Rerunning resumes from last.ckpt, naming changed flags. Raises PipelineError for what a
    user can fix: mixed or non-finite latents, a resume the flags cannot honour, another run holding the folder's
    lock, no usable CUDA for a GPU run, a divergence (with the checkpoint kept), or memory that does not fit."""
    torch.manual_seed(args.seed)   # the initial weights; the module seeds each step from (seed, step, rank)
    check_devices(args)
    if global_rank(args.devices) != 0:
        log = lambda *_: None   # noqa: E731  one account of the run, from global rank 0; errors still stop every rank
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    precision = resolve_precision(args.precision, args.accelerator)   # after check_devices: cuda is usable
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 on Ampere+: same results class, much faster
        torch.backends.cudnn.allow_tf32 = True
    if args.finetune == "lora" and not args.init_from:
        raise PipelineError("--finetune lora trains low-rank adapters on a pretrained model: pass --init_from "
                            "with the weights to adapt (e.g. the published lightningdit-xl-imagenet256-*.pt)")
    if torch.cuda.is_available() and args.accelerator != "cpu" and not args.skip_memory_check:
        check_cuda_memory(args, log)
    module = build_module(args, log)
    if args.init_from:
        initialise_from(module, args.init_from, args.finetune, log, args.lora_rank, args.lora_alpha)
    elif args.finetune != "full":
        warnings.warn(f"--finetune {args.finetune} only applies with --init_from; training every weight")
    callbacks = [*callbacks, EarlyCheckpoint(ckpt_dir, args.early_checkpoint_step, log),
                 *sample_grid_callbacks(args.vavae_path, args.val_grid_users, args.val_grid_samples, module.info, out, log),
                 *identity_callbacks(args.val_identity_samples, args.classifier_steps)]
    trainer = build_trainer(args, precision, out, callbacks, log)
    log(world_line(args))
    # Only the launching process holds it (global rank 0); the DDP workers it starts run under it.
    with run_lock(out / LOCK_NAME, "stage 2", "another --output_dir", hold=trainer.global_rank == 0, log=log):
        prepare_output_dir(args, ckpt_dir, log)   # --restart's removal, before any rank decides to resume
        resume = resume_point(args, module, ckpt_dir, trainer.global_rank == 0, log)
        try:
            with out_of_memory_advice("stage 2", OOM_FLAGS):
                trainer.fit(module, ckpt_path=resume)   # AtomicCheckpointIO reads it with weights_only=True
                validate_final_weights(trainer, module)
        except NonFiniteLoss as err:
            raise PipelineError(divergence_message(err, args, precision, ckpt_dir)) from None
        except Exception as err:
            world = args.devices * args.num_nodes
            if world > 1 and is_peer_lost(err):
                raise PipelineError(peer_lost_message(err, world, str(ckpt_dir / "last.ckpt"))) from None
            raise
        if trainer.global_rank == 0:
            plot_loss_curve(out / "lightning_logs" / "csv" / "metrics.csv", out / "loss_curve.png")
            log(f"stage 2 done: checkpoints in {ckpt_dir}, logs in {out / 'lightning_logs'}, curve {out / 'loss_curve.png'}")
    best, last = ckpt_dir / "best.ckpt", ckpt_dir / "last.ckpt"
    return best if best.is_file() else last


def world_line(args: TrainOptions) -> str:
    """How many processes train and on what batch: 'stage 2: 4 processes (2 per node x 2 nodes), batch 32 per
    process, 128 in total'."""
    world = args.devices * args.num_nodes
    return (f"stage 2: {world} process{'es' if world > 1 else ''} ({args.devices} per node x {args.num_nodes} "
            f"node{'s' if args.num_nodes > 1 else ''}), batch {args.batch_size} per process, "
            f"{args.batch_size * world} in total")


def build_trainer(args: TrainOptions, precision: str, out: Path, callbacks: Sequence[pl.Callback],
                  log=print) -> pl.Trainer:
    """The Trainer with stage 2's checkpoints (training/checkpoints.py), divergence checks, noisy-latent classifier,
    logs, progress and DDP settings; `log` takes its notes (global rank 0's, as train passes it)."""
    ckpt_dir = out / "checkpoints"
    csv_logger = CSVLogger(out, name="lightning_logs", version="csv")
    loggers = [csv_logger, TensorBoardLogger(out, name="lightning_logs", version="tensorboard")]
    callbacks = [DivergenceGuard(), LatentClassifierTraining(args.classifier_steps, args.seed),
                 LastCheckpoint(ckpt_dir / "last.ckpt", args.checkpoint_every_n_steps),
                 BestCheckpoint(ckpt_dir / "best.ckpt"), RunFlags(args), progress_callback(),
                 KeepMetricsHistory(csv_logger), *callbacks]
    if args.finetune == "lora":
        callbacks.append(HalfPrecisionBase())
    devices = args.devices
    distributed = devices * args.num_nodes > 1
    # The latents and the fixed validation noise are buffers: by default DDP would broadcast them from rank 0
    # before every forward (the whole dataset each step).
    strategy = WatchedDDPStrategy(broadcast_buffers=False, timeout=COLLECTIVE_TIMEOUT, note=log,
                                  last_checkpoint=str(ckpt_dir / "last.ckpt")) if distributed else "auto"
    if distributed and args.accelerator == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // devices))   # devices: processes on this node
    quiet_lightning_warnings()
    return pl.Trainer(
        accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy,
        precision=precision, max_epochs=args.max_epochs, max_steps=args.max_steps or -1,
        gradient_clip_val=args.grad_clip or None,   # applied by DiTTrainingModule.configure_gradient_clipping
        callbacks=callbacks, enable_checkpointing=False,   # LastCheckpoint and BestCheckpoint write them
        plugins=[AtomicCheckpointIO()],
        logger=loggers, log_every_n_steps=args.log_every_n_steps, num_sanity_val_steps=0,
        use_distributed_sampler=False, enable_model_summary=False, deterministic=False,
        check_val_every_n_epoch=args.val_every_n_epochs, default_root_dir=out)


def validate_final_weights(trainer: pl.Trainer, module: DiTTrainingModule) -> None:
    """Validate the final weights when the cadence skipped them (--val_every_n_epochs, a --max_steps that ends
    mid-epoch), so that best.ckpt can be them. Only after this process trained: a rerun of a finished run
    trains and validates nothing."""
    best = next(c for c in trainer.callbacks if isinstance(c, BestCheckpoint))
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    if last.trained_here(trainer) and len(module.val_x) and best.validated_step != trainer.global_step:
        trainer.validate(module, verbose=False)


