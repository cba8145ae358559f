"""Stage 2's checkpoint-writing callbacks, the same on every Lightning version from 2.3.3 on (whether and how a
run resumes from them is training/resume.py; the run lock is common/lock.py's, `LOCK_NAME`).

- last.ckpt: everything a resume needs (weights, EMA, optimizer, loops, this run's flags); written every
  --checkpoint_every_n_steps, after every validation and at the last step, whatever the cadence.
- best.ckpt: for sampling only: the EMA weights with the lowest EMA validation loss and the pipeline info
  (models/checkpoint.sampling_checkpoint); no optimizer state, no training weights. The final weights are
  always validated (train_dit.validate_final_weights), so best.ckpt can pick them.
- early.ckpt: one early EMA snapshot of the run (the EMA weights and the pipeline info), the free guide of
  autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): it guides
  the model with a weaker version of itself trained on the same data, here at no extra training cost.
  Stage 3 uses it with --guidance_checkpoint <output_dir>/checkpoints/early.ckpt.

Lightning's ModelCheckpoint is not used: which of its hooks write last.ckpt after the last step changed
between versions (only 2.5.3+ saves in on_train_end: on 2.3.3 `--max_steps 7 --checkpoint_every_n_steps 5`
left step 5 in last.ckpt), and it cannot leave the training weights out of best.ckpt. These callbacks only
use the Trainer's public API (save_checkpoint, global_step, max_steps, callback_metrics, strategy.barrier).
"""
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

from common.io import save_torch
from models.checkpoint import load_checkpoint, sampling_checkpoint
from training.cli import TrainOptions
from training.optim import BETA1

FLAGS_KEY = "stage2_flags"   # the flags of the run that wrote a last.ckpt (a dict of TrainOptions)
LOCK_NAME = "stage2.lock"
EARLY_NAME = "early.ckpt"
# Karras et al. find the best guides much weaker than the model (a fraction of its training); 1/8 of the run
# is weak but already past the first steps where the EMA is still mostly the random init.
DEFAULT_EARLY_FRACTION = 1 / 8


#################################################################################
#                                  Callbacks                                    #
#################################################################################

class LastCheckpoint(pl.Callback):
    """last.ckpt every `every_n_steps` optimizer steps, after each validation and at the last step.

    The last step reached by --max_steps is saved in on_train_batch_end, like the periodic saves (a resume
    with a larger --max_steps then continues mid-epoch exactly); a run that ends at an epoch end is saved
    in on_train_end, after that epoch's validation. Every rank calls Trainer.save_checkpoint (rank 0 writes).
    """
    def __init__(self, path: Path, every_n_steps: int):
        self.path, self.every_n_steps = Path(path), every_n_steps
        self.saved_step = self.start_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_step = self.start_step = trainer.global_step   # 0, or the step last.ckpt was resumed from

    def trained_here(self, trainer: pl.Trainer) -> bool:
        """Whether this process trained steps (a rerun of a finished run trains none)."""
        return 0 <= self.start_step < trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 or trainer.global_step == trainer.max_steps:
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self.saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)   # said, or Lightning 2.6 logs that it defaulted
            self.saved_step = trainer.global_step


class BestCheckpoint(pl.Callback):
    """best.ckpt (sampling only, see the module docstring) whenever the EMA validation loss is the lowest so far.

    The score to beat is read from best.ckpt itself when resuming (it may come from the final validation,
    which happens after the last last.ckpt); a fresh run's first validation always writes it.
    """
    def __init__(self, path: Path, monitor: str = "val_loss"):
        self.path, self.monitor = Path(path), monitor
        self.best_score: float | None = None
        self.validated_step = -1   # the global step of the weights validated last

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path and self.path.is_file():
            self.best_score = load_checkpoint(self.path, mmap=True).get(self.monitor)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or score is None:
            return
        score, self.validated_step = float(score), trainer.global_step   # synchronised: the same on every rank
        if math.isfinite(score) and (self.best_score is None or score < self.best_score):
            if trainer.is_global_zero:
                save_torch(sampling_checkpoint(pl_module.ema.state_dict(), pl_module.info, trainer.global_step,
                                               trainer.current_epoch, score), self.path)
            trainer.strategy.barrier("best.ckpt")
            self.best_score = score


def early_step(total_steps: int, requested: int | None) -> int:
    """The step at which the snapshot is kept: `requested`, or DEFAULT_EARLY_FRACTION of the run (at least 1);
    0 means none."""
    if requested is not None:
        return max(0, requested)
    return max(1, round(total_steps * DEFAULT_EARLY_FRACTION))


class EarlyCheckpoint(pl.Callback):
    """Write a slim checkpoint (the EMA weights and the pipeline info, no optimizer state: a quarter of
    last.ckpt) once, after the optimizer step that reaches `early_step`; global rank 0 only.

    A fresh run (or one resumed before that step) removes an early.ckpt already in the folder, with step 0
    too: it belongs to another run. A run resumed past the step keeps the one it wrote.
    """
    def __init__(self, ckpt_dir: Path, requested_step: int | None, log=print):
        self.path = Path(ckpt_dir) / EARLY_NAME
        self.requested, self.note = requested_step, log   # not self.log: Lightning sets that on callbacks
        self.step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = int(trainer.estimated_stepping_batches)
        self.step = early_step(total, self.requested)
        if not trainer.is_global_zero:
            return
        fresh = trainer.global_step == 0 or trainer.global_step < self.step   # this run has not written one yet
        if fresh and self.path.is_file():
            self.path.unlink()
            self.note(f"removed {self.path}: it was another run's early snapshot")
        if self.step > total:
            self.note(f"note: --early_checkpoint_step {self.step} is past the run's {total} steps: no {EARLY_NAME}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx) -> None:
        if trainer.global_step != self.step or self.step == 0 or not trainer.is_global_zero:
            return
        ema = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if k.startswith("ema.")}
        save_torch({"state_dict": ema, "pipeline": pl_module.info.to_dict(), "global_step": self.step}, self.path)


# Flags that say nothing about how the run trains, or that other checks cover (model, data, LoRA).
NOT_COMPARED = {"latent_dir", "output_dir", "restart", "check_memory", "skip_memory_check", "model", "depth",
                "hidden_size", "num_heads", "use_qknorm", "lora_rank", "lora_alpha"}


def comparable_flags(args: TrainOptions) -> dict[str, Any]:
    """The flags a resume compares, by name; --init_from as a real path (another spelling of the same file,
    e.g. from another working folder, is no change)."""
    flags = {k: v for k, v in vars(args).items() if k not in NOT_COMPARED}
    if flags.get("init_from"):
        flags["init_from"] = os.path.realpath(flags["init_from"])
    return flags


class RunFlags(pl.Callback):
    """Stores this run's flags in every checkpoint, and after a resume puts this command's optimizer flags
    (--lr, --beta2, --weight_decay, --backbone_lr_scale) back: restoring the optimizer state brought back
    the previous run's values in its parameter groups."""
    def __init__(self, args: TrainOptions):
        self.flags = comparable_flags(args)
        self.betas, self.weight_decay = (BETA1, args.beta2), args.weight_decay

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[FLAGS_KEY] = self.flags

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group, fresh in zip(optimizer.param_groups, pl_module.param_groups()):
                group["lr"] = group["base_lr"] = fresh["lr"]   # the warm-up ramps from base_lr
                group["betas"] = self.betas
                group["weight_decay"] = fresh.get("weight_decay", self.weight_decay)
