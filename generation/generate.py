"""Stage 3 logic: sample latents per user with guidance, decode with the VA-VAE, write PNGs and a grid."""
import contextlib
import functools
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from common.device import resolve_device
from common.errors import PipelineError, out_of_memory_advice
from common.config import non_negative_float
from common.io import STAGING_DIR, file_sha256, out_of_space_as_error, replaced_together, write_text
from common.lock import run_lock
from data.samples import GRID_NAME, MANIFEST_NAME, remove_stale_samples, sample_name
from generation.cli import GenerateOptions, anchor_strength
from generation.ranks import Ranks, launched_ranks, spawn_ranks, uses_cuda
from generation.recipes import flag_range, load_anchor_bank, per_sample_recipes, recipe_manifest
from models.checkpoint import PipelineInfo, checkpoint_info, ema_state_dict, load_checkpoint
from models.lightningdit import LightningDiT
from models.latent_classifier import NoisyLatentClassifier, classifier_from_entry
from models.sampling import GRID_COLUMNS, PerSampleRecipes, class_indices, grid_image, sample_images
from models.vavae import check_tokenizer_fits, load_vavae

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


def check_sampling(info: PipelineInfo, guidance_scale: float | tuple[float, float], num_steps: int, shift: float,
                   cfg_interval_start: float = 0.0, cfg_interval_end: float = 1.0, autoguidance: bool = False) -> None:
    """Settings that would give NaNs, a division by zero or meaningless images: refused with the reason
    (PipelineError). guidance_scale: the one scale, or the (low, high) range of --guidance_scale_range.
    Autoguidance guides with another checkpoint, so it does not need the null class."""
    if shift <= 0:
        raise PipelineError(f"--shift must be > 0 (got {shift:g}): the time grid s t / (1 + (s - 1) t) "
                            "collapses at 0 and runs backwards below it. Values < 1 put more steps near the "
                            "noise end (0.3 is the default).")
    if num_steps < 1:
        raise PipelineError(f"--num_steps must be at least 1 (got {num_steps})")
    if not 0.0 <= cfg_interval_start < cfg_interval_end <= 1.0:
        raise PipelineError(f"the guidance interval must satisfy 0 <= --cfg_interval_start < --cfg_interval_end <= 1 "
                            f"(got {cfg_interval_start:g} and {cfg_interval_end:g}; t = 0 is noise, 1 the image)")
    scales = guidance_scale if isinstance(guidance_scale, tuple) else (guidance_scale,)
    if any(scale != 1.0 for scale in scales) and not autoguidance and info.model_config.get("class_dropout_prob", 1.0) <= 0:
        given = (f"--guidance_scale_range {scales[0]:g} {scales[-1]:g}" if len(scales) > 1 else
                 f"--guidance_scale {scales[0]:g}")
        raise PipelineError(
            f"{given} needs the model's null class, but this checkpoint was trained "
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

    Samples for training (models.sampling.PerSampleRecipes, generation/recipes.py): guidance_scale_range (low, high)
    draws each sample's guidance scale; real_anchored_strength S (or a range drawn per sample) starts each sample
    from one of its user's train latents in latent_dir (the checkpoint's stage 1 run, else PipelineError), noised to
    t = 1 - S, and integrates from there. Each draw is a function of (seed, user, sample); the run then also writes
    micro_doppler_samples.json (each sample's scale, strength and train image), and without them removes an
    earlier run's.

    devices > 1, or a launcher (torchrun, srun) that started several processes: each process samples its share of
    the batches (generation/ranks.py), the same files byte for byte as one process; with devices > 1 this process
    starts them (GPUs cuda:0..devices-1, or CPU processes with device cpu) and rank 0's messages are printed.
    PipelineError for more devices than GPUs, a device with an index, or a rank that failed or died.

    The folder then holds this run's samples only: those of an earlier run (other users, more samples,
    another checkpoint) are removed once the new ones are written, so stage 4 never scores a mix. The samples
    and the grid are written into a staging folder first and moved in together: a full disk (PipelineError)
    leaves the previous run's files as they were. Files of other names in the folder are left alone.
    """
    o = options
    ranks = launched_ranks(o.device, o.devices)
    if ranks is not None:
        return generate_on_rank(o, ranks, log)
    if o.devices > 1:
        use_cuda = uses_cuda(o.device, o.devices)
        log(f"stage 3: {o.devices} processes ({f'cuda:0-{o.devices - 1}' if use_cuda else 'CPU'}), each sampling a "
            "share of the batches")
        spawn_ranks(functools.partial(generate_on_rank, o), o.devices, use_cuda)
        return [Path(o.output_dir) / sample_name(u, k + 1) for u, k in run_jobs(o)]
    return generate_on_rank(o, Ranks(device=resolve_device(o.device)), log)


def run_jobs(o: GenerateOptions) -> list[tuple[int, int]]:
    """The run's (user number, sample index from 0) jobs, in the order of the files and of the batches."""
    return [(u, k) for u in o.user_ids for k in range(o.num_samples_per_user)]


