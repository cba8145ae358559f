"""Stage 2's Lightning housekeeping, beside the model and the checkpoints: atomic checkpoint I/O read back with
weights_only=True (AtomicCheckpointIO), progress as a tqdm bar or plain log lines (progress_callback,
LineProgress), Lightning's misleading warnings and adverts silenced (quiet_lightning_warnings, DropAdverts), the
CSV metrics kept across a resume (KeepMetricsHistory) and drawn as loss_curve.png (plot_loss_curve), and the
callback of the LoRA fine-tune mode (HalfPrecisionBase; the modes themselves are in training/finetune.py, free
of Lightning). The checkpoint-writing callbacks are in training/checkpoints.py."""
import csv
import logging
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import TorchCheckpointIO

from common.io import atomic_path, save_torch
from common.progress import due, is_terminal, progress_line
from models.checkpoint import load_checkpoint
from training import lightning_private
from training.finetune import halve_base_weights


class HalfPrecisionBase(pl.Callback):
    """Before the weights reach the GPU (and before a resumed checkpoint is loaded into them), store the
    frozen base projections of a `--finetune lora` model in the autocast dtype of a mixed-precision CUDA run."""
    DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}

    def __init__(self, device_types: tuple[str, ...] = ("cuda",)):
        self.device_types = device_types

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dtype = self.DTYPES.get(str(trainer.precision))
        if dtype is not None and trainer.strategy.root_device.type in self.device_types:
            halve_base_weights(pl_module.model, dtype)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written beside their final name, then renamed: a kill mid-save keeps the previous
    last.ckpt whole (Lightning's own save stages the file in /tmp and moves it, a copy when /tmp is
    another disk, e.g. a mounted drive). Resuming reads with weights_only=True whatever the Lightning version
    (trainer.fit(weights_only=...) only exists from Lightning 2.6)."""
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_torch(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint(path)


def progress_callback() -> pl.callbacks.ProgressBar:
    """A tqdm bar in a terminal; in a log (Kaggle, CI, nohup) a plain line now and then. Both count the run's
    optimizer steps, so the time left is the run's, not the epoch's."""
    return RunProgressBar(refresh_rate=10) if is_terminal() else LineProgress()


class RunProgressBar(TQDMProgressBar):
    """Lightning's terminal bar over the whole run: Lightning's own restarts at every epoch, so its "left" was the
    epoch's (seconds) while the run had hours to go. Here the total is the run's optimizer steps
    (trainer.estimated_stepping_batches: --max_steps, or epochs x steps per epoch), the count is the global step,
    and a resumed run's rate counts only the steps this process trained."""
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)   # makes the bar; a resumed run's step is restored by now
        bar = self.train_progress_bar
        bar.reset(total=int(trainer.estimated_stepping_batches))
        bar.initial = bar.n = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"stage 2, epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bar, step, total = self.train_progress_bar, trainer.global_step, int(trainer.estimated_stepping_batches)
        if step % self.refresh_rate == 0 or step >= total:
            bar.total, bar.n = total, step
            bar.set_postfix(self.get_metrics(trainer, pl_module))   # refreshes the bar


