"""Stage 1 logic: encode every image once with the frozen VA-VAE and write the latent files (read back by
data/latent_files.py)."""
import json
import tempfile
import uuid
from dataclasses import dataclass
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch.utils.data import DataLoader

from common.device import inference_autocast, inference_dtype, resolve_device
from common.errors import PipelineError
from common.io import file_sha256, replaced_together, require_file, save_safetensors, write_text
from common.lock import run_lock
from common.progress import progress_bar
from data.cli import ExtractOptions
from data.images import ImageFiles, User, crop_note, load_bank, scan_dataset, skip_message, skipped_count
from data.latent_files import RUN_KEY, STAGE1_FILES, check_finite
from data.repa_targets import TARGETS_FILE, build_targets
from models.vavae import load_vavae, reconstruction_psnr

LOCK_NAME = "stage1.lock"   # one stage 1 run per --output_path (common/lock.py)


#################################################################################
#                                 Extraction                                    #
#################################################################################

@dataclass
class Encoded:
    """The readable files of a list, encoded, in the list's order."""
    latents: torch.Tensor       # (N, C, h, w) float32
    labels: torch.Tensor        # (N,) int64 class index
    positions: torch.Tensor     # (N,) int64 position of each in the list of files
    shapes: torch.Tensor        # (N, 2) int64 (width, height) of each file, px
    skipped: list[str]          # the unreadable files

    def files(self, items: list[tuple[Path, int]]) -> list[Path]:
        """The encoded files, one per latent."""
        return [items[i][0] for i in self.positions.tolist()]


@torch.no_grad()
def encode_items(vae, items: list[tuple[Path, int]], image_size: int, batch_size: int,
                 num_workers: int, device: str, desc: str, position: int = 0,
                 autocast: Callable[[], ContextManager] = nullcontext) -> Encoded:
    """Encode the (file, class index) items on one device, each batch's forward pass under autocast() (latents
    returned in float32); unreadable files are named as they are met and listed in Encoded.skipped."""
    loader = DataLoader(ImageFiles([path for path, _ in items], image_size), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=list, shuffle=False)
    latents, labels, positions, shapes, skipped = [], [], [], [], []
    for batch in progress_bar(loader, desc=desc, unit="batch", position=position, dynamic_ncols=True):
        for read in batch:
            if read.image is None:
                skipped.append(str(items[read.index][0]))
                print(skip_message(items[read.index][0], read.problem))
        good = [read for read in batch if read.image is not None]
        if not good:
            continue
        x = torch.stack([read.image for read in good]).to(device)
        with autocast():
            latents.append(vae.encode(x).float().cpu())
        labels.append(torch.tensor([items[read.index][1] for read in good], dtype=torch.int64))
        positions.append(torch.tensor([read.index for read in good], dtype=torch.int64))
        shapes.append(torch.tensor([read.size_px for read in good], dtype=torch.int64))
    if not latents:
        empty = torch.empty(0, dtype=torch.int64)
        return Encoded(torch.empty(0), empty, empty, torch.empty(0, 2, dtype=torch.int64), skipped)
    return Encoded(torch.cat(latents), torch.cat(labels), torch.cat(positions), torch.cat(shapes), skipped)


def _encode_shard(rank: int, world: int, vavae_path: str, items, image_size, batch_size, num_workers, out_dir: str,
                  precision: str):
    """One GPU's share of the files (spawned per device); results go to a temporary file."""
    vae = load_vavae(vavae_path, device=f"cuda:{rank}")
    part = encode_items(vae, items[rank::world], image_size, batch_size, num_workers, f"cuda:{rank}", f"gpu{rank}",
                        position=rank, autocast=inference_autocast(precision, f"cuda:{rank}"))
    # Positions back in the full list: shard r holds items r, r + world, ...
    part.positions = part.positions * world + rank
    torch.save(vars(part), Path(out_dir) / f"shard{rank}.pt")


