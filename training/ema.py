"""The exponential moving average (EMA) of the DiT's weights, which validation and sampling use: DiT's update_ema
(facebookresearch/DiT, train.py) and the decay by step, constant with a warm-up or EDM2's power function."""
from dataclasses import dataclass

import torch


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for the trained parameters (frozen ones equal their EMA already;
    with LoRA they are the same tensors). One fused multi-tensor lerp; decay is a Python float (no device sync)."""
    pairs = [(e, p.detach()) for e, p in zip(ema_model.parameters(), model.parameters()) if p.requires_grad]
    if pairs:
        ema_params, params = map(list, zip(*pairs))
        torch._foreach_lerp_(ema_params, params, 1 - decay)


def power_ema_gamma(sigma_rel: float) -> float:
    """EDM2's exponent gamma of a power-function EMA of relative standard deviation sigma_rel (the width of the
    averaging window as a fraction of training so far): the root of sigma_rel^2 = (g+1) / ((g+2)^2 (g+3))
    (Karras et al. 2024, eq. 2-3; edm2 training/phema.py solves the same cubic). sigma_rel in (0, 0.28)."""
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel must be in (0, 0.28) (got {sigma_rel}); 0.05-0.15 are EDM2's useful range")
    # The right side falls monotonically in g on [0, inf): bisection, no root-finder needed.
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel ** 2:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass(frozen=True)
class EMASchedule:
    """The EMA decay after each optimizer step: `schedule(step)`, step counted from 1. No state: a function of the
    step, so a resumed run continues the same schedule."""
    decay: float = 0.9995          # --ema_decay: the constant decay, reached after its warm-up
    gamma: float | None = None     # the power function's exponent (--ema_std through power_ema_gamma), or None

    @classmethod
    def from_flags(cls, ema_decay: float, ema_std: float | None) -> "EMASchedule":
        """Stage 2's --ema_decay and --ema_std (the power function when given)."""
        return cls(ema_decay, power_ema_gamma(ema_std) if ema_std else None)

    def __call__(self, step: int) -> float:
        """The decay after optimizer step `step` (from 1).

        With a gamma, EDM2's power-function EMA (Karras et al. 2024, eq. 3 with sec. 3.1's gamma(sigma_rel)):
        beta = (1 - 1/step)^(gamma + 1), an average over a fixed *fraction* of the run so far, so an early
        checkpoint is not held back by old weights and a long run still averages widely. Otherwise a constant
        decay with a warm-up, (1 + step) / (10 + step) until it reaches `decay` (itself a power function with
        gamma = 8, sigma_rel ~0.09, until then).
        """
        if self.gamma is not None:
            return (1 - 1 / step) ** (self.gamma + 1)
        return min(self.decay, (1 + step) / (10 + step))
