"""Stage 3 logic: sample latents per user with guidance, decode with the VA-VAE, write PNGs and a grid."""
import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.device import resolve_device, resolve_precision
from common.errors import PipelineError, out_of_memory_advice
from common.io import file_sha256, replaced_together
from common.lock import run_lock
from common.pixels import to_uint8
from common.progress import progress_bar
from data.samples import GRID_NAME, remove_stale_samples, sample_name
from generation.cli import GenerateOptions
from models.checkpoint import PipelineInfo, checkpoint_info, ema_state_dict, load_checkpoint
from models.lightningdit import LightningDiT
from models.latent_classifier import NoisyLatentClassifier, classifier_from_entry, classifier_log_prob_gradient
from models.transport import (DEFAULT_CLASSIFIER_INTERVAL, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SHIFT,
                              DEFAULT_STEPS, CountedVelocity,
                              classifier_guided_velocity, guidance_switches, guided_velocity, sample_ode)

LOCK_NAME = "stage3.lock"   # one stage 3 run per --output_dir (common/lock.py)


def load_generator(checkpoint_path: str, device: str) -> tuple[LightningDiT, PipelineInfo]:
    """EMA LightningDiT of a stage 2 checkpoint and the pipeline info it carries (users, latent stats).
    Raises PipelineError for a checkpoint whose statistics do not fit its model's channels."""
    ckpt = load_checkpoint(checkpoint_path)
    info = checkpoint_info(ckpt)
    stats = {"latent mean": tuple(info.latent_mean.shape), "latent std": tuple(info.latent_std.shape)}
    expected = (1, info.model_config["in_channels"], 1, 1)
    if any(shape != expected for shape in stats.values()):
        raise PipelineError(f"{checkpoint_path} disagrees with itself: its model takes latents of "
                            f"{expected[1]} channels, its latent statistics are shaped "
                            f"{', '.join(f'{k} {v}' for k, v in stats.items())}. It was not written by stage 2 "
                            "(or was edited): pass a checkpoint stage 2 wrote.")
    model = LightningDiT(**{**info.model_config, "use_checkpoint": False})
    model.load_state_dict(ema_state_dict(ckpt))
    return model.to(device).eval().requires_grad_(False), info


def class_indices(user_numbers: list[int], trained_numbers: list[int], trained_names: list[str]) -> list[int]:
    """Folder numbers (e.g. 3 for ID_3) -> class indices; an unknown number lists the valid ones."""
    unknown = list(dict.fromkeys(u for u in user_numbers if u not in trained_numbers))   # each once
    if unknown:
        valid = ", ".join(f"{n} ({name})" for n, name in zip(trained_numbers, trained_names))
        raise PipelineError(f"user id(s) {', '.join(map(str, unknown))} were not in the training data. "
                            f"Valid --user_ids: {valid}")
    return [trained_numbers.index(u) for u in user_numbers]


def check_sampling(info: PipelineInfo, guidance_scale: float, num_steps: int, shift: float,
                   cfg_interval_start: float = 0.0, cfg_interval_end: float = 1.0, autoguidance: bool = False) -> None:
    """Settings that would give NaNs, a division by zero or meaningless images: refused with the reason
    (PipelineError). Autoguidance guides with another checkpoint, so it does not need the null class."""
    if shift <= 0:
        raise PipelineError(f"--shift must be > 0 (got {shift:g}): the time grid s t / (1 + (s - 1) t) "
                            "collapses at 0 and runs backwards below it. Values < 1 put more steps near the "
                            "noise end (0.3 is the default).")
    if num_steps < 1:
        raise PipelineError(f"--num_steps must be at least 1 (got {num_steps})")
    if not 0.0 <= cfg_interval_start < cfg_interval_end <= 1.0:
        raise PipelineError(f"the guidance interval must satisfy 0 <= --cfg_interval_start < --cfg_interval_end <= 1 "
                            f"(got {cfg_interval_start:g} and {cfg_interval_end:g}; t = 0 is noise, 1 the image)")
    if guidance_scale != 1.0 and not autoguidance and info.model_config.get("class_dropout_prob", 1.0) <= 0:
        raise PipelineError(
            f"--guidance_scale {guidance_scale:g} needs the model's null class, but this checkpoint was trained "
            "with --class_dropout_prob 0, so that class was never trained and guided samples would be "
            "meaningless. Pass --guidance_scale 1 (no guidance), --guidance_checkpoint <stage 2 output>/checkpoints/"
            "early.ckpt (autoguidance needs no null class), or retrain stage 2 with --class_dropout_prob 0.1.")


