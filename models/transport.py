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
    x_t = linear_path(x1, noise, t)
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


def linear_path(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = t * x1 + (1 - t) * x0: the point at time t between noise x0 (t = 0) and data x1 (t = 1) that training
    regresses the velocity at and that real-anchored sampling (SDEdit, Meng et al. 2022) starts from.
    x1, noise: (N, ...) float; t: a float, or (N,) float in [0, 1], one time per sample. Returns x1's shape."""
    t_ = t.view(-1, *([1] * (x1.dim() - 1))) if torch.is_tensor(t) else t
    return t_ * x1 + (1 - t_) * noise


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

Scale = float | torch.Tensor   # a guidance scale: one for the batch, or (N,) float, one per sample


def guided_velocity(model: Callable, y: torch.Tensor, null_class: int, scale: Scale = 1.0,
                    interval_start: float = 0.0, interval_end: float = 1.0,
                    guide_model: Callable | None = None) -> VelocityFn:
    """v = v_bad + w (v_good - v_bad), the one guided velocity of every sampler.

    v_good is the model's conditional velocity. v_bad is, by default, its unconditional one (classifier-free
    guidance; both in one batched forward), or, with guide_model, that model's *conditional* velocity for the
    same y (autoguidance, Karras et al. 2024: an earlier, weaker checkpoint of the same model; two forwards).
    Guidance acts only where interval_start <= t <= interval_end (t = 0 noise, 1 data; a limited interval,
    Kynkaanniemi et al. 2024); elsewhere the conditional model alone runs (half the cost).
    y: (N,) int64 labels; null_class: the unconditional label (the model's num_classes); scale w: 1 is no
    guidance, a float or an (N,) float tensor of one scale per sample. Returns a VelocityFn taking x (N, ...) and
    t (a 0-d or (N,) float in [0, 1]: with per-sample times, guidance acts on the samples inside the interval)
    and giving a float32 velocity of x's shape.
    """
    null = torch.full_like(y, null_class)
    both = torch.cat([y, null])
    unguided = no_guidance(scale)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = t.expand(x.shape[0]) if t.dim() == 0 else t
        inside = in_interval(tb, interval_start, interval_end)
        if unguided or not inside.any():
            return model(x, tb, y).float()
        if guide_model is not None:
            v_good, v_bad = model(x, tb, y).float(), guide_model(x, tb, y).float()
        else:
            v_good, v_bad = model(torch.cat([x, x]), torch.cat([tb, tb]), both).float().chunk(2)
        guided = v_bad + per_sample(scale, x) * (v_good - v_bad)
        return guided if inside.all() else torch.where(per_sample(inside, x), guided, v_good)
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
    classes; scale 0 is none. Returns a VelocityFn like guided_velocity's (per-sample times t (N,) included).
    """
    if scale == 0.0:
        return velocity

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = velocity(x, t)
        tb = t.expand(x.shape[0]) if t.dim() == 0 else t
        t64 = tb.double()   # float64 as the weight below was always computed (a Python float before)
        active = in_interval(tb, interval_start, interval_end) & (t64 > 0.0)
        if not active.any():
            return v
        safe_t = torch.where(active, t64, 1.0)   # no 0 / 0 for the samples left alone
        weight = per_sample(torch.where(active, scale * (1 - t64) / safe_t, 0.0), x)
        guided_v = v + weight * log_prob_gradient(x, tb, y)
        return guided_v if active.all() else torch.where(per_sample(active, x), guided_v, v)
    return guided


def no_guidance(scale: Scale) -> bool:
    """Whether a guidance scale (a float, or (N,) per sample) is 1 for every sample: the conditional model alone."""
    return bool((torch.as_tensor(scale) == 1.0).all())


def in_interval(t: torch.Tensor, start: float, end: float) -> torch.Tensor:
    """start <= t <= end per sample, (N,) or 0-d bool; compared in float64, as the velocity sees t (float32)
    against the flag values exactly (a float32 cast of the ends could move a grid point across them)."""
    t64 = t.double()
    return (start <= t64) & (t64 <= end)


def per_sample(value: Scale, x: torch.Tensor) -> float | torch.Tensor:
    """A per-sample factor to multiply x (N, ...) by: a float (or 0-d tensor) as a Python float, an (N,) tensor
    viewed as (N, 1, ...) in float32 (bool stays bool, for torch.where); a float64 value is rounded to float32 once,
    as Python floats are when they multiply a float32 tensor, so a factor equal for every sample gives the same
    bits either way."""
    if not torch.is_tensor(value):
        return value
    if value.dim() == 0:
        return value.item()
    shaped = value.view(-1, *([1] * (x.dim() - 1)))
    return shaped if shaped.dtype == torch.bool else shaped.float()


def guidance_switches(scale: Scale, interval_start: float, interval_end: float) -> tuple[float, ...]:
    """The times where guided_velocity's field changes abruptly (sample_ode's restart_at): the ends of a
    guidance interval strictly inside (0, 1); none without guidance (scale 1 for every sample)."""
    if no_guidance(scale):
        return ()
    return tuple(t for t in (interval_start, interval_end) if 0.0 < t < 1.0)


#################################################################################
#                                 Samplers                                      #
#################################################################################

def time_grid(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu",
              t_start: torch.Tensor | None = None) -> torch.Tensor:
    """num_steps + 1 float64 points from 0 to 1; shift s < 1 spends more steps near the noise end
    (t = s u / (1 + (s - 1) u) of u evenly spaced).

    t_start: (N,) float in [0, 1), the time each sample starts at (real-anchored sampling): then (num_steps + 1, N),
    one column per sample, the same schedule's part from t_start to 1 (u evenly spaced from the u of t_start, which
    is t / (s - (s - 1) t)), starting at t_start exactly. Raises ValueError for shift <= 0."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (got {shift}): the grid collapses at 0 and runs backwards below")
    t = torch.linspace(0.0, 1.0, num_steps + 1, device=device, dtype=torch.float64)
    if t_start is not None:
        t_start = t_start.to(device=device, dtype=torch.float64)
        u_start = t_start / (shift - (shift - 1) * t_start)
        t = u_start[None] + (1 - u_start[None]) * t[:, None]
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    if t_start is not None:
        t[0] = t_start
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
               atol: float = 1e-6, rtol: float = 1e-3, restart_at: float | Sequence[float] = (),
               t_start: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from noise x0 at t=0 to data at t=1 (the CLI defaults are DEFAULT_*).

    velocity: (x, t) -> v, t a 0-d float tensor in [0, 1] (guided_velocity), or (N,) with t_start. x0: (N, C, H, W)
    standard normal noise. num_steps: steps of the time_grid (ignored by the adaptive dopri5, which stops at
    atol/rtol); model evaluations are num_steps for euler and ab2, 2 * num_steps - 1 for heun. Returns (N, C, H, W)
    float32 latents at t = 1, in the normalised latent space the model was trained in.
    Raises ValueError for an unknown sampler or shift <= 0, RuntimeError for dopri5 without torchdiffeq.

    t_start: (N,) float in [0, 1), each sample's start (real-anchored sampling, SDEdit): x0 is then the point at
    t_start of each path (linear_path) and each sample integrates its own part of the schedule, from t_start to 1,
    in num_steps steps (time_grid; dopri5: over [t_start, 1]), the velocity seeing each sample's own t (N,). None:
    every sample from t = 0 (t_start zero gives the same bits).

    restart_at: time(s) where v changes abruptly (the ends of a guidance interval, guidance_switches). AB2
    starts afresh at the first step at or past each instead of extrapolating across it from the other field's
    velocity, sample by sample; the ends are compared as the velocity function sees t (float32), so a restart
    lands on the switch.
    """
    switches = (restart_at,) if isinstance(restart_at, (int, float)) else tuple(restart_at)
    if sampler == "dopri5":
        return _dopri5(velocity, x0, atol, rtol, t_start)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    ts = time_grid(num_steps, shift, x0.device, t_start)
    x = x0.float()
    v_prev, h_prev = None, None
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        h_exact = t_next - t   # float64, (N,) with t_start: each sample's own step
        h = per_sample(h_exact, x)
        v = velocity(x, t.float())
        if sampler == "euler":
            x = x + h * v
        elif sampler == "heun":
            # Trapezoid corrector; the last step stays Euler to keep NFE = 2 * steps - 1.
            x_pred = x + h * v
            if i < num_steps - 1:
                v_next = velocity(x_pred, t_next.float())
                x = x + 0.5 * h * (v + v_next)
            else:
                x = x_pred
        else:
            restart = (torch.ones_like(t, dtype=torch.bool) if v_prev is None
                       else _crossed_any(ts[i - 1].float(), t.float(), switches))
            x = _ab2_step(x, v, v_prev, h_exact, h_prev, restart)
            v_prev, h_prev = v, h_exact
    return x


def _ab2_step(x: torch.Tensor, v: torch.Tensor, v_prev: torch.Tensor | None, h: torch.Tensor,
              h_prev: torch.Tensor | None, restart: torch.Tensor) -> torch.Tensor:
    """One Adams-Bashforth 2 step on a non-uniform grid: second order, one evaluation per step, reusing the
    previous velocity (flow-matching paths are smooth in t); an Euler step for the samples that `restart`
    (0-d or (N,) bool: the first step, or a guidance switch crossed). h, h_prev: float64 step sizes, 0-d or (N,)."""
    euler = x + per_sample(h, x) * v
    if restart.all():
        return euler
    r = h / h_prev
    ab2 = x + per_sample(h, x) * (per_sample(1 + 0.5 * r, x) * v - per_sample(0.5 * r, x) * v_prev)
    return ab2 if not restart.any() else torch.where(per_sample(restart, x), euler, ab2)


def _crossed_any(t_prev: torch.Tensor, t: torch.Tensor, switches: Sequence[float]) -> torch.Tensor:
    """Whether the field switched between the steps at t_prev and t (0-d or (N,) float32, as the velocity sees
    them), per sample: guidance on from the step with t >= start (start in (t_prev, t]), off from the first step
    with t > end (end in [t_prev, t)). Compared in float64 against the switches' exact values."""
    t_prev, t = t_prev.double(), t.double()
    crossed = torch.zeros_like(t, dtype=torch.bool)
    for switch in switches:
        crossed |= ((t_prev < switch) & (switch <= t)) | ((t_prev <= switch) & (switch < t))
    return crossed


