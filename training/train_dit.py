"""Stage 2 logic: build the Trainer (DDP, precision, checkpoints, logs), resume, train, plot."""
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy

from common.device import bf16_supported, check_cuda_usable, resolve_precision, uses_cuda
from common.errors import PipelineError, out_of_memory_advice
from data.latents import check_latents_agree, load_latents, load_stats
from common.lock import run_lock
from training.callbacks import (AtomicCheckpointIO, HalfPrecisionBase, KeepMetricsHistory, plot_loss_curve,
                                progress_callback, quiet_lightning_warnings)
from training.checkpoints import (LOCK_NAME, BestCheckpoint, EarlyCheckpoint, LastCheckpoint, RunFlags,
                                  check_length, check_optimizer_layout, resume_message)
from training.cli import TrainOptions
from models.checkpoint import PipelineInfo, checkpoint_info, load_checkpoint
from models.lightningdit import model_config
from training.dit_module import MAX_SKIPPED_IN_A_ROW, DiTTrainingModule, NonFiniteLoss
from training.launch import (COLLECTIVE_TIMEOUT, check_world_size, global_rank, is_peer_lost, peer_lost_message,
                             rank_zero_first)
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
                        image_size=meta.get("image_size", 256))
    repa_targets = None
    if args.repa_weight > 0:
        from data.repa_targets import load_targets
        repa_targets = load_targets(args.latent_dir, len(train_x), meta.get("stage1_run"))
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
        from training.memory import check_cuda_memory
        check_cuda_memory(args, log)
    module = build_module(args, log)
    if args.init_from:
        from training.init_from import initialise_from
        initialise_from(module, args.init_from, args.finetune, log, args.lora_rank, args.lora_alpha)
    elif args.finetune != "full":
        warnings.warn(f"--finetune {args.finetune} only applies with --init_from; training every weight")
    callbacks = [*callbacks, EarlyCheckpoint(ckpt_dir, args.early_checkpoint_step, log),
                 *sample_grid_callbacks(args.vavae_path, args.val_grid_users, args.val_grid_samples, module.info, out, log),
                 *identity_callbacks(args.val_identity_samples, args.classifier_steps)]
    trainer = build_trainer(args, precision, out, callbacks)
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


def build_trainer(args: TrainOptions, precision: str, out: Path, callbacks: Sequence[pl.Callback]) -> pl.Trainer:
    """The Trainer with stage 2's checkpoints (training/checkpoints.py), logs, progress and DDP settings."""
    ckpt_dir = out / "checkpoints"
    csv_logger = CSVLogger(out, name="lightning_logs", version="csv")
    loggers = [csv_logger, TensorBoardLogger(out, name="lightning_logs", version="tensorboard")]
    callbacks = [LastCheckpoint(ckpt_dir / "last.ckpt", args.checkpoint_every_n_steps),
                 BestCheckpoint(ckpt_dir / "best.ckpt"), RunFlags(args), progress_callback(),
                 KeepMetricsHistory(csv_logger), *callbacks]
    if args.finetune == "lora":
        callbacks.append(HalfPrecisionBase())
    devices = args.devices
    distributed = devices * args.num_nodes > 1
    # The latents, the fixed validation noise and the NaN flag are buffers: by default DDP would broadcast
    # them from rank 0 before every forward (the whole dataset each step) and overwrite the other ranks' flag.
    strategy = DDPStrategy(broadcast_buffers=False, timeout=COLLECTIVE_TIMEOUT) if distributed else "auto"
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


def resume_point(args: TrainOptions, module: DiTTrainingModule, ckpt_dir: Path, launcher: bool,
                 log=print) -> str | None:
    """last.ckpt's path if this run resumes from it (after checking that it fits this command), else None.
    A fresh run's launching process (`launcher`: global rank 0) first removes a best.ckpt whose last.ckpt is
    gone: it is an earlier run's."""
    last, best = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    if not last.is_file():
        if launcher and best.is_file():
            best.unlink(missing_ok=True)
            log(f"removed {best}: its run's last.ckpt is gone, so it is an earlier run's")
        return None
    previous = load_checkpoint(last, mmap=True)
    saved = checkpoint_info(previous)
    check_same_model(saved.model_config, module.info.model_config, last)
    check_same_data(saved, module.info, last)
    from training.finetune import check_same_lora
    check_same_lora(saved.lora, module.info.lora, last)
    module.info.latent_classifier = saved.latent_classifier   # trained on these latents: not trained again
    message = resume_message(previous, args, last)   # refuses the flags a resume cannot honour
    check_optimizer_layout(previous, module.param_groups(), last)
    world = args.devices * args.num_nodes
    steps_per_epoch = max(1, len(module.train_x) // (args.batch_size * world))
    check_length(previous, min(args.max_steps or math.inf, args.max_epochs * steps_per_epoch), last)
    log(message)
    # Batches are a function of the global step, so a mid-epoch resume is exact, which Lightning cannot know
    # (its warning, the same text on Lightning 2.2.1, 2.3.3, 2.4.0, 2.5.0 and 2.6.6, says it is not resumable).
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch")
    return str(last)


def validate_final_weights(trainer: pl.Trainer, module: DiTTrainingModule) -> None:
    """Validate the final weights when the cadence skipped them (--val_every_n_epochs, a --max_steps that ends
    mid-epoch), so that best.ckpt can be them. Only after this process trained: a rerun of a finished run
    trains and validates nothing."""
    best = next(c for c in trainer.callbacks if isinstance(c, BestCheckpoint))
    last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))
    if last.trained_here(trainer) and len(module.val_x) and best.validated_step != trainer.global_step:
        trainer.validate(module, verbose=False)