GUIDE_GEOMETRY = ("input_size", "in_channels", "num_classes")


def check_guide(info: PipelineInfo, guide: PipelineInfo, guide_path: str) -> None:
    """Autoguidance needs a guide that speaks the same language: the same users in the same class order, the
    same latent space (tokenizer, normalisation, latent shape). Its size may differ (Karras et al. guide with a
    smaller model too). Raises PipelineError naming what differs."""
    diff = [f"{k}: {guide.model_config.get(k)} vs {info.model_config.get(k)}" for k in GUIDE_GEOMETRY
            if guide.model_config.get(k) != info.model_config.get(k)]
    if guide.users != info.users or guide.user_numbers != info.user_numbers:
        diff.append(f"users: {guide.users} vs {info.users}")
    if guide.tokenizer_sha256 != info.tokenizer_sha256:
        diff.append(f"tokenizer sha256: {guide.tokenizer_sha256[:12] or '?'}... vs {info.tokenizer_sha256[:12] or '?'}...")
    if not (torch.equal(guide.latent_mean.cpu(), info.latent_mean.cpu())
            and torch.equal(guide.latent_std.cpu(), info.latent_std.cpu())):
        diff.append("latent statistics differ")
    if diff:
        raise PipelineError(f"--guidance_checkpoint {guide_path} was not trained on the same stage 1 latents and "
                            f"users as --dit_checkpoint ({'; '.join(diff)}; guide vs model). Pass the early.ckpt "
                            "that the same stage 2 run wrote beside best.ckpt (checkpoints/early.ckpt).")


def guidance_classifier(info: PipelineInfo, scale: float, interval_start: float, interval_end: float,
                        checkpoint_path: str, device: str) -> NoisyLatentClassifier | None:
    """The checkpoint's noisy-latent user classifier when classifier guidance is asked for (scale > 0), else None.
    PipelineError for an empty interval or a checkpoint trained without a classifier."""
    if scale == 0:
        return None
    if not 0.0 < interval_start < interval_end <= 1.0:
        raise PipelineError(f"the classifier guidance interval must satisfy 0 < --classifier_interval_start < "
                            f"--classifier_interval_end <= 1 (got {interval_start:g} and {interval_end:g})")
    if info.latent_classifier is None:
        raise PipelineError(f"--classifier_scale {scale:g} needs the noisy-latent user classifier that stage 2 trains "
                            f"beside the DiT, and {checkpoint_path} has none (trained with --classifier_steps 0, or "
                            "by an older version). Pass --classifier_scale 0, or train stage 2 again.")
    return classifier_from_entry(info.latent_classifier, device)


def check_same_tokenizer(info: PipelineInfo, vavae_path: str) -> None:
    expected = info.tokenizer_sha256
    if expected and file_sha256(vavae_path) != expected:
        warnings.warn(f"--vavae_path {vavae_path} is not the tokenizer the model was trained with "
                      f"({info.tokenizer or '?'}, sha256 {expected[:12]}...): images will likely be wrong. "
                      "Pass the tokenizer used in stage 1.")


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


