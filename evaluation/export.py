"""Which samples are worth keeping, and the ready dataset (real train + accepted samples, real val) they go into."""
import shutil
from pathlib import Path
from typing import Callable

import torch

from common.io import atomic_path
from data.images import User
from data.samples import remove_stale_samples
from evaluation.imageset import ImageSet


def accepted_samples(gen: ImageSet, probs: torch.Tensor, copies: torch.Tensor, min_confidence: float,
                     min_margin: float, max_confidence: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted, confident) masks, (N_gen,) bool: samples the classifier gives their own user with a top-1
    probability in [min_confidence, max_confidence] and a margin over the second of at least min_margin, minus
    copies. probs: (N_gen, K) float softmax of the judge.

    Copies of training images are left out: they would add nothing but duplicates. max_confidence below 1 keeps a
    confidence band rather than the top: the samples the judge is surest of are its prototypes, not the variety a
    classifier learns from (AdaInf, Wang et al., ICLR 2024).
    """
    top2 = probs.topk(min(2, probs.shape[1]), dim=1)
    p1 = top2.values[:, 0]
    p2 = top2.values[:, 1] if probs.shape[1] > 1 else torch.zeros_like(p1)
    confident = ((top2.indices[:, 0] == gen.labels) & (p1 >= min_confidence) & (p1 <= max_confidence)
                 & (p1 - p2 >= min_margin))
    return confident & ~copies, confident


def _copy_into(files: list[Path], folder: Path) -> None:
    for path in files:
        with atomic_path(folder / path.name) as tmp:
            shutil.copyfile(path, tmp)


def export_dataset(users: list[User], gen: ImageSet, accepted: torch.Tensor, export_dir: Path,
                   log: Callable[[str], None]) -> dict:
    """export_dir/train/<user>/ = real train images + accepted samples, export_dir/val/<user>/ = real val.

    The result is a ready dataset for a user's own classifier and for stage 1. Samples keep their
    micro_doppler_userNN_KKK.png names, so they stay recognisable; the previous export's samples are
    removed first, so a rerun with other thresholds leaves exactly the new selection.
    """
    per_user = {}
    for c, user in enumerate(users):
        train_folder, val_folder = export_dir / "train" / user.name, export_dir / "val" / user.name
        if train_folder.is_dir():
            remove_stale_samples(train_folder)
        chosen = (accepted & (gen.labels == c)).nonzero().flatten().tolist()
        _copy_into(list(user.files["train"]) + [gen.paths[i] for i in chosen], train_folder)
        if user.files.get("val"):
            _copy_into(list(user.files["val"]), val_folder)
        per_user[str(user.number)] = len(chosen)
    total = int(accepted.sum())
    log(f"export: real train + {total} of {len(gen)} generated images in {export_dir / 'train'}, real val in "
        f"{export_dir / 'val'}")
    return {"total": total, "per_user": per_user}


def export_report(users: list[User], gen: ImageSet, accepted: torch.Tensor, confident: torch.Tensor,
                  copies: torch.Tensor, export_dir: str | Path | None, min_confidence: float, min_margin: float,
                  max_confidence: float, log: Callable[[str], None]) -> dict:
    """The report's export block; writes the dataset (export_dataset) when export_dir is given."""
    export = {"enabled": export_dir is not None, "dir": str(export_dir) if export_dir else None,
              "min_confidence": min_confidence, "max_confidence": max_confidence, "min_margin": min_margin,
              "of": len(gen), "accepted": int(accepted.sum()),
              "excluded_as_copies": int((confident & copies).sum())}
    if export_dir is not None:
        export.update(export_dataset(users, gen, accepted, Path(export_dir), log))
    return export
