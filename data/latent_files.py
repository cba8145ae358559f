"""Stage 1's latent files read back (stages 2-4 and stage 1's own rerun check): the latents, their statistics,
and the checks that a folder holds one whole run of stage 1 whose files agree (written by data/latents.py)."""
import json
from pathlib import Path

import torch

from common.errors import PipelineError
from common.io import interrupted_replace, load_safetensors, read_safetensors_metadata, require_file
from data.repa_targets import TARGETS_FILE

STAGE1_FILES = ("train.safetensors", "val.safetensors", "latent_stats.safetensors", "split.json")
RUN_KEY = "stage1_run"      # the same random id in each of a run's files: a folder mixing two runs is refused


def check_finite(latents: torch.Tensor, names: list[str], what: str, advice: str) -> None:
    """Raise PipelineError naming the rows (by `names`, one per row) of `latents` (N, ...) holding inf or NaN."""
    bad = (~torch.isfinite(latents.flatten(1))).any(dim=1).nonzero().flatten().tolist() if latents.numel() else []
    if bad:
        shown = ", ".join(names[i] for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise PipelineError(f"{what}: {len(bad)} of {len(latents)} hold inf/NaN values ({shown}). {advice}")


def load_latents(latent_dir: str | Path, split: str, log=print) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(latents (N, C, h, w) float32, user_ids (N,) int64 class indices 0..K-1, metadata) of one split.

    The metadata's 'users' and 'user_numbers' name the K classes. A file without them (another tool) gets its
    ids compacted: the ids present in train.safetensors, sorted, become classes 0..K-1 named ID_<id>, numbered
    <id> (stage 3's --user_ids). Raises PipelineError, naming the file, for a missing or foreign file, a folder
    mixing two stage 1 runs, no latents, inf/NaN latents (naming the images), or ids the users do not cover.
    """
    latent_dir = Path(latent_dir)
    check_one_run(latent_dir)
    latents, user_ids, meta = _read_latent_file(latent_dir, split)
    names = meta.get("files") if len(meta.get("files") or []) == len(latents) else None
    check_finite(latents, names or [f"row {i} (user id {u})" for i, u in enumerate(user_ids.tolist())],
                 f"{latent_dir / f'{split}.safetensors'} holds latents that are not finite",
                 "Stage 2 cannot learn from them (a lower --lr would not help): rerun stage 1 "
                 f"(stage1_extract_features.py --output_path {latent_dir}), removing those images if stage 1 "
                 "names them too.")
    if "users" in meta:
        _check_user_table(latent_dir, split, user_ids, meta)
        return latents, user_ids, {**meta, "user_numbers": meta.get("user_numbers") or
                                   list(range(1, len(meta["users"]) + 1))}
    present = user_ids if split == "train" else _read_latent_file(latent_dir, "train")[1]
    present = torch.unique(present)
    unknown = sorted(set(torch.unique(user_ids).tolist()) - set(present.tolist()))
    if unknown:
        raise PipelineError(f"{latent_dir / f'{split}.safetensors'} has user id(s) {unknown} that train.safetensors "
                            "has no latents of: the generator could not learn them. Remove those rows or add "
                            "train latents of those users.")
    numbers = present.tolist()
    if split == "train" and numbers != list(range(len(numbers))):
        shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
        log(f"note: {latent_dir / 'train.safetensors'} names no users; its user ids ({shown}) become classes "
            f"0..{len(numbers) - 1}, named ID_<id> (stage 3 --user_ids takes the ids)")
    return latents, torch.searchsorted(present, user_ids), {**meta, "users": [f"ID_{n}" for n in numbers],
                                                             "user_numbers": numbers}


def check_latents_agree(latent_dir: str | Path, train: torch.Tensor, val: torch.Tensor, mean: torch.Tensor,
                        std: torch.Tensor) -> None:
    """train and val latents (N, C, h, w) and the statistics mean/std (1, C, 1, 1) of a latent folder must be of
    one latent space: the same C, the same square h x w. Raises PipelineError naming what disagrees (files mixed
    from different tokenizers, e.g. an SD-VAE's 4-channel latents beside a VA-VAE's 32-channel statistics)."""
    latent_dir = Path(latent_dir)
    stats_shape = (1, train.shape[1], 1, 1)
    if val.shape[1:] != train.shape[1:] or mean.shape != stats_shape or std.shape != stats_shape:
        raise PipelineError(
            f"the files of {latent_dir} disagree: train.safetensors holds latents (C, h, w) = {tuple(train.shape[1:])}, "
            f"val.safetensors {tuple(val.shape[1:])}, and latent_stats.safetensors a mean {tuple(mean.shape)} and std "
            f"{tuple(std.shape)} (expected {stats_shape}): they come from different tokenizers or tools. Rerun stage 1 "
            f"(stage1_extract_features.py --output_path {latent_dir}) to write all of them with one tokenizer.")
    side_h, side_w = train.shape[-2:]
    if side_h != side_w:
        raise PipelineError(f"{latent_dir}: the latents are {side_h}x{side_w}; the generator needs square latents "
                            "(stage 1 makes them from square centre crops). Rerun stage 1.")


def _read_latent_file(latent_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    path = latent_dir / f"{split}.safetensors"
    if not path.is_file():
        raise PipelineError(f"{path} not found. Run stage 1 (stage1_extract_features.py) with "
                            f"--output_path {latent_dir} first.")
    tensors, meta = load_safetensors(path)
    if "latents" not in tensors or "user_ids" not in tensors:
        raise PipelineError(f"{path} is not a stage 1 latent file (it lacks 'latents'/'user_ids').")
    latents, user_ids = tensors["latents"], tensors["user_ids"]
    if latents.ndim != 4 or len(latents) == 0 or user_ids.shape != (len(latents),):
        raise PipelineError(f"{path} holds latents of shape {tuple(latents.shape)} and user_ids of shape "
                            f"{tuple(user_ids.shape)}; stage 2 needs at least one (C, h, w) latent and one user id "
                            "per latent. Stage 1 always writes val latents (it holds out train images when val/ "
                            f"is empty): rerun it with --output_path {latent_dir}.")
    if user_ids.is_floating_point() or user_ids.is_complex() or (len(user_ids) and int(user_ids.min()) < 0):
        raise PipelineError(f"{path}: user_ids must be non-negative integers (found dtype {user_ids.dtype}, "
                            f"minimum {user_ids.min().item()}).")
    return latents.float(), user_ids.long(), meta


def _check_user_table(latent_dir: Path, split: str, user_ids: torch.Tensor, meta: dict) -> None:
    """Ids index the metadata's users; in train each user has latents (else its class is never trained)."""
    path, users = latent_dir / f"{split}.safetensors", list(meta["users"])
    numbers = meta.get("user_numbers")
    if numbers is not None and len(numbers) != len(users):
        raise PipelineError(f"{path}: its metadata names {len(users)} users but {len(numbers)} user numbers.")
    outside = sorted(set(user_ids.tolist()) - set(range(len(users))))
    if outside:
        raise PipelineError(f"{path} has user id(s) {outside[:10]} but its metadata names {len(users)} users "
                            f"({', '.join(users[:10])}), ids 0..{len(users) - 1}. The file and its metadata "
                            "disagree: rewrite it with stage 1, or fix its 'users' metadata.")
    if split == "train":
        untrained = [u for c, u in enumerate(users) if not (user_ids == c).any()]
        if untrained:
            raise PipelineError(f"{path} has no latents of user(s) {', '.join(untrained[:10])} named in its "
                                "metadata: their class would never be trained. Remove them from 'users' or add "
                                "their latents.")


def check_one_run(latent_dir: str | Path) -> None:
    """Raise PipelineError when stage 1's files in latent_dir come from different runs (a run stopped while
    replacing them, or files copied in from another run). Files of an older stage 1 or another tool carry
    no run id: a folder where none has one is not checked."""
    latent_dir = Path(latent_dir)
    if interrupted_replace(latent_dir):
        raise PipelineError(f"a stage 1 run stopped while replacing its files in {latent_dir}, so they may mix two "
                            f"runs. Rerun stage 1 (stage1_extract_features.py --output_path {latent_dir}).")
    runs = {}
    for name in (*STAGE1_FILES, TARGETS_FILE):
        path = latent_dir / name
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text()) if path.suffix == ".json" else read_safetensors_metadata(path)
        except Exception:   # unreadable: the loader of that file names it
            continue
        runs[name] = meta.get(RUN_KEY) if isinstance(meta, dict) else None
    if len(set(runs.values())) > 1:
        listed = "; ".join(f"{name}: {run[:8] if run else 'no run id'}" for name, run in runs.items())
        raise PipelineError(f"{latent_dir} mixes the files of different stage 1 runs ({listed}). Rerun stage 1 "
                            f"(stage1_extract_features.py --output_path {latent_dir}) to write all of them anew.")


def load_stats(latent_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean and std, each (1, C, 1, 1) float32, from the same stage 1 run as the latents."""
    check_one_run(latent_dir)
    tensors, _ = load_safetensors(require_file(Path(latent_dir) / "latent_stats.safetensors",
                                               "latent statistics (latent_stats.safetensors from stage 1)"))
    return tensors["mean"], tensors["std"]
