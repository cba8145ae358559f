"""Stage 2 stops when training diverges, and counts the steps that fp16 loss scaling skips (DivergenceGuard).

Without loss scaling (32-true, bf16-mixed) the first NaN/inf loss stops the run. Under 16-mixed a step with NaN/inf
gradients is skipped and the scale halved, as AMP does; only MAX_SKIPPED_IN_A_ROW skipped steps in a row stop it.
Either way the weights and their EMA must stay finite. Everything is counted on the device, without a host sync in
the step; the flags are looked at every NONFINITE_CHECK_EVERY steps (one sync) and before every checkpoint, so a
checkpoint is only written while the run is sound. train_dit turns NonFiniteLoss into advice (resume.py).
"""
from typing import Any

import pytorch_lightning as pl
import torch

from common.errors import PipelineError
from training import lightning_private

NONFINITE_CHECK_EVERY = 50   # steps between looks at the device-side flags (a host-device sync)
# From GradScaler's 65536, 20 halvings in a row is a scale of 2**-4: no overflow left to remove, the loss itself is
# NaN/inf.
MAX_SKIPPED_IN_A_ROW = 20


class NonFiniteLoss(PipelineError):
    """Training diverged. kind: 'loss' (a NaN/inf loss without loss scaling), 'skipped' (loss scaling skipped
    MAX_SKIPPED_IN_A_ROW steps in a row, the last one `step`) or 'weights' (the weights or the EMA hold NaN/inf);
    skipped: steps that loss scaling skipped in the run so far."""
    def __init__(self, step: int, kind: str = "loss", skipped: int = 0):
        self.step, self.kind, self.skipped = step, kind, skipped
        what = {"loss": f"the training loss became NaN or infinite by step {step}",
                "skipped": f"loss scaling skipped {MAX_SKIPPED_IN_A_ROW} steps in a row up to step {step} "
                           "(NaN/inf loss or gradients)",
                "weights": f"the weights or their EMA hold NaN/inf values at step {step}"}[kind]
        super().__init__(what)


def loss_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The GradScaler of 16-mixed precision; None under bf16-mixed and 32-true."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


class DivergenceGuard(pl.Callback):
    """Raises NonFiniteLoss when training diverged (see the module docstring) and keeps the count of skipped steps,
    which checkpoints carry (`skipped_steps`) and metrics.csv logs under 16-mixed.

    The module it guards has `model` and `ema`. The flags are rank-local tensors (no DDP buffer); every rank raises
    with the first bad step over all ranks, so each prints the same message.
    """
    def __init__(self):
        self.resumed_skipped = 0   # skipped steps before this run resumed
        self.flags: dict[str, torch.Tensor] = {}
        self.pending: tuple[torch.Tensor, int] | None = None   # (scale before, step) of a scaled step not yet counted

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.resumed_skipped = checkpoint.get("skipped_steps", 0)   # the count goes on over a resume

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # first_bad_loss, skip_limit_step: the step where it happened, -1 if it did not.
        def scalar(value: int) -> torch.Tensor:
            return torch.full((), value, dtype=torch.int64, device=pl_module.device)
        self.flags = {"first_bad_loss": scalar(-1), "skipped": scalar(self.resumed_skipped),
                      "skipped_in_a_row": scalar(0), "skip_limit_step": scalar(-1)}
        self.pending = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if loss_scaler(trainer) is None:   # with a scaler, GradScaler skips the step (counted below)
            first = self.flags["first_bad_loss"]
            first.masked_fill_(~torch.isfinite(loss.detach()) & (first < 0), trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        scaler = loss_scaler(trainer)
        if scaler is not None:
            self.pending = (lightning_private.loss_scale(scaler), trainer.global_step)

    @torch.no_grad()
    def count_skipped_step(self, trainer: pl.Trainer) -> None:
        """GradScaler lowers its scale exactly when it skipped the step (NaN/inf gradients); it only grows
        otherwise. Called after the step, in whichever hook comes first (a checkpoint may be written before this
        callback's on_train_batch_end)."""
        if self.pending is None:
            return
        (scale_before, step), self.pending = self.pending, None
        skipped = (lightning_private.loss_scale(loss_scaler(trainer)) < scale_before).long()
        self.flags["skipped"] += skipped
        self.flags["skipped_in_a_row"].mul_(skipped).add_(skipped)
        reached = (self.flags["skipped_in_a_row"] >= MAX_SKIPPED_IN_A_ROW) & (self.flags["skip_limit_step"] < 0)
        self.flags["skip_limit_step"].masked_fill_(reached, step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx) -> None:
        self.count_skipped_step(trainer)
        if loss_scaler(trainer) is not None:   # logged as a device tensor: the logger syncs when it writes
            pl_module.log("skipped_steps", self.flags["skipped"].float(), on_step=True, on_epoch=False)
        if trainer.global_step % NONFINITE_CHECK_EVERY == 0 or trainer.global_step < 10:
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if not self.flags:   # saved outside training (nothing trained, nothing to check)
            checkpoint["skipped_steps"] = self.resumed_skipped
            return
        self.count_skipped_step(trainer)
        self.check(trainer, pl_module)   # a checkpoint is only written while the loss and the weights are finite
        checkpoint["skipped_steps"] = int(self.flags["skipped"])

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise NonFiniteLoss if any rank's loss was NaN/inf since the start (without loss scaling), if loss
        scaling skipped MAX_SKIPPED_IN_A_ROW steps in a row, or if the weights or the EMA are no longer finite
        (one device sync)."""
        none = torch.iinfo(torch.int64).max
        weights = [p for m in (pl_module.model, pl_module.ema) for p in m.parameters()]
        weights_finite = torch.stack([torch.isfinite(p).all() for p in weights]).all()
        steps = torch.stack([self.flags["first_bad_loss"], self.flags["skip_limit_step"],
                             torch.where(weights_finite, -1, trainer.global_step)])
        first = trainer.strategy.reduce(torch.where(steps >= 0, steps, none), reduce_op="min").tolist()
        for kind, step in zip(("loss", "skipped", "weights"), first):
            if step != none:
                raise NonFiniteLoss(step, kind, skipped=int(self.flags["skipped"]))
