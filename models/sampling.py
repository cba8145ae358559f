"""The sampler that stage 2's validation grids and stage 3 share: per-job noise, guided ODE sampling in the
device's half precision (fp32 again where it overflows), decoding, and the overview grid of samples per user.

Below training/ and generation/ (as SiT's transport.Sampler, which its train and sample scripts share), so that
stage 2 never imports stage 3.
"""
import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.device import resolve_precision
from common.errors import PipelineError
from common.pixels import to_uint8
from common.progress import progress_bar
from models.checkpoint import PipelineInfo
from models.lightningdit import LightningDiT
from models.latent_classifier import NoisyLatentClassifier, classifier_log_prob_gradient
from models.transport import (DEFAULT_CLASSIFIER_INTERVAL, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SHIFT,
                              DEFAULT_STEPS, CountedVelocity, Scale, classifier_guided_velocity, guidance_switches,
                              guided_velocity, linear_path, sample_ode)

GRID_COLUMNS = 8   # samples per user shown in the overview grid (the first ones)


def class_indices(user_numbers: list[int], trained_numbers: list[int], trained_names: list[str]) -> list[int]:
    """Folder numbers (e.g. 3 for ID_3) -> class indices; an unknown number lists the valid ones."""
    unknown = list(dict.fromkeys(u for u in user_numbers if u not in trained_numbers))   # each once
    if unknown:
        valid = ", ".join(f"{n} ({name})" for n, name in zip(trained_numbers, trained_names))
        raise PipelineError(f"user id(s) {', '.join(map(str, unknown))} were not in the training data. "
                            f"Valid --user_ids: {valid}")
    return [trained_numbers.index(u) for u in user_numbers]