Sampler = Callable[..., tuple[np.ndarray, int]]   # sample_images bound to a run's model, files and flags


def load_sampler(o: GenerateOptions, device: str, check_files: bool = True) -> tuple[Sampler, dict | None]:
    """sample_images bound to the checkpoint's EMA model, guide, classifier, tokenizer and per-sample recipes on
    `device` and to the sampling flags (call it with jobs, and progress), and the run's manifest
    (generation/recipes.py; None without per-sample recipes). Raises PipelineError for files or settings that do
    not fit (unknown user ids and a latent folder of another stage 1 run included); check_files=False leaves out
    the warning about another tokenizer's file."""
    model, info = load_generator(o.dit_checkpoint, device)
    guidance_range = flag_range(o.guidance_scale_range, "--guidance_scale_range", non_negative_float, counts=(2,))
    check_sampling(info, guidance_range or o.guidance_scale, o.num_steps, o.shift, o.cfg_interval_start,
                   o.cfg_interval_end, autoguidance=o.guidance_checkpoint is not None)
    class_indices(o.user_ids, info.user_numbers, info.users)
    recipes, manifest = load_recipes(o, info, guidance_range)
    guide_model = None
    if o.guidance_checkpoint is not None:
        guide_model, guide_info = load_generator(o.guidance_checkpoint, device)
        check_guide(info, guide_info, o.guidance_checkpoint)
    classifier = guidance_classifier(info, o.classifier_scale, o.classifier_interval_start,
                                     o.classifier_interval_end, o.dit_checkpoint, device)
    vae = load_vavae(o.vavae_path, device=device)
    check_tokenizer_fits(vae, o.vavae_path, info.image_size, info.model_config["in_channels"],
                         info.model_config["input_size"], f"the model of {o.dit_checkpoint} takes latents of",
                         "Pass the tokenizer used in stage 1 as --vavae_path.")
    if check_files:
        check_same_tokenizer(info, o.vavae_path)
    return functools.partial(sample_images, model, vae, info, guidance_scale=o.guidance_scale, num_steps=o.num_steps,
                             sampler=o.sampler, shift=o.shift, cfg_interval_start=o.cfg_interval_start,
                             cfg_interval_end=o.cfg_interval_end, guide_model=guide_model, classifier=classifier,
                             classifier_scale=o.classifier_scale,
                             classifier_interval=(o.classifier_interval_start, o.classifier_interval_end),
                             seed=o.seed, batch_size=o.batch_size, device=device, recipes=recipes), manifest