def encode_all(vavae_path: str, items: list[tuple[Path, int]], image_size: int, batch_size: int,
               num_workers: int, device: torch.device, devices: int, desc: str, precision: str = "32-true") -> Encoded:
    """Encode on `device`, or split the files over `devices` GPUs when it is CUDA without an index (order is kept),
    in `precision` (common.device.inference_autocast)."""
    n_gpu = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 0
    if devices > 1 and n_gpu >= 2:
        devices = min(devices, n_gpu)
        with tempfile.TemporaryDirectory() as tmp:
            torch.multiprocessing.spawn(_encode_shard, nprocs=devices, join=True,
                                        args=(devices, vavae_path, items, image_size, batch_size, num_workers, tmp,
                                              precision))
            parts = [torch.load(Path(tmp) / f"shard{r}.pt", weights_only=True) for r in range(devices)]
        order = torch.argsort(torch.cat([p["positions"] for p in parts]))   # back to file order
        joined = {key: torch.cat([p[key] for p in parts])[order] for key in ("latents", "labels", "positions", "shapes")}
        return Encoded(**joined, skipped=[s for p in parts for s in p["skipped"]])
    if devices > 1:
        print(f"note: --devices {devices} asked for but {n_gpu} GPU(s) to use; encoding on {device}")
    vae = load_vavae(vavae_path, device=str(device))
    return encode_items(vae, items, image_size, batch_size, num_workers, str(device), desc,
                        autocast=inference_autocast(precision, device))


