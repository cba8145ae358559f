"""Early stopping of the tokenizer on held-out PSNR, and the best-scored weights it keeps.

In the terms of Lightning's EarlyStopping (monitor: the held-out PSNR, mode "max", min_delta, patience): an
evaluation is progress when its PSNR exceeds the last progress by more than min_delta; after `patience`
evaluations without progress training stops, but never while the best PSNR seen is below a floor (stage 1's
TOKENIZER_WARN_DB by default: a tokenizer that has stopped rising below it has not learned the look yet, and the
caps, --steps and --max_minutes, decide). As Lightning's ModelCheckpoint(mode="max") would, the weights kept are
those of the highest PSNR seen, scored as the file stores them (fp16), so that the PSNR of the file is the PSNR of
the evaluation that chose it. The loop that uses it is tokenizer/train.py.
"""
import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from models.vavae import VAVAE, reconstruction_psnr


class StoredScorer:
    """Mean held-out PSNR (dB) of weights as the file would store them: fp16 weights loaded into an fp32 copy of
    the model kept in eval mode, so that the live model's weights, mode and optimiser are untouched."""

    def __init__(self, model: VAVAE, bank: torch.Tensor, autocast=nullcontext, batch_size: int = 32):
        """model: the model in training (copied once); bank: the uint8 images scored, (N, 3, H, W)."""
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.bank, self.autocast, self.batch_size = bank, autocast, batch_size

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        """The mean PSNR (dB) over the bank of `state` (models.vavae.storage_state_dict(model, half=True) of the
        model in training)."""
        self.model.load_state_dict(state)       # copy_ casts the fp16 values into the fp32 copy
        return reconstruction_psnr(self.model, self.bank, self.batch_size, self.autocast).mean().item()


@dataclass
class EarlyStopping:
    """Stop when the held-out PSNR has plateaued at or above `floor_db`; keep the best-scored weights.

    patience: evaluations without progress before stopping (0: never stops; the best weights are still tracked).
    min_delta_db: the rise over the last progress (dB) an evaluation must exceed to count as progress.
    floor_db: no stop while the best PSNR seen (dB) is below it.
    """
    patience: int
    min_delta_db: float
    floor_db: float
    best_db: float = -math.inf          # the highest PSNR seen, and the step and weights that scored it
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    reference_db: float = -math.inf     # the last progress (Lightning's best_score), and its step
    reference_step: int = 0
    wait: int = 0                       # evaluations since the last progress
    evaluations: int = 0
    below_floor_noted: bool = False

    def update(self, step: int, psnr_db: float, state: dict[str, torch.Tensor]) -> bool:
        """Record the evaluation at `step` of weights `state` (storage_state_dict(model, half=True)); True when
        training should stop."""
        self.evaluations += 1
        if psnr_db > self.best_db:
            self.best_db, self.best_step, self.best_state = psnr_db, step, state
        if psnr_db - self.min_delta_db > self.reference_db:
            self.reference_db, self.reference_step, self.wait = psnr_db, step, 0
        else:
            self.wait += 1
        return self.plateaued() and self.best_db >= self.floor_db

    def plateaued(self) -> bool:
        """Whether the last `patience` evaluations made no progress (never with patience 0)."""
        return self.patience > 0 and self.wait >= self.patience

    def below_floor_note(self) -> str | None:
        """Once per run, the line saying that a plateau below the floor does not stop training; else None."""
        if not self.plateaued() or self.best_db >= self.floor_db or self.below_floor_noted:
            return None
        self.below_floor_noted = True
        return (f"held-out PSNR has plateaued at {self.best_db:.2f} dB, below the {self.floor_db:g} dB floor "
                "(--early_stop_floor_db): training on to the cap")

    def stop_message(self, step: int, psnr_db: float) -> str:
        """Why training stopped on a plateau at `step`, whose evaluation scored `psnr_db`, and what is kept."""
        return (f"early stop at step {step}: held-out PSNR {psnr_db:.2f} dB has not risen by more than "
                f"{self.min_delta_db:g} dB over {self.reference_db:.2f} dB (step {self.reference_step}) for "
                f"{self.wait} evaluations; keeping step {self.best_step}'s weights ({self.best_db:.2f} dB)")

    def kept_message(self) -> str:
        """What is kept when a cap (steps or clock) ended the run."""
        return (f"keeping step {self.best_step}'s weights, the best of {self.evaluations} evaluations "
                f"({self.best_db:.2f} dB held-out PSNR)")
