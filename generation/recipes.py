"""Stage 3's per-sample recipes, for samples that train a classifier better: each sample's guidance scale drawn from
a range (--guidance_scale_range), real-anchored starts from stage 1's train latents (--real_anchored_strength,
SDEdit / DA-Fusion; the folder checked against the checkpoint), and the manifest that records each sample's recipe
and anchor image (micro_doppler_samples.json) so that stage 4's near-copy check can be read against it.

The sampling itself is models.sampling.PerSampleRecipes (shared with stage 2's grids); this module turns the flags
and files into one.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from common.errors import PipelineError
from data.latent_files import RUN_KEY, load_latents, load_stats
from data.samples import sample_name
from models.checkpoint import PipelineInfo
from models.sampling import PerSampleRecipes


@dataclass(frozen=True)
class AnchorBank:
    """The train latents real-anchored sampling starts from, per user number: `latents` (n, C, h, w) float32,
    normalised as stage 2 trained on them; `rows` their rows in train.safetensors; `files` their images, as stage 1
    names them (relative to its --data_dir; None where its metadata names none)."""
    latent_dir: Path
    stage1_run: str
    latents: dict[int, torch.Tensor]
    rows: dict[int, list[int]]
    files: dict[int, list[str | None]]


def flag_range(values: Sequence[float] | None, flag: str, check: Callable[[str], float],
               counts: tuple[int, ...] = (1, 2)) -> tuple[float, float] | None:
    """A flag of one value or a range LOW HIGH as (low, high) (one value: (v, v)); None when not given.
    check: the flag's parse-time checker (common.config.Number), applied again for values that skipped the
    command line (Options.defaults). Raises PipelineError for another count of values, a value out of bounds,
    or LOW > HIGH."""
    if values is None:
        return None
    if len(values) not in counts:
        wanted = " or ".join(map(str, counts))
        raise PipelineError(f"{flag} takes {wanted} value(s) (got {len(values)}: {' '.join(map(str, values))}); "
                            f"two are a range LOW HIGH that each sample draws from")
    for value in values:
        try:
            check(repr(float(value)))
        except argparse.ArgumentTypeError as err:
            raise PipelineError(f"{flag}: {err}") from None
    low, high = float(values[0]), float(values[-1])
    if low > high:
        raise PipelineError(f"{flag} {low:g} {high:g}: the range must be LOW HIGH with LOW <= HIGH "
                            f"(pass {flag} {high:g} {low:g})")
    return low, high


def load_anchor_bank(latent_dir: str, info: PipelineInfo, user_numbers: list[int], checkpoint: str) -> AnchorBank:
    """The train latents of `user_numbers` in stage 1's folder `latent_dir`, normalised with the checkpoint's
    statistics ((x - latent_mean) / latent_std, as training/dit_module.py does).

    Raises PipelineError for a folder without train.safetensors, one of another stage 1 run than the checkpoint's
    (its run id; for a checkpoint written before run ids were recorded, its latent statistics and users), and a
    user with no train latents there (stage 1's own checks on the folder included: data.latent_files)."""
    folder = Path(latent_dir)
    if not (folder / "train.safetensors").is_file():
        raise PipelineError(f"--latent_dir {latent_dir} holds no train.safetensors: pass the stage 1 folder "
                            f"(stage1_extract_features.py --output_path) that stage 2 trained {checkpoint} on.")
    latents, classes, meta = load_latents(folder, "train", log=lambda message: None)
    run = meta.get(RUN_KEY) or ""
    redo = (f"Pass the stage 1 folder that stage 2 trained {checkpoint} on (run_complete_pipeline.py writes it to "
            "<output_dir>/latent_features), or train stage 2 again on this one.")
    if info.stage1_run and run != info.stage1_run:
        raise PipelineError(f"--latent_dir {latent_dir} holds the latents of stage 1 run {run[:8] or '(no id)'}, "
                            f"but {checkpoint} was trained on run {info.stage1_run[:8]}: its train images or their "
                            f"normalisation differ. {redo}")
    if not info.stage1_run:   # an older checkpoint: the same statistics and users stand for the same run
        mean, std = load_stats(folder)
        same = (torch.equal(mean, info.latent_mean.cpu()) and torch.equal(std, info.latent_std.cpu())
                and list(meta["user_numbers"]) == list(info.user_numbers))
        if not same:
            raise PipelineError(f"--latent_dir {latent_dir} is not the stage 1 folder {checkpoint} was trained on "
                                f"(its latent statistics or users differ). {redo}")
    numbers = list(meta["user_numbers"])
    names = meta.get("files") if len(meta.get("files") or []) == len(latents) else None
    normalised = (latents - info.latent_mean.cpu()) / info.latent_std.cpu()
    bank: dict[int, list[int]] = {u: [] for u in user_numbers}
    for row, cls in enumerate(classes.tolist()):
        if numbers[cls] in bank:
            bank[numbers[cls]].append(row)
    missing = [u for u, rows in bank.items() if not rows]
    if missing:
        raise PipelineError(f"--real_anchored_strength: user(s) {', '.join(map(str, missing))} have no train latents "
                            f"in {folder / 'train.safetensors'} to start from. Leave them out of --user_ids, or "
                            "sample them without --real_anchored_strength.")
    return AnchorBank(folder, run, {u: normalised[rows] for u, rows in bank.items()}, bank,
                      {u: [names[r] if names else None for r in rows] for u, rows in bank.items()})


def per_sample_recipes(guidance_scale: float, guidance_scale_range: tuple[float, float] | None,
                       strength: tuple[float, float] | None,
                       bank: AnchorBank | None) -> PerSampleRecipes | None:
    """The sampler's recipes for the flags, or None when neither per-sample mode is on (stage 3 as before)."""
    if guidance_scale_range is None and strength is None:
        return None
    return PerSampleRecipes(guidance_scale_range or (guidance_scale, guidance_scale), strength,
                            bank.latents if bank is not None else None)


def recipe_manifest(recipes: PerSampleRecipes, bank: AnchorBank | None, jobs: list[tuple[int, int]], seed: int,
                    checkpoint: str) -> dict[str, Any]:
    """micro_doppler_samples.json's contents: the run's recipe flags and, per sample file, its guidance scale,
    strength and anchor (its train image as stage 1 names it, relative to stage 1's --data_dir, and its row in
    train.safetensors). Every value is a function of (seed, user, sample), so rank 0 writes it for all ranks."""
    samples = []
    for u, k in jobs:
        recipe = recipes.recipe(seed, u, k)
        entry: dict[str, Any] = {"file": sample_name(u, k + 1), "user": u, "sample": k + 1,
                                 "guidance_scale": recipe.guidance_scale}
        if bank is not None and recipe.anchor is not None:
            entry.update(strength=recipe.strength, anchor_file=bank.files[u][recipe.anchor],
                         anchor_train_row=bank.rows[u][recipe.anchor])
        samples.append(entry)
    return {"dit_checkpoint": str(Path(checkpoint).resolve()), "seed": seed,
            "guidance_scale": list(recipes.guidance_scale),
            "real_anchored_strength": list(recipes.strength) if recipes.strength else None,
            "latent_dir": str(bank.latent_dir.resolve()) if bank else None,
            "stage1_run": bank.stage1_run if bank else None, "samples": samples}