def divergence_message(err: NonFiniteLoss, args: TrainOptions, precision: str, ckpt_dir: Path) -> str:
    """What diverged, the checkpoint that is kept (only one that exists), and flag changes that can help on this
    device: bf16-mixed only where bf16 is native (a T4 would turn it back into 16-mixed), --use_qknorm only
    without --init_from (the published weights have no q/k norms)."""
    if err.kind == "loss":
        what = f"the loss became NaN/inf by step {err.step} (precision {precision}, lr {args.lr:g})"
    elif err.kind == "skipped":
        what = (f"the loss or its gradients stayed NaN/inf for {MAX_SKIPPED_IN_A_ROW} steps in a row up to step "
                f"{err.step} (precision {precision}, lr {args.lr:g}; loss scaling skipped them, {err.skipped} "
                "skipped in all, and lowering the scale did not help)")
    else:
        what = f"the weights became NaN/inf by step {err.step} (precision {precision}, lr {args.lr:g})"
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        try:
            step = f" (step {load_checkpoint(last, mmap=True)['global_step']})"
        except PipelineError:   # the divergence is the news, not an unreadable file
            step = ""
        kept = (f"The last good checkpoint, {last}{step}, is kept: rerun with changed flags to continue "
                "from it (the same flags would diverge the same way: the batches are a function of the step), "
                "or add --restart to start over.")
    else:
        kept = ("No checkpoint was written before it (the first comes after "
                f"--checkpoint_every_n_steps {args.checkpoint_every_n_steps} steps or the first validation): "
                "rerun with changed flags.")
    advice = [f"a lower --lr (e.g. {args.lr / 4:g})"]
    if not args.grad_clip or args.grad_clip > 1.0:
        advice.append("--grad_clip 1.0")
    if precision == "16-mixed":
        native_bf16 = bf16_supported("cuda" if uses_cuda(args.accelerator) else "cpu")
        advice.append("--precision bf16-mixed (same speed, no fp16 overflow)" if native_bf16 else
                      "--precision 32-true (this device has no native bf16; fp32 is slower but does not overflow)")
    elif precision == "bf16-mixed":
        advice.append("--precision 32-true")
    if not args.use_qknorm and not args.init_from:   # published weights have no q/k norms to load
        advice.append("--use_qknorm (needs --restart: it changes the model)")
    tries = f"{', '.join(advice[:-1])} or {advice[-1]}" if len(advice) > 1 else advice[0]
    return f"training stopped: {what}. {kept} Try {tries}."


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    """Resuming needs the architecture of the checkpoint; say which flags differ instead of a shape error."""
    keys = [k for k in sorted(set(saved) | set(current)) if k not in ("use_checkpoint", "class_dropout_prob")]
    diff = [f"{k}: {saved.get(k)} in the checkpoint, {current.get(k)} now"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise PipelineError(f"{path} was trained with a different model ({'; '.join(diff)}). Resume with the "
                            "same --model/--depth/--hidden_size/--num_heads flags and stage 1 latents, or pass "
                            "--restart (or another --output_dir) to train the new model from scratch.")


def check_same_data(saved: PipelineInfo, current: PipelineInfo, path: Path) -> None:
    """Resuming on other latents (stage 1 redone on other images or with another tokenizer) would mix two
    runs: the weights learnt one normalisation and user table, the rest of the run would use another."""
    diff = []
    if saved.users != current.users or saved.user_numbers != current.user_numbers:
        diff.append(f"users: {saved.users} in the checkpoint, {current.users} now")
    if saved.tokenizer_sha256 != current.tokenizer_sha256:
        diff.append(f"tokenizer sha256: {str(saved.tokenizer_sha256)[:12]}... "
                    f"({saved.tokenizer or '?'}) in the checkpoint, "
                    f"{current.tokenizer_sha256[:12]}... ({current.tokenizer or '?'}) now")
    for key in ("latent_mean", "latent_std"):
        if not torch.equal(getattr(saved, key).cpu(), getattr(current, key).cpu()):
            diff.append(f"latent statistics ({key.split('_')[1]}) differ")
    if diff:
        raise PipelineError(f"{path} was trained on other stage 1 latents ({'; '.join(diff)}): stage 1 was "
                            "redone since. Pass --restart to train anew on the new latents (or use another "
                            "--output_dir to keep the old run).")


def check_devices(args: TrainOptions) -> None:
    """GPUs asked for where CUDA is not usable, or a launcher (torchrun, srun) that started another number of
    processes than --devices x --num_nodes: a PipelineError saying what to do, before anything is loaded."""
    check_cuda_usable(args.accelerator, args.devices, args.num_nodes)
    check_world_size(args.devices, args.num_nodes)


def prepare_output_dir(args: TrainOptions, ckpt_dir: Path, log=print) -> None:
    """The output folder's once-per-run work, done by global rank 0 before any rank decides whether to resume
    (under torchrun and srun every rank starts at once; LOCAL_RANK is 0 once per node, and unset under srun)."""
    with rank_zero_first(args.devices, args.num_nodes, uses_cuda(args.accelerator)) as is_rank_zero:
        if is_rank_zero and args.restart:
            remove_previous_run(ckpt_dir, log)


def remove_previous_run(ckpt_dir: Path, log=print) -> None:
    """--restart: the old run's checkpoints go first, so that neither a stale best.ckpt (before the new
    run's first validation) nor a stale last.ckpt (resumed after an interruption) is ever picked up.
    Global rank 0 only (prepare_output_dir)."""
    for name in ("best.ckpt", "last.ckpt"):
        if (ckpt_dir / name).is_file():
            (ckpt_dir / name).unlink(missing_ok=True)
            log(f"--restart: removed the previous run's {ckpt_dir / name}")