def latent_stats(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std over (N, H, W), shaped (1, C, 1, 1) like the reference."""
    mean = latents.mean(dim=(0, 2, 3), keepdim=True)
    std = latents.permute(1, 0, 2, 3).flatten(1).std(dim=1, unbiased=True).view(1, -1, 1, 1)
    return mean, std


#################################################################################
#                        Does the tokenizer know these images?                  #
#################################################################################

# Below this PSNR reconstructions lose what tells people apart: the demo tokenizer at 22.8 dB already
# cut identity on its reconstructions from 0.85 to 0.65, and one trained on another look gave 6 dB.
TOKENIZER_WARN_DB = 24.0


def tokenizer_psnr_check(vavae_path: str, users: list[User], image_size: int, num_images: int, device: str,
                         log=print, precision: str = "32-true") -> dict[str, Any]:
    """Reconstruct ~num_images train images spread over the users (in `precision`, as stage 1 encodes); PSNR
    in dB overall and for the worst user."""
    per_user = max(1, -(-num_images // len(users)))
    picked = []     # per user, evenly spaced train files
    for user in users:
        files = user.files["train"]
        picked.append(files[::max(1, len(files) // per_user)][:per_user])
    banks = [load_bank(files, image_size, log=log) for files in picked]     # unreadable files are left out
    images = torch.cat(banks)
    labels = torch.cat([torch.full((len(bank),), cls) for cls, bank in enumerate(banks)])
    psnr = reconstruction_psnr(load_vavae(vavae_path, device=device), images,
                               autocast=inference_autocast(precision, device))
    per_user_psnr = {users[c].name: psnr[labels == c].mean().item() for c in labels.unique().tolist()}
    worst = min(per_user_psnr, key=per_user_psnr.get)
    result = {"tokenizer_psnr_db": round(psnr.mean().item(), 2), "tokenizer_psnr_images": len(images),
              "tokenizer_psnr_worst_user": worst, "tokenizer_psnr_worst_db": round(per_user_psnr[worst], 2)}
    log(f"tokenizer check: reconstruction PSNR {result['tokenizer_psnr_db']:.1f} dB over {len(images)} train "
        f"images of {len(per_user_psnr)} users (worst: {worst}, {result['tokenizer_psnr_worst_db']:.1f} dB)")
    if result["tokenizer_psnr_db"] < TOKENIZER_WARN_DB or result["tokenizer_psnr_worst_db"] < TOKENIZER_WARN_DB - 3:
        log("\n" + "!" * 100 + f"\nWARNING: this tokenizer reconstructs your images at only "
            f"{result['tokenizer_psnr_db']:.1f} dB (worst user {result['tokenizer_psnr_worst_db']:.1f} dB; "
            f"{TOKENIZER_WARN_DB:.0f} dB or more is needed).\nIt does not know spectrograms that look like yours, so "
            "generated images will not look like your people either. Either use the published\n"
            "vavae-imagenet256-f16d32-dinov2.pt, or fine-tune this tokenizer on your images first (minutes on a CPU):\n"
            f"  python train_tokenizer.py --data_dir <your data> --init_from {vavae_path} "
            "--output_path my_tokenizer.safetensors --max_minutes 25\nthen rerun stage 1 with "
            "--vavae_path my_tokenizer.safetensors.\n" + "!" * 100)
    return result


def relative_to(path: str | Path, root: Path) -> str:
    """`path` relative to the resolved `root` when inside it, else absolute: how split.json and the latent
    files name images."""
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def write_split(users: list[User], data_dir: str, path: Path, run_id: str = "") -> None:
    """split.json: which real images are train (seen by the generator) and which are val, per user."""
    root = Path(data_dir).resolve()
    split = {u.name: {name: [relative_to(f, root) for f in u.files.get(name, [])] for name in ("train", "val")}
             for u in users}
    write_text(path, json.dumps({"data_dir": str(root), RUN_KEY: run_id, "users": split}, indent=1))


#################################################################################
#                                 Stage 1                                       #
#################################################################################

def extract_features(options: ExtractOptions, log=print) -> dict[str, Any]:
    """Stage 1 with its flags (data/cli.py): encode options.data_dir's train/val images; write train/val latents,
    the train-set stats and split.json into options.output_path.

    Each image (any size and mode; ADM centre crop to image_size, RGB, [-1, 1]) becomes the posterior mean of
    the VA-VAE: train.safetensors / val.safetensors hold `latents` (N, 32, image_size/16, image_size/16) float32
    and `user_ids` (N,) int64 (class index = position of the user folder in number order), and metadata (users,
    their numbers, image paths, tokenizer sha256, tokenizer PSNR in dB, encoder_autocast "bf16" or "none");
    latent_stats.safetensors the per-channel train mean/std (1, 32, 1, 1). With repa_encoder
    (data/repa_targets.py), repa_targets.safetensors holds `targets` (N_train, (image_size/16)^2, D) float16, the
    encoder's patch features of each train image.
    Returns the metadata written.

    The four files are written to a staging folder and moved into output_path together, each carrying this
    run's id, so a failed run leaves the previous run's files and stage 2 can tell a mixed folder. Raises
    PipelineError for another stage 1 run writing to output_path (output_path/stage1.lock), a dataset it cannot
    use, a user left without readable images, or non-finite latents.
    """
    with run_lock(Path(options.output_path) / LOCK_NAME, "stage 1", "another --output_path", log=log):
        users = scan_dataset(options.data_dir, log=log)
        dev = resolve_device(options.device)
        require_file(options.vavae_path, "tokenizer (--vavae_path)")
        load_vavae(options.vavae_path)  # fail fast, before any work, on a wrong or broken file
        tokenizer_sha = file_sha256(options.vavae_path)
        out = Path(options.output_path)
        root = Path(options.data_dir).resolve()
        meta = {
            "users": [u.name for u in users],
            "user_numbers": [u.number for u in users],
            "image_size": options.image_size,
            "tokenizer": Path(options.vavae_path).name,
            "tokenizer_sha256": tokenizer_sha,
            "data_dir": str(root),
            "encoder_autocast": "bf16" if inference_dtype(options.precision, dev) is not None else "none",
            RUN_KEY: uuid.uuid4().hex,
        }
        log(f"{len(users)} users: " + ", ".join(f"{u.name}->class {i}" for i, u in enumerate(users)))
        if options.tokenizer_check_images > 0:
            meta.update(tokenizer_psnr_check(options.vavae_path, users, options.image_size,
                                             options.tokenizer_check_images, str(dev), log, options.precision))
        summary: dict[str, Any] = {"users": len(users), **{k: v for k, v in meta.items() if k.startswith("tokenizer_psnr")}}
        all_names, all_shapes = [], []
        banks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # split -> (uint8 images, labels), for REPA
        with replaced_together(out, STAGE1_FILES) as staging:
            write_split(users, options.data_dir, staging / "split.json", meta[RUN_KEY])
            for split in ("train", "val"):
                items = [(f, cls) for cls, u in enumerate(users) for f in u.files.get(split, [])]
                encoded = encode_all(options.vavae_path, items, options.image_size, options.batch_size,
                                     options.num_workers, dev, options.devices, f"stage 1 {split}",
                                     precision=options.precision)
                _check_users_left(users, encoded.labels, split)
                names = [relative_to(f, root) for f in encoded.files(items)]
                check_finite(encoded.latents, names,
                             f"the tokenizer's latents of {split} images in {options.data_dir}",
                             "Those images hold extreme values, or the tokenizer file is broken (the tokenizer check "
                             "above measures it). Remove or re-export those images, or use another --vavae_path; "
                             f"nothing was written to {out}.")
                if split == "train":
                    mean, std = latent_stats(encoded.latents)
                save_safetensors({"latents": encoded.latents, "user_ids": encoded.labels}, staging / f"{split}.safetensors",
                                 {**meta, "split": split, "num_skipped": len(encoded.skipped), "files": names})
                if options.repa_encoder != "none":
                    banks[split] = (load_bank(encoded.files(items), options.image_size, log=log), encoded.labels)
                summary[split] = len(encoded.labels)
                summary[f"{split}_skipped"] = len(encoded.skipped)
                all_names += names
                all_shapes += [tuple(s) for s in encoded.shapes.tolist()]
            save_safetensors({"mean": mean, "std": std}, staging / "latent_stats.safetensors", meta)
            if options.repa_encoder != "none":
                summary.update(write_repa_targets(options.repa_encoder, options.vavae_path, banks, len(users), dev,
                                                  meta, staging / TARGETS_FILE, log))
        if options.repa_encoder == "none":
            (out / TARGETS_FILE).unlink(missing_ok=True)   # an earlier run's: stage 2 must not find it
        note = crop_note(all_names, all_shapes, options.image_size)
        if note:
            log(note)
        log(f"stage 1 done: {summary['train']} train and {summary['val']} val latents of shape "
            f"{tuple(encoded.latents.shape[1:])} in {out}; "
            f"{skipped_count(summary['train_skipped'] + summary['val_skipped'])}")
        return summary


def write_repa_targets(choice: str, vavae_path: str, banks: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       num_users: int, device: torch.device, meta: dict[str, Any], path: Path, log=print) -> dict:
    """Compute the train images' REPA targets (data/repa_targets.py) and write them to path with this run's id."""
    (train_images, train_labels), (val_images, val_labels) = banks["train"], banks["val"]
    if len(train_images) != len(train_labels):
        raise PipelineError("an image became unreadable while stage 1 ran (it was encoded, then could not be read "
                            "again for the REPA targets): rerun stage 1.")
    if len(val_images) != len(val_labels):   # only scores the encoder: score none rather than misaligned ones
        val_images, val_labels = val_images[:0], val_labels[:0]
    targets, repa_meta = build_targets(choice, vavae_path, train_images, train_labels, val_images, val_labels,
                                       num_users, device, log)
    save_safetensors({"targets": targets}, path, {**meta, **repa_meta})
    return repa_meta


def _check_users_left(users: list[User], labels: torch.Tensor, split: str) -> None:
    counts = torch.bincount(labels, minlength=len(users)) if len(labels) else torch.zeros(len(users))
    empty = [u.name for u, c in zip(users, counts.tolist()) if c == 0 and (split == "train" or u.files.get(split))]
    if empty:
        raise PipelineError(f"user folder(s) {', '.join(empty)} have no readable images in {split}/ "
                            "(every file was broken or unsupported). Add readable images or remove the folder.")
