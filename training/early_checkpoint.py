"""checkpoints/early.ckpt: one early EMA snapshot of the run, the free guide of autoguidance.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") guides the model
with a weaker version of itself trained on the same data; an early snapshot of the same run is one at no
extra training cost. Stage 3 uses it with --guidance_checkpoint <output_dir>/checkpoints/early.ckpt.
"""
from pathlib import Path

import pytorch_lightning as pl

from common.io import save_torch

EARLY_NAME = "early.ckpt"
# Karras et al. find the best guides much weaker than the model (a fraction of its training); 1/8 of the run
# is weak but already past the first steps where the EMA is still mostly the random init.
DEFAULT_EARLY_FRACTION = 1 / 8


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