def _dopri5(velocity: VelocityFn, x0: torch.Tensor, atol: float, rtol: float,
            t_start: torch.Tensor | None = None) -> torch.Tensor:
    """dopri5 (torchdiffeq) from t = 0, or from each sample's t_start, to 1. With t_start (N,) it integrates
    dx/ds = (1 - t_start) v(x, t_start + (1 - t_start) s) over s in [0, 1]: the ODE over [t_start, 1] of each
    sample, in one time variable that the batch shares (the adaptive steps then control every sample's error)."""
    try:   # optional: only the dopri5 sampler needs torchdiffeq (its import, with scipy, takes ~0.45 s)
        from torchdiffeq import odeint
    except ImportError as err:
        raise RuntimeError("the dopri5 sampler needs torchdiffeq: pip install torchdiffeq") from err
    t = torch.tensor([0.0, 1.0], device=x0.device)
    if t_start is None:
        return odeint(lambda t, x: velocity(x, t), x0.float(), t, method="dopri5", atol=atol, rtol=rtol)[-1]
    start = t_start.to(device=x0.device, dtype=torch.float64)
    span = per_sample(1 - start, x0)

    def along(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return span * velocity(x, (start + (1 - start) * s.double()).float())
    return odeint(along, x0.float(), t, method="dopri5", atol=atol, rtol=rtol)[-1]