def job_noise(seed: int, user: int, sample: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of one (seed, user number, sample index): its own generator, seeded by a hash of
    the triple, so no two triples share a stream (however many samples or users) and the noise of a sample
    does not depend on the batch it lands in."""
    state = np.random.SeedSequence([seed % 2 ** 64, user, sample]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(shape, generator=generator)


#################################################################################
#            Per-sample recipes: stage 3's samples for training a classifier     #
#################################################################################

# The random streams of a job beside its noise (job_noise's is the triple's own): one per purpose, so that turning
# one on never moves another's draws (a guidance range leaves the anchors where they were).
ANCHOR_STREAM, STRENGTH_STREAM, GUIDANCE_STREAM = 1, 2, 3


def job_generator(seed: int, user: int, index: int, stream: int) -> np.random.Generator:
    """numpy's generator of its own for one (seed, user number, index) and purpose `stream` (> 0), seeded by
    SeedSequence as job_noise is: the same draws on every machine and whatever batch or rank the job lands in."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2 ** 64, user, index], spawn_key=(stream,)))


def job_anchor(seed: int, user: int, sample: int, count: int) -> int:
    """The row, among a user's `count` train latents, that sample `sample` (from 0) starts from: each pass of
    `count` samples uses every row once (DA-Fusion's M augmentations per real image), in an order shuffled per
    pass by (seed, user, pass). Raises ValueError for count < 1."""
    if count < 1:
        raise ValueError(f"job_anchor needs at least one train latent of user {user}")
    order = job_generator(seed, user, sample // count, ANCHOR_STREAM).permutation(count)
    return int(order[sample % count])


def job_uniform(seed: int, user: int, sample: int, stream: int, bounds: tuple[float, float]) -> float:
    """A value uniform in [low, high] for one job and purpose (`stream`), or low itself where low == high."""
    low, high = bounds
    return low if low == high else low + (high - low) * float(job_generator(seed, user, sample, stream).random())


@dataclass(frozen=True)
class JobRecipe:
    """How one sample is drawn besides its noise: its guidance scale, SDEdit's strength (1: from pure noise) and
    the row of its anchor among its user's train latents (None: no anchor)."""
    guidance_scale: float
    strength: float = 1.0
    anchor: int | None = None


@dataclass(frozen=True)
class PerSampleRecipes:
    """Per-sample recipes, which make samples better for training a classifier on them:

    - guidance_scale (low, high): each sample's classifier-free guidance scale, uniform in the range (low == high:
      one scale for all).
    - strength (low, high) with anchors: real-anchored sampling (SDEdit, Meng et al. 2022; DA-Fusion, Trabucco et
      al. 2024 draws the strength per sample). Each sample starts from one of its user's train latents x1, noised
      along the model's own path to t = 1 - strength (x_t = t x1 + (1 - t) x0, its own noise x0), and the guided ODE
      runs from there to t = 1. Strength 1 is today's sampling from pure noise; near 0 a near copy of the anchor.
      anchors: user number -> (n, C, h, w) float32 train latents, normalised as stage 2 trained on them.
    Every draw is a function of (seed, user, sample) alone (job_anchor, job_uniform).
    """
    guidance_scale: tuple[float, float]
    strength: tuple[float, float] | None = None
    anchors: Mapping[int, torch.Tensor] | None = None

    def recipe(self, seed: int, user: int, sample: int) -> JobRecipe:
        """The recipe of one job (user number, sample index from 0). KeyError for a user without anchors."""
        scale = job_uniform(seed, user, sample, GUIDANCE_STREAM, self.guidance_scale)
        if self.strength is None or self.anchors is None:
            return JobRecipe(scale)
        return JobRecipe(scale, job_uniform(seed, user, sample, STRENGTH_STREAM, self.strength),
                         job_anchor(seed, user, sample, len(self.anchors[user])))

    def start(self, batch: list[tuple[int, int]], recipes: list[JobRecipe],
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x at each sample's start (N, C, h, w) on noise's device, its start time t = 1 - strength (N,) float64,
        or None without anchors) for a batch of jobs, their recipes and noise (N, C, h, w)."""
        if self.anchors is None or self.strength is None:
            return noise, None
        anchors = torch.stack([self.anchors[u][r.anchor] for (u, _), r in zip(batch, recipes)]).to(noise.device)
        t_start = torch.tensor([1.0 - r.strength for r in recipes], dtype=torch.float64, device=noise.device)
        return linear_path(anchors, noise, t_start.to(noise.dtype)), t_start

    def scales(self, recipes: list[JobRecipe], device: str) -> Scale:
        """The guidance of a batch: the one scale, or (N,) float32 of each sample's."""
        if self.guidance_scale[0] == self.guidance_scale[1]:
            return self.guidance_scale[0]
        return torch.tensor([r.guidance_scale for r in recipes], dtype=torch.float32, device=device)


def sampling_dtype(device: str) -> torch.dtype | None:
    """Autocast dtype of the sampler: bf16 on GPUs that run it natively, fp16 on older ones (a T4, where bf16
    is emulated), none (fp32) on the CPU."""
    if not device.startswith("cuda"):
        return None     # fp32: the CPU's samples stay exact whatever its bf16
    return torch.bfloat16 if resolve_precision("bf16-mixed", device, warn=False) == "bf16-mixed" else torch.float16


@torch.no_grad()   # not inference_mode: classifier guidance takes a gradient of the classifier
def sample_images(model: LightningDiT, vae, info: PipelineInfo, jobs: list[tuple[int, int]],
                  guidance_scale: float = DEFAULT_GUIDANCE,
                  num_steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, shift: float = DEFAULT_SHIFT,
                  cfg_interval_start: float = 0.0, cfg_interval_end: float = 1.0,
                  guide_model: LightningDiT | None = None, classifier: NoisyLatentClassifier | None = None,
                  classifier_scale: float = 0.0, classifier_interval: tuple[float, float] = DEFAULT_CLASSIFIER_INTERVAL,
                  seed: int = 0, batch_size: int = 16, device: str = "cpu", progress: bool = True,
                  recipes: PerSampleRecipes | None = None) -> tuple[np.ndarray, int]:
    """(N, H, W, 3) uint8 images for (user number, sample index) jobs, and the model evaluations per sample.

    The noise of a job comes from its own seed: the same image whatever the batch it lands in. With a guidance
    interval, the AB2 multistep restarts where guidance switches on or off (its velocity field changes there).
    guide_model: autoguidance (guided_velocity) instead of classifier-free guidance. classifier with
    classifier_scale > 0: classifier guidance (models/transport.classifier_guided_velocity) on top, where t lies in
    classifier_interval. recipes: per-sample guidance scales (in place of guidance_scale) and real-anchored starts
    (PerSampleRecipes), each a function of (seed, user, sample).
    A batch whose half-precision (autocast) latents are not finite (fp16 overflows on a T4) is sampled again in
    fp32, with a warning; PipelineError if the fp32 latents or the decoded images are not finite either.
    """
    classes = class_indices([u for u, _ in jobs], info.user_numbers, info.users)   # checks the ids too
    mean, std = info.latent_mean.to(device), info.latent_std.to(device)
    side = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    images, evaluations = [], 0
    gradient = functools.partial(classifier_log_prob_gradient, classifier) if classifier is not None else None
    batches = range(0, len(jobs), batch_size)
    for start in progress_bar(batches, desc="stage 3 sampling", unit="batch", disable=not progress):
        batch = jobs[start:start + batch_size]
        x_start = torch.stack([job_noise(seed, u, k, (model.in_channels, side, side)) for u, k in batch]).to(device)
        scale, t_start = guidance_scale, None
        if recipes is not None:
            drawn = [recipes.recipe(seed, u, k) for u, k in batch]
            scale, (x_start, t_start) = recipes.scales(drawn, device), recipes.start(batch, drawn, x_start)
        y = torch.tensor(classes[start:start + batch_size], device=device)
        velocity = guided_velocity(model, y, model.num_classes, scale, cfg_interval_start, cfg_interval_end,
                                   guide_model)
        switches = guidance_switches(scale, cfg_interval_start, cfg_interval_end)
        if gradient is not None and classifier_scale > 0:
            velocity = classifier_guided_velocity(velocity, gradient, y, classifier_scale, *classifier_interval)
            switches += guidance_switches(classifier_scale, *classifier_interval)
        velocity = CountedVelocity(velocity)
        z = sample_in_half_precision(functools.partial(
            sample_ode, velocity, x_start, num_steps=num_steps, sampler=sampler, shift=shift, restart_at=switches,
            t_start=t_start), velocity, device, batch)
        evaluations = max(evaluations, velocity.calls)
        decoded = vae.decode(z.float() * std + mean)
        check_finite_samples(z, decoded, batch)
        images.append(to_uint8(decoded).permute(0, 2, 3, 1).cpu().numpy())   # HWC for PIL
    return np.concatenate(images), evaluations


def sample_in_half_precision(sample: Callable[[], torch.Tensor], velocity: CountedVelocity, device: str,
                             batch: list[tuple[int, int]]) -> torch.Tensor:
    """sample() under the device's autocast (sampling_dtype); a batch whose half-precision latents are not finite
    (fp16 overflows on a T4; NaN would become black PNGs) is sampled again in fp32, with a warning, its model
    evaluations counted afresh. Returns the (N, C, h, w) latents."""
    half = sampling_dtype(device)
    with torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None):
        z = sample()
    if half is not None and not torch.isfinite(z).all():
        warnings.warn(f"stage 3: sampling in {str(half).removeprefix('torch.')} gave NaN/inf latents for "
                      f"user(s) {users_of(batch)}; this batch is sampled again in fp32 (slower)")
        velocity.calls = 0
        z = sample()
    return z


def users_of(batch: list[tuple[int, int]]) -> str:
    return ", ".join(str(u) for u in dict.fromkeys(u for u, _ in batch))


def check_finite_samples(latents: torch.Tensor, decoded: torch.Tensor, batch: list[tuple[int, int]]) -> None:
    """PipelineError when fp32 latents or decoded images hold NaN/inf (they would be written as black PNGs)."""
    if not torch.isfinite(latents).all():
        raise PipelineError(
            f"stage 3: the sampled latents of user(s) {users_of(batch)} are NaN/inf even in fp32: the checkpoint's "
            "weights are likely not finite (did stage 2 diverge? sample from an earlier checkpoint, or retrain with "
            "a lower --lr), or the guidance is too strong (try a lower --guidance_scale). Nothing was written.")
    if not torch.isfinite(decoded).all():
        raise PipelineError(
            f"stage 3: the tokenizer decoded the latents of user(s) {users_of(batch)} to NaN/inf: pass the "
            "tokenizer used in stage 1 as --vavae_path (this file may be damaged). Nothing was written.")


def grid_image(images: dict[tuple[int, int], np.ndarray], user_ids: list[int], per_user: int,
               max_cols: int = GRID_COLUMNS, thumb: int = 128) -> Image.Image:
    """The overview grid: a row per user (its first `max_cols` samples as `thumb`-px tiles), labelled with its
    number on the left. `images` maps (user number, sample index from 0) to an (H, W, 3) uint8 array."""
    cols, label_w, pad = min(per_user, max_cols), 72, 4
    canvas = Image.new("RGB", (label_w + cols * (thumb + pad), len(user_ids) * (thumb + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, u in enumerate(user_ids):
        y0 = row * (thumb + pad)
        draw.text((6, y0 + thumb // 2 - 6), f"user {u:02d}", fill="black")
        for col in range(cols):
            tile = Image.fromarray(images[(u, col)]).resize((thumb, thumb), Image.BILINEAR)
            canvas.paste(tile, (label_w + col * (thumb + pad), y0))
    return canvas
