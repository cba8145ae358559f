"""Stage 3 logic: sample latents per user with guidance, decode with the VA-VAE, write PNGs and a grid."""
import warnings
from pathlib import Path

import torch
from PIL import Image

from common.device import resolve_device
from common.errors import PipelineError, out_of_memory_advice
from common.io import file_sha256, replaced_together
from common.lock import run_lock
from data.samples import GRID_NAME, remove_stale_samples, sample_name
from generation.cli import GenerateOptions
from models.checkpoint import PipelineInfo, checkpoint_info, ema_state_dict, load_checkpoint
from models.lightningdit import LightningDiT
from models.latent_classifier import NoisyLatentClassifier, classifier_from_entry
from models.sampling import grid_image, sample_images

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