def generate(options: GenerateOptions, log=print) -> list[Path]:
    """Stage 3 with its flags (generation/cli.py): write micro_doppler_userNN_KKK.png per sample and
    micro_doppler_grid.png into options.output_dir; return the sample paths.

    Each sample: noise (32, 16, 16) seeded by (seed, user, sample) -> the EMA DiT's guided velocity integrated
    from t=0 to 1 (sampler, num_steps, shift) -> de-normalised latent -> VA-VAE decode -> 256x256 RGB uint8 PNG.
    user_ids are the numbers in the user folder names (ID_3 -> 3); PipelineError names the valid ones otherwise,
    for another stage 3 run writing to output_dir (output_dir/stage3.lock), for a checkpoint or tokenizer that
    does not fit, a guidance the model cannot do, or NaN samples.

    guidance_checkpoint: a weaker stage 2 checkpoint of the same users and latents (the run's early.ckpt) to
    guide with instead of the unconditional model (autoguidance); PipelineError if it does not fit.
    classifier_scale > 0: classifier guidance with the checkpoint's noisy-latent user classifier (stage 2 trains it)
    where classifier_interval_start <= t <= classifier_interval_end; PipelineError for a checkpoint without one.

    The folder then holds this run's samples only: those of an earlier run (other users, more samples,
    another checkpoint) are removed once the new ones are written, so stage 4 never scores a mix. The samples
    and the grid are written into a staging folder first and moved in together: a full disk (PipelineError)
    leaves the previous run's files as they were. Files of other names in the folder are left alone.
    """
    o = options
    with run_lock(Path(o.output_dir) / LOCK_NAME, "stage 3", "another --output_dir", log=log):
        device = str(resolve_device(o.device))
        jobs = [(u, k) for u in o.user_ids for k in range(o.num_samples_per_user)]
        with out_of_memory_advice("stage 3", f"a smaller --batch_size (now {o.batch_size}; e.g. 4), or --device cpu"):
            model, info = load_generator(o.dit_checkpoint, device)
            check_sampling(info, o.guidance_scale, o.num_steps, o.shift, o.cfg_interval_start, o.cfg_interval_end,
                           autoguidance=o.guidance_checkpoint is not None)
            guide_model = None
            if o.guidance_checkpoint is not None:
                guide_model, guide_info = load_generator(o.guidance_checkpoint, device)
                check_guide(info, guide_info, o.guidance_checkpoint)
            classifier = guidance_classifier(info, o.classifier_scale, o.classifier_interval_start,
                                             o.classifier_interval_end, o.dit_checkpoint, device)
            from models.vavae import check_tokenizer_fits, load_vavae
            vae = load_vavae(o.vavae_path, device=device)
            check_tokenizer_fits(vae, o.vavae_path, info.image_size, info.model_config["in_channels"],
                                 info.model_config["input_size"], f"the model of {o.dit_checkpoint} takes latents of",
                                 "Pass the tokenizer used in stage 1 as --vavae_path.")
            check_same_tokenizer(info, o.vavae_path)
            pixels, nfe = sample_images(model, vae, info, jobs, guidance_scale=o.guidance_scale, num_steps=o.num_steps,
                                        sampler=o.sampler, shift=o.shift, cfg_interval_start=o.cfg_interval_start,
                                        cfg_interval_end=o.cfg_interval_end, guide_model=guide_model,
                                        classifier=classifier, classifier_scale=o.classifier_scale,
                                        classifier_interval=(o.classifier_interval_start, o.classifier_interval_end),
                                        seed=o.seed, batch_size=o.batch_size, device=device)
        out = Path(o.output_dir)
        names = [sample_name(u, k + 1) for u, k in jobs]
        with replaced_together(out) as staging:
            for name, arr in zip(names, pixels):
                Image.fromarray(arr).save(staging / name, format="PNG")
            grid = grid_image(dict(zip(jobs, pixels)), o.user_ids, o.num_samples_per_user)
            grid.save(staging / GRID_NAME, format="PNG")
        removed = remove_stale_samples(out, keep=set(names))
        paths = [out / name for name in names]
        log(f"stage 3 done: {len(paths)} images ({o.sampler}, {nfe} model evaluations each) and {GRID_NAME} in {out}"
            + (f"; removed {removed} sample(s) of an earlier run" if removed else ""))
        return paths


def grid_image(images: dict[tuple[int, int], np.ndarray], user_ids: list[int], per_user: int,
               max_cols: int = 8, thumb: int = 128) -> Image.Image:
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