class LineProgress(pl.callbacks.ProgressBar):
    """'stage 2: step 120/1400 (9%), epoch 3, 4.1 steps/s, 0:00:29 elapsed, ~0:04:52 left, train_loss=...'
    at the start, every LINE_EVERY_S seconds or further tenth of the run, and at the end (rank 0 only)."""
    def __init__(self):
        super().__init__()
        self.enabled = True
        self.start = (0.0, 0)        # (time, step) when this run (or resume) started
        self.last = (0.0, -1)        # (time, step) of the last line

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.last = (time.monotonic(), trainer.global_step)
        self.print_line(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx) -> None:
        if due(time.monotonic(), self.last[0], trainer.global_step, self.last[1], self.total_steps(trainer)):
            self.print_line(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self.last[1]:
            self.print_line(trainer, pl_module)

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> int:
        return int(trainer.estimated_stepping_batches)

    def print_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now, step, total = time.monotonic(), trainer.global_step, self.total_steps(trainer)
        self.last = (now, step)
        if not self.enabled:
            return
        elapsed = now - self.start[0]
        rate = (step - self.start[1]) / elapsed if elapsed > 0 else 0.0
        left = f", ~{timedelta(seconds=round((total - step) / rate))} left" if rate > 0 else ""
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "".join(f", {k}={v:.4g}" if isinstance(v, float) else f", {k}={v}" for k, v in metrics.items())
        progress_line(f"stage 2: step {step}/{total} ({100 * step // max(total, 1)}%), epoch {trainer.current_epoch}, "
                   f"{rate:.2f} steps/s, {timedelta(seconds=round(elapsed))} elapsed{left}{shown}")


def quiet_lightning_warnings() -> None:
    """Lightning messages that mislead here: the CSV history is kept on resume (KeepMetricsHistory), and the
    EMA copy is in eval mode on purpose. Message texts checked on Lightning 2.2.1, 2.3.3, 2.4.0, 2.5.0 and
    2.6.6 (the eval-mode one exists from 2.6 only); the minimum-version CI run (.ci/run) covers them."""
    warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    # Noise for a stage 2 user: each step is logged (on_step), so a short epoch loses nothing; the pytree
    # deprecation is Lightning's own use of torch (2.6.6 with torch >= 2.9); the cloud-logging advert (2.6).
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # torch >= 2.10 deprecates DDP's broadcast_buffers, but its successor still syncs buffers at init, and ours
    # are rank-local on purpose (train_dit.build_trainer); torch's own message says to keep
    # broadcast_buffers=False until then.
    warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated", category=FutureWarning)
    # val_identity is scored by global rank 0 alone (training/sample_grid.py): there is nothing to reduce.
    warnings.filterwarnings("ignore", message=r".*self.log\('val_identity', \.\.\., sync_dist=True\)")
    rank_zero_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, DropAdverts) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(DropAdverts())


class DropAdverts(logging.Filter):
    """Drops Lightning's 'Tip: ... install litlogger' line (an advert for a cloud service, printed every run)."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


class KeepMetricsHistory(pl.Callback):
    """CSVLogger deletes an existing metrics.csv: on resume, log again the rows from before the
    checkpoint's step so that metrics.csv and the loss curve cover the whole run."""
    def __init__(self, logger: CSVLogger):
        self.logger = logger
        path = Path(logger.log_dir) / "metrics.csv"
        self.rows = list(csv.DictReader(path.open(newline=""))) if path.is_file() else []
        self.resumed = self.noted = False   # noted: the note on a Lightning without the logging-step count, once

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resumed = trainer.global_step > 0
        if trainer.global_rank != 0 or trainer.global_step == 0:
            return
        for row in self.rows:
            if row.get("step") and int(row["step"]) < trainer.global_step:
                self.logger.experiment.log_metrics(
                    {k: float(v) for k, v in row.items() if k != "step" and v not in ("", None)}, int(row["step"]))
        self.logger.save()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        # Lightning's logging step is one ahead after resuming from a checkpoint saved at an epoch end;
        # without gradient accumulation it is the global step, as in an uninterrupted run. A private attribute
        # (no public setter; logging a "step" metric would drop the step column's meaning for epoch-end rows),
        # behind training/lightning_private.py's fence: checked on Lightning 2.2.1, 2.3.3, 2.4.0, 2.5.0 and 2.6.6;
        # tests/test_resume.py's kill -9 test, which the minimum-version CI run (.ci/run) includes, compares
        # metrics.csv with an uninterrupted run's.
        stepped = lightning_private.set_logging_step(trainer, trainer.global_step)
        if not stepped and self.resumed and not self.noted and trainer.is_global_zero:
            self.noted = True
            print("note: this PyTorch Lightning has no fit_loop.epoch_loop."
                  f"{lightning_private.LOGGING_STEP_COUNT}: after this resume, metrics.csv may log steps one ahead",
                  flush=True)


def plot_loss_curve(metrics_csv: Path, png: Path) -> None:
    """Train loss per step (and its epoch mean) and EMA val loss per epoch, from Lightning's CSV log."""
    if not metrics_csv.is_file():
        return
    # Agg (a file, no display) is chosen when a curve is drawn: importing training/ (a notebook) keeps its backend
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # after use("Agg"), so no display is opened
    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            for key in ("train_loss_step", "train_loss_epoch", "val_loss"):
                if row.get(key):
                    series.setdefault(key, []).append((float(row["step"]), float(row[key])))
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"train_loss_step": dict(alpha=0.35, lw=0.8, label="train (step)"),
              "train_loss_epoch": dict(marker="o", ms=3, label="train (epoch mean)"),
              "val_loss": dict(marker="s", ms=3, label="val, EMA, fixed noise")}
    for key, points in series.items():
        ax.plot(*zip(*points), **styles[key])
    ax.set_xlabel("step"), ax.set_ylabel("flow-matching loss"), ax.set_yscale("log"), ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
