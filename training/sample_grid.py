"""Validation previews: watch identity emerge while stage 2 trains, as sample grids and as a score.

At each validation, global rank 0 samples a few users with the EMA model (the default sampler at few steps,
no guidance, the same noise every time so that grids compare across validations), decodes them with the
stage 1 tokenizer, writes <output_dir>/val_grids/step_NNNNNN.png and latest.png, and logs the grid to
TensorBoard (tag val_grid).

The score, val_identity, needs no decoding: the noisy-latent user classifier (training/latent_classifier.py)
says which user each of a few unguided EMA samples per user looks like; the share given to their own user is
logged beside val_loss (metrics.csv, TensorBoard, the progress bar).

Decoding is the cost of a grid (the demo tokenizer decodes ~1 image/s on a 2-core CPU): at most GRID_TIME_SHARE of
the run goes to grids, and as much again to the score. The first validation always gets one; a later one is skipped while the grids so far
plus the next would exceed that share of the time trained (on a GPU, where a grid takes a fraction of a
second, every validation gets its grid).
"""
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from common.errors import PipelineError
from common.io import atomic_path, file_sha256, require_file
from models.checkpoint import PipelineInfo
from models.latent_classifier import classifier_from_entry
from models.sampling import grid_image, sample_images
from models.vavae import check_tokenizer_fits, load_vavae
from training.latent_classifier import sample_identity

GRID_DIR = "val_grids"
LATEST = "latest.png"
GRID_STEPS = 8          # half of stage 3's 16: a preview, at half the cost
GRID_SEED = 0
GRID_TIME_SHARE = 0.05  # of the run's wall time, at most (see the module docstring), for grids and for the score each


def grid_due(spent_s: float, last_cost_s: float, elapsed_s: float, share: float) -> bool:
    """Whether a validation gets a grid: always the first (nothing spent yet), later ones while the time spent
    on grids plus one more stays within `share` of the time since training started."""
    return spent_s == 0 or spent_s + last_cost_s <= share * elapsed_s


class ValidationGrid(pl.Callback):
    """The grid of `users` x `samples` EMA samples after every validation (see the module docstring)."""
    def __init__(self, vavae_path: str, folder: Path, users: int, samples: int):
        self.vavae_path, self.folder = vavae_path, Path(folder)
        self.users, self.samples = users, samples
        self.vae = None   # loaded on first use, on rank 0 only
        self.time_share = GRID_TIME_SHARE
        self.started, self.spent, self.last_cost = time.monotonic(), 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.monotonic()
        if trainer.is_global_zero and trainer.global_step == 0 and self.folder.is_dir():
            for stale in self.folder.glob("*.png"):   # a fresh run: grids of an earlier one would mislead
                stale.unlink()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        begin = time.monotonic()
        if not grid_due(self.spent, self.last_cost, begin - self.started, self.time_share):
            return
        pixels, users = self.sample(pl_module)
        step = trainer.global_step
        image = grid_image(dict(zip(self.jobs(users), pixels)), users, self.samples)
        for path in (self.folder / f"step_{step:06d}.png", self.folder / LATEST):
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        grid = np.asarray(image.convert("RGB"))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val_grid", grid, global_step=step, dataformats="HWC")
        self.last_cost = time.monotonic() - begin
        self.spent += self.last_cost

    def jobs(self, users: list[int]) -> list[tuple[int, int]]:
        return [(u, k) for u in users for k in range(self.samples)]

    def sample(self, pl_module: pl.LightningModule) -> tuple[np.ndarray, list[int]]:
        """(N, H, W, 3) uint8 decoded EMA samples of the first users, and those users' numbers."""
        device = str(pl_module.device)
        if self.vae is None:
            self.vae = load_vavae(self.vavae_path, device=device)
        info: PipelineInfo = pl_module.info
        users = info.user_numbers[: self.users]
        ema = pl_module.ema
        was_training = ema.training
        ema.eval()   # no label dropout, whatever mode Lightning left the module in
        try:
            pixels, _ = sample_images(ema, self.vae, info, self.jobs(users), guidance_scale=1.0,
                                      num_steps=GRID_STEPS, seed=GRID_SEED, batch_size=len(users) * self.samples,
                                      device=device, progress=False)
        finally:
            ema.train(was_training)
        return pixels, users


class ValidationIdentity(pl.Callback):
    """val_identity after a validation, on global rank 0, within GRID_TIME_SHARE of the run (see the module
    docstring); the first validation always gets one."""
    def __init__(self, samples_per_user: int):
        self.samples_per_user = samples_per_user
        self.scorer = None   # the classifier of info.latent_classifier, on the module's device
        self.started, self.spent, self.last_cost = time.monotonic(), 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.monotonic()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        info: PipelineInfo = pl_module.info
        if not trainer.is_global_zero or trainer.sanity_checking or info.latent_classifier is None:
            return
        begin = time.monotonic()
        if not grid_due(self.spent, self.last_cost, begin - self.started, GRID_TIME_SHARE):
            return
        if self.scorer is None or next(self.scorer.parameters()).device != pl_module.device:
            self.scorer = classifier_from_entry(info.latent_classifier, pl_module.device)
        ema = pl_module.ema
        was_training = ema.training
        ema.eval()   # no label dropout
        try:
            identity = sample_identity(ema, self.scorer, ema.num_classes, self.samples_per_user,
                                       tuple(pl_module.train_x.shape[1:]), seed=GRID_SEED, device=pl_module.device)
        finally:
            ema.train(was_training)
        pl_module.log("val_identity", identity, prog_bar=True, rank_zero_only=True)
        self.last_cost = time.monotonic() - begin
        self.spent += self.last_cost


def identity_callbacks(samples_per_user: int, classifier_steps: int) -> list[pl.Callback]:
    """[ValidationIdentity] when asked for (samples_per_user > 0) and stage 2 has a classifier (classifier_steps > 0),
    else []."""
    return [ValidationIdentity(samples_per_user)] if samples_per_user > 0 and classifier_steps > 0 else []


def sample_grid_callbacks(vavae_path: str | None, users: int, samples: int, info: PipelineInfo, output_dir: Path,
                          log=print) -> list[pl.Callback]:
    """[ValidationGrid] when asked for (users and samples > 0) and a tokenizer is given, else [] (with one note
    when only the tokenizer is missing). PipelineError if the tokenizer is not the one of the latents."""
    if users <= 0 or samples <= 0:
        return []
    if not vavae_path:
        log("note: no validation sample grids: pass --vavae_path (the stage 1 tokenizer) to watch samples emerge "
            f"in {Path(output_dir) / GRID_DIR} and TensorBoard, or --val_grid_users 0 to silence this")
        return []
    require_file(vavae_path, "--vavae_path (the stage 1 tokenizer)")
    if info.tokenizer_sha256 and file_sha256(vavae_path) != info.tokenizer_sha256:
        raise PipelineError(f"--vavae_path {vavae_path} is not the tokenizer that made the stage 1 latents "
                            f"({info.tokenizer or '?'}, sha256 {info.tokenizer_sha256[:12]}...): its grids would "
                            "decode to noise. Pass the tokenizer used in stage 1, or leave --vavae_path out.")
    if not info.tokenizer_sha256:   # latents of another tool: the sha256 check above could not tell
        check_tokenizer_fits(load_vavae(vavae_path), vavae_path, info.image_size, info.model_config["in_channels"],
                             info.model_config["input_size"], "the stage 1 latents are of",
                             "Pass the tokenizer that made them, or leave --vavae_path out.")
    return [ValidationGrid(vavae_path, Path(output_dir) / GRID_DIR, users, samples)]
