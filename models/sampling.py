"""The sampler that stage 2's validation grids and stage 3 share: per-job noise, guided ODE sampling in the
device's half precision (fp32 again where it overflows), decoding, and the overview grid of samples per user.

Below training/ and generation/ (as SiT's transport.Sampler, which its train and sample scripts share), so that
stage 2 never imports stage 3.
"""
import functools
import warnings

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
                              DEFAULT_STEPS, CountedVelocity, classifier_guided_velocity, guidance_switches,
                              guided_velocity, sample_ode)

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
                  seed: int = 0, batch_size: int = 16, device: str = "cpu",
                  progress: bool = True) -> tuple[np.ndarray, int]:
    """(N, H, W, 3) uint8 images for (user number, sample index) jobs, and the model evaluations per sample.

    The noise of a job comes from its own seed: the same image whatever the batch it lands in. With a guidance
    interval, the AB2 multistep restarts where guidance switches on or off (its velocity field changes there).
    guide_model: autoguidance (guided_velocity) instead of classifier-free guidance. classifier with
    classifier_scale > 0: classifier guidance (models/transport.classifier_guided_velocity) on top, where t lies in
    classifier_interval.
    A batch whose half-precision (autocast) latents are not finite (fp16 overflows on a T4) is sampled again in
    fp32, with a warning; PipelineError if the fp32 latents or the decoded images are not finite either.
    """
    classes = class_indices([u for u, _ in jobs], info.user_numbers, info.users)   # checks the ids too
    mean, std = info.latent_mean.to(device), info.latent_std.to(device)
    side = int(round(model.pos_embed.shape[1] ** 0.5)) * model.patch_size
    half = sampling_dtype(device)
    images, evaluations = [], 0
    switches = guidance_switches(guidance_scale, cfg_interval_start, cfg_interval_end)
    if classifier is not None and classifier_scale > 0:
        switches += guidance_switches(classifier_scale, *classifier_interval)
    gradient = functools.partial(classifier_log_prob_gradient, classifier) if classifier is not None else None
    batches = range(0, len(jobs), batch_size)
    for start in progress_bar(batches, desc="stage 3 sampling", unit="batch", disable=not progress):
        batch = jobs[start:start + batch_size]
        noise = torch.stack([job_noise(seed, u, k, (model.in_channels, side, side)) for u, k in batch]).to(device)
        y = torch.tensor(classes[start:start + batch_size], device=device)
        velocity = guided_velocity(model, y, model.num_classes, guidance_scale, cfg_interval_start, cfg_interval_end,
                                   guide_model)
        if gradient is not None:
            velocity = classifier_guided_velocity(velocity, gradient, y, classifier_scale, *classifier_interval)
        velocity = CountedVelocity(velocity)
        with torch.autocast(torch.device(device).type, dtype=half, enabled=half is not None):
            z = sample_ode(velocity, noise, num_steps=num_steps, sampler=sampler, shift=shift, restart_at=switches)
        if half is not None and not torch.isfinite(z).all():   # NaN would become black PNGs
            warnings.warn(f"stage 3: sampling in {str(half).removeprefix('torch.')} gave NaN/inf latents for "
                          f"user(s) {users_of(batch)}; this batch is sampled again in fp32 (slower)")
            velocity.calls = 0
            z = sample_ode(velocity, noise, num_steps=num_steps, sampler=sampler, shift=shift, restart_at=switches)
        evaluations = max(evaluations, velocity.calls)
        decoded = vae.decode(z.float() * std + mean)
        check_finite_samples(z, decoded, batch)
        images.append(to_uint8(decoded).permute(0, 2, 3, 1).cpu().numpy())   # HWC for PIL
    return np.concatenate(images), evaluations


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