def load_recipes(o: GenerateOptions, info: PipelineInfo,
                 guidance_range: tuple[float, float] | None) -> tuple[PerSampleRecipes | None, dict | None]:
    """The per-sample recipes of --guidance_scale_range and --real_anchored_strength (with --latent_dir's train
    latents) and the run's manifest of them; (None, None) when neither flag is given. PipelineError for a strength
    without --latent_dir, and as flag_range and load_anchor_bank (generation/recipes.py)."""
    strength = flag_range(o.real_anchored_strength, "--real_anchored_strength", anchor_strength)
    bank = None
    if strength is not None:
        if not o.latent_dir:
            raise PipelineError("--real_anchored_strength starts each sample from a real train latent: pass "
                                "--latent_dir, the stage 1 folder that stage 2 trained the checkpoint on "
                                "(run_complete_pipeline.py writes it to <output_dir>/latent_features)")
        bank = load_anchor_bank(o.latent_dir, info, o.user_ids, o.dit_checkpoint)
    recipes = per_sample_recipes(o.guidance_scale, guidance_range, strength, bank)
    if recipes is None:
        return None, None
    return recipes, recipe_manifest(recipes, bank, run_jobs(o), o.seed, o.dit_checkpoint)


def generate_on_rank(o: GenerateOptions, ranks: Ranks, log=print) -> list[Path]:
    """generate() on one process of a run (a run of one: Ranks(device=...)): rank 0 takes the lock and the staging
    folder, every rank samples its share into it, rank 0 adds the grid from the files there and moves the set in.
    Every rank stops when one fails (Ranks.all_or_none); PipelineError as generate()."""
    out, jobs = Path(o.output_dir), run_jobs(o)
    names = [sample_name(u, k + 1) for u, k in jobs]
    device = str(ranks.device)
    memory_advice = functools.partial(out_of_memory_advice, "stage 3",
                                      f"a smaller --batch_size (now {o.batch_size}; e.g. 4), or --device cpu")
    with contextlib.ExitStack() as locked, contextlib.ExitStack() as staged:
        with ranks.all_or_none():
            if ranks.is_zero:
                locked.enter_context(run_lock(out / LOCK_NAME, "stage 3", "another --output_dir", log=log))
                staged.enter_context(replaced_together(out))
            with memory_advice():
                sampler, manifest = load_sampler(o, device, check_files=ranks.is_zero)
        staging = out / STAGING_DIR
        with ranks.all_or_none(), out_of_space_as_error(out, f"{out} was left as it was."):
            share = ranks.share(jobs, o.batch_size)
            with memory_advice():
                pixels, nfe = sampler(share, progress=ranks.is_zero) if share else ([], 0)
            for (u, k), arr in zip(share, pixels):
                Image.fromarray(arr).save(staging / sample_name(u, k + 1), format="PNG")
        per_rank = ranks.gather(len(share))
        if ranks.is_zero:
            missing = [name for name in names if not (staging / name).is_file()]
            if missing:
                raise PipelineError(f"{len(missing)} sample(s) of other processes are not in {staging} (e.g. "
                                    f"{missing[0]}): with processes on several machines, --output_dir must be on a "
                                    "file system they all see. Nothing was written.")
            grid_jobs = [(u, k) for u in o.user_ids for k in range(min(o.num_samples_per_user, GRID_COLUMNS))]
            tiles = {(u, k): np.asarray(Image.open(staging / sample_name(u, k + 1))) for u, k in grid_jobs}
            grid_image(tiles, o.user_ids, o.num_samples_per_user).save(staging / GRID_NAME, format="PNG")
            if manifest is not None:
                write_text(staging / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
        staged.close()   # rank 0: the set moves in, before the stale samples go (still under the lock)
        if ranks.is_zero:
            if manifest is None:   # an earlier run's recipes would describe images no longer there
                (out / MANIFEST_NAME).unlink(missing_ok=True)
            removed = remove_stale_samples(out, keep=set(names))
            shares = f"; {ranks.world} processes sampled {' + '.join(map(str, per_rank))}" if ranks.world > 1 else ""
            log(f"stage 3 done: {len(names)} images ({o.sampler}, {nfe} model evaluations each{shares}) and "
                f"{GRID_NAME} in {out}" + (f", each sample's recipe in {MANIFEST_NAME}" if manifest else "")
                + (f"; removed {removed} sample(s) of an earlier run" if removed else ""))
    return [out / name for name in names]
