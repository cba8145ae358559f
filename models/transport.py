"""Linear-path flow matching: the training objective and the samplers.

Convention (the reference's): t = 0 is noise, t = 1 is data, x_t = t * x1 + (1 - t) * x0, and the
model predicts the velocity u = x1 - x0. Sampling integrates dx/dt = v from t = 0 to t = 1.
"""
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x, t) -> v
SAMPLERS = ("euler", "heun", "ab2", "dopri5")
# Chosen by benchmarks/bench_sampling.py on the demo model: the 250-step Euler Frechet distance (0.99x)
# at 16 model evaluations per sample.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_SHIFT = "ab2", 16, 0.3
DEFAULT_GUIDANCE = 4.0   # classifier-free guidance scale of the seed's stage 3 command
# Classifier guidance only where 0.1 <= t <= 1: its weight (1 - t) / t grows without bound towards noise.
DEFAULT_CLASSIFIER_INTERVAL = (0.1, 1.0)


#################################################################################
#                                 Training                                      #
#################################################################################

def sample_timesteps(n: int, kind: str = "uniform", device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """t in [0, 1]: uniform, or logit-normal (sigmoid of a standard normal; more weight mid-path)."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator))
    raise ValueError(f"unknown timestep sampling '{kind}' (uniform or logit_normal)")


def flow_matching_loss(model: Callable, x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, cosine_weight: float = 0.0, negatives: torch.Tensor | None = None,
                       contrastive_weight: float = 0.0) -> torch.Tensor:
    """Per-sample loss: MSE between predicted and true velocity (+ optional 1 - cos over channels, and the
    contrastive term).

    model: (x_t, t, y) -> velocity, e.g. LightningDiT.forward. x1: (N, C, H, W) data latents (normalised);
    noise: x0, same shape, standard normal; t: (N,) float in [0, 1] (sample_timesteps); y: (N,) int64 labels.
    Contrastive flow matching (Delta-FM, Stoica et al., ICCV 2025, eq. 6): with negatives (N,) int64, the index
    of another sample of another class (-1: none), the loss subtracts contrastive_weight * ||v - (x1_j - x0_j)||^2,
    pushing each class's flow away from the others'. The paper's weight is 0.05.
    Returns (N,) float32 losses (>= 0 without the contrastive term; the cosine term adds at most
    2 * cosine_weight); the caller averages.
    """
    t_ = t.view(-1, *([1] * (x1.dim() - 1)))
    x_t = t_ * x1 + (1 - t_) * noise
    target = x1 - noise
    pred = model(x_t, t, y).float()
    dims = tuple(range(1, x1.dim()))
    loss = (pred - target).pow(2).mean(dim=dims)
    if negatives is not None and contrastive_weight > 0:
        has_negative = negatives >= 0
        negative_target = target[negatives.clamp(min=0)]
        loss = loss - contrastive_weight * has_negative * (pred - negative_target).pow(2).mean(dim=dims)
    if cosine_weight > 0:
        cos = F.cosine_similarity(pred, target, dim=1)      # across channels, per position
        loss = loss + cosine_weight * (1 - cos).flatten(1).mean(dim=1)
    return loss


def other_class_pairs(y: torch.Tensor) -> torch.Tensor:
    """For each sample i of a batch, the index j of a random sample of another class (y[j] != y[i]), or -1
    where the batch holds no other class: the negatives of contrastive flow matching (flow_matching_loss).
    y: (N,) int64. Returns (N,) int64."""
    scores = torch.rand(len(y), len(y), device=y.device).masked_fill(y[:, None] == y[None, :], -1.0)
    best, index = scores.max(dim=1)
    return torch.where(best >= 0, index, -1)


#################################################################################
#                                 Guidance                                      #
#################################################################################

def guided_velocity(model: Callable, y: torch.Tensor, null_class: int, scale: float = 1.0,
                    interval_start: float = 0.0, interval_end: float = 1.0,
                    guide_model: Callable | None = None) -> VelocityFn:
    """v = v_bad + w (v_good - v_bad), the one guided velocity of every sampler.

    v_good is the model's conditional velocity. v_bad is, by default, its unconditional one (classifier-free
    guidance; both in one batched forward), or, with guide_model, that model's *conditional* velocity for the
    same y (autoguidance, Karras et al. 2024: an earlier, weaker checkpoint of the same model; two forwards).
    Guidance acts only where interval_start <= t <= interval_end (t = 0 noise, 1 data; a limited interval,
    Kynkaanniemi et al. 2024); elsewhere the conditional model alone runs (half the cost).
    y: (N,) int64 labels; null_class: the unconditional label (the model's num_classes); scale w: 1 is no
    guidance. Returns a VelocityFn taking x (N, C, H, W) and t (a 0-d or (N,) float in [0, 1]) and giving a
    float32 velocity of x's shape.
    """
    null = torch.full_like(y, null_class)
    both = torch.cat([y, null])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.expand(x.shape[0]) if t.dim() == 0 else t
        if scale == 1.0 or not interval_start <= float(tb[0]) <= interval_end:
            return model(x, tb, y).float()
        if guide_model is not None:
            v_good, v_bad = model(x, tb, y).float(), guide_model(x, tb, y).float()
        else:
            v_good, v_bad = model(torch.cat([x, x]), torch.cat([tb, tb]), both).float().chunk(2)
        return v_bad + scale * (v_good - v_bad)
    return velocity


def classifier_guided_velocity(velocity: VelocityFn, log_prob_gradient: Callable, y: torch.Tensor, scale: float,
                               interval_start: float = DEFAULT_CLASSIFIER_INTERVAL[0],
                               interval_end: float = DEFAULT_CLASSIFIER_INTERVAL[1]) -> VelocityFn:
    """v + scale * (1 - t) / t * grad_x log p(y | x_t, t): classifier guidance on a flow-matching velocity.

    For the linear path x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I), the score is s = (t v - x_t) / (1 - t), so
    v = (x_t + (1 - t) s) / t; conditioning adds grad log p(y | x_t) to s (Dhariwal & Nichol 2021, eq. 10-12),
    hence the term. Its (1 - t) / t grows without bound towards the noise end, where a classifier knows least:
    it acts only where interval_start <= t <= interval_end (interval_start > 0 keeps it finite).
    log_prob_gradient: (x, t (N,), y) -> grad_x log p(y | x, t) (models/latent_classifier.py). y: (N,) int64
    classes; scale 0 is none. Returns a VelocityFn like guided_velocity's.
    """
    if scale == 0.0:
        return velocity

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = velocity(x, t)
        tb = t.expand(x.shape[0]) if t.dim() == 0 else t
        t0 = float(tb[0])
        if not interval_start <= t0 <= interval_end or t0 <= 0.0:
            return v
        return v + scale * (1 - t0) / t0 * log_prob_gradient(x, tb, y)
    return guided


def guidance_switches(scale: float, interval_start: float, interval_end: float) -> tuple[float, ...]:
    """The times where guided_velocity's field changes abruptly (sample_ode's restart_at): the ends of a
    guidance interval strictly inside (0, 1); none without guidance."""
    if scale == 1.0:
        return ()
    return tuple(t for t in (interval_start, interval_end) if 0.0 < t < 1.0)


#################################################################################
#                                 Samplers                                      #
#################################################################################

def time_grid(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """num_steps + 1 points from 0 to 1; shift s < 1 spends more steps near the noise end."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (got {shift}): the grid collapses at 0 and runs backwards below")
    t = torch.linspace(0.0, 1.0, num_steps + 1, device=device, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


class CountedVelocity:
    """A velocity function that counts its calls: the model evaluations (NFE) of a sampler run, the adaptive
    dopri5's included (under classifier-free guidance each is one batched cond+uncond forward, under
    autoguidance two forwards: the model's and the guide's)."""

    def __init__(self, velocity: VelocityFn):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.velocity(x, t)


@torch.no_grad()   # not inference_mode: classifier guidance takes a gradient inside the velocity
def sample_ode(velocity: VelocityFn, x0: torch.Tensor, num_steps: int, sampler: str, shift: float,
               atol: float = 1e-6, rtol: float = 1e-3,
               restart_at: float | Sequence[float] = ()) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from noise x0 at t=0 to data at t=1 (the CLI defaults are DEFAULT_*).

    velocity: (x, t) -> v, t a 0-d float tensor in [0, 1] (guided_velocity). x0: (N, C, H, W) standard normal
    noise. num_steps: steps of the time_grid (ignored by the adaptive dopri5, which stops at atol/rtol);
    model evaluations are num_steps for euler and ab2, 2 * num_steps - 1 for heun. Returns (N, C, H, W)
    float32 latents at t = 1, in the normalised latent space the model was trained in.
    Raises ValueError for an unknown sampler or shift <= 0, RuntimeError for dopri5 without torchdiffeq.

    restart_at: time(s) where v changes abruptly (the ends of a guidance interval, guidance_switches). AB2
    starts afresh at the first step at or past each instead of extrapolating across it from the other field's
    velocity; the ends are compared as the velocity function sees t (float32), so a restart lands on the switch.
    """
    switches = (restart_at,) if isinstance(restart_at, (int, float)) else tuple(restart_at)
    if sampler == "dopri5":
        return _dopri5(velocity, x0, atol, rtol)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    ts = time_grid(num_steps, shift, x0.device)
    x = x0.float()
    v_prev, h_prev = None, 1.0
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        h = float(t_next - t)
        v = velocity(x, t.float().to(x0.device))
        if sampler == "euler":
            x = x + h * v
        elif sampler == "heun":
            # Trapezoid corrector; the last step stays Euler to keep NFE = 2 * steps - 1.
            x_pred = x + h * v
            if i < num_steps - 1:
                v_next = velocity(x_pred, t_next.float().to(x0.device))
                x = x + 0.5 * h * (v + v_next)
            else:
                x = x_pred
        else:
            # Adams-Bashforth 2 on a non-uniform grid: second order, one evaluation per step,
            # reuses the previous velocity (flow-matching paths are smooth in t).
            if v_prev is None or any(_crossed(float(ts[i - 1].float()), float(t.float()), s) for s in switches):
                x = x + h * v
            else:
                r = h / h_prev
                x = x + h * ((1 + 0.5 * r) * v - 0.5 * r * v_prev)
            v_prev, h_prev = v, h
    return x


def _crossed(t_prev: float, t: float, switch: float) -> bool:
    """Whether the field switched between the steps at t_prev and t: guidance on from the step with t >= start
    (start in (t_prev, t]), off from the first step with t > end (end in [t_prev, t))."""
    return t_prev < switch <= t or t_prev <= switch < t


def _dopri5(velocity: VelocityFn, x0: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    try:   # optional: only the dopri5 sampler needs torchdiffeq (its import, with scipy, takes ~0.45 s)
        from torchdiffeq import odeint
    except ImportError as err:
        raise RuntimeError("the dopri5 sampler needs torchdiffeq: pip install torchdiffeq") from err
    t = torch.tensor([0.0, 1.0], device=x0.device)
    return odeint(lambda t, x: velocity(x, t), x0.float(), t, method="dopri5", atol=atol, rtol=rtol)[-1]
