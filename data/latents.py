"""Stage 1 logic: encode every image once with the frozen VA-VAE; read the latent files back."""
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from common.device import resolve_device
from common.errors import PipelineError
from common.io import file_sha256, load_safetensors, require_file, save_safetensors, write_text
from common.progress import progress_bar
from data.images import User, load_bank, scan_dataset, try_load_image



#################################################################################
#                                 Extraction                                    #
#################################################################################

class ImageList(Dataset):
    """(image or None, class index, position) for a list of files; broken files give None."""
    def __init__(self, items: list[tuple[Path, int]], image_size: int):
        self.items, self.image_size = items, image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = try_load_image(path, self.image_size)
        return image, label, i, [str(w.message) for w in caught]


def _collate(batch):
    return batch


@torch.no_grad()
def encode_items(vae, items: list[tuple[Path, int]], image_size: int, batch_size: int,
                 num_workers: int, device: str, desc: str, position: int = 0):
    """Encode files -> (latents (N,C,h,w) float32, class indices, positions in `items`, skipped files)."""
    loader = DataLoader(ImageList(items, image_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, shuffle=False)
    latents, labels, positions, skipped = [], [], [], []
    for batch in progress_bar(loader, desc=desc, unit="batch", position=position, dynamic_ncols=True):
        good = [(img, lab, i) for img, lab, i, msgs in batch if img is not None]
        for img, lab, i, msgs in batch:
            if img is None:
                skipped.append(str(items[i][0]))
                for m in msgs:
                    print(f"warning: {m}")
        if not good:
            continue
        x = torch.stack([g[0] for g in good]).to(device)
        latents.append(vae.encode(x).float().cpu())
        labels.append(torch.tensor([g[1] for g in good], dtype=torch.int64))
        positions.append(torch.tensor([g[2] for g in good], dtype=torch.int64))
    if not latents:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty(0), empty, empty, skipped
    return torch.cat(latents), torch.cat(labels), torch.cat(positions), skipped


def _encode_shard(rank: int, world: int, vavae_path: str, items, image_size, batch_size, num_workers, out_dir: str):
    """One GPU's share of the files (spawned per device); results go to a temporary file."""
    from models.vavae import load_vavae
    vae = load_vavae(vavae_path, device=f"cuda:{rank}")
    lat, lab, pos, skipped = encode_items(vae, items[rank::world], image_size, batch_size, num_workers,
                                          f"cuda:{rank}", f"gpu{rank}", position=rank)
    # Positions back in the full list: shard r holds items r, r + world, ...
    torch.save({"latents": lat, "labels": lab, "positions": pos * world + rank, "skipped": skipped},
               Path(out_dir) / f"shard{rank}.pt")


def encode_all(vavae_path: str, items: list[tuple[Path, int]], image_size: int, batch_size: int,
               num_workers: int, devices: int, desc: str):
    """Encode on one device, or split the files over `devices` GPUs (order is kept)."""
    from models.vavae import load_vavae
    n_gpu = torch.cuda.device_count()
    if devices > 1 and n_gpu >= 2:
        devices = min(devices, n_gpu)
        with tempfile.TemporaryDirectory() as tmp:
            torch.multiprocessing.spawn(_encode_shard, nprocs=devices, join=True,
                                        args=(devices, vavae_path, items, image_size, batch_size, num_workers, tmp))
            parts = [torch.load(Path(tmp) / f"shard{r}.pt", weights_only=True) for r in range(devices)]
        order = torch.argsort(torch.cat([p["positions"] for p in parts]))   # back to file order
        latents = torch.cat([p["latents"] for p in parts])[order]
        labels = torch.cat([p["labels"] for p in parts])[order]
        return latents, labels, [s for p in parts for s in p["skipped"]]
    if devices > 1:
        print(f"note: --devices {devices} asked for but {n_gpu} GPU(s) visible; encoding on one device")
    device = "cuda" if n_gpu else "cpu"
    vae = load_vavae(vavae_path, device=device)
    latents, labels, _, skipped = encode_items(vae, items, image_size, batch_size, num_workers, device, desc)
    return latents, labels, skipped


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


def check_tokenizer(vavae_path: str, users: list[User], image_size: int, num_images: int, device: str,
                    log=print) -> dict[str, Any]:
    """Reconstruct ~num_images train images spread over the users; PSNR overall and for the worst user."""
    from models.vavae import load_vavae, reconstruction_psnr
    per_user = max(1, -(-num_images // len(users)))
    picked = []     # per user, evenly spaced train files
    for user in users:
        files = user.files["train"]
        picked.append(files[::max(1, len(files) // per_user)][:per_user])
    banks = [load_bank(files, image_size, log=log) for files in picked]     # unreadable files are left out
    images = torch.cat(banks)
    labels = torch.cat([torch.full((len(bank),), cls) for cls, bank in enumerate(banks)])
    psnr = reconstruction_psnr(load_vavae(vavae_path, device=device), images)
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
            "--output_path my_tokenizer.safetensors --max_minutes 10\nthen rerun stage 1 with "
            "--vavae_path my_tokenizer.safetensors.\n" + "!" * 100)
    return result


def write_split(users: list[User], data_dir: str, path: Path) -> None:
    """split.json: which real images are train (seen by the generator) and which are val, per user."""
    root = Path(data_dir).resolve()
    split = {u.name: {name: [str(Path(f).resolve().relative_to(root)) if Path(f).resolve().is_relative_to(root)
                             else str(Path(f).resolve()) for f in u.files.get(name, [])]
                      for name in ("train", "val")} for u in users}
    write_text(path, json.dumps({"data_dir": str(root), "users": split}, indent=1))


#################################################################################
#                                 Stage 1                                       #
#################################################################################

def extract_features(data_dir: str, vavae_path: str, output_path: str, batch_size: int = 32,
                     image_size: int = 256, num_workers: int = 2, devices: int = 1,
                     tokenizer_check_images: int = 48, log=print) -> dict[str, Any]:
    """Encode data_dir's train/val images; write train/val latents, the train-set stats and split.json."""
    users = scan_dataset(data_dir, log=log)
    require_file(vavae_path, "tokenizer (--vavae_path)")
    from models.vavae import load_vavae
    load_vavae(vavae_path)  # fail fast, before any work, on a wrong or broken file
    tokenizer_sha = file_sha256(vavae_path)
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "users": [u.name for u in users],
        "user_numbers": [u.number for u in users],
        "image_size": image_size,
        "tokenizer": Path(vavae_path).name,
        "tokenizer_sha256": tokenizer_sha,
        "data_dir": str(Path(data_dir).resolve()),
    }
    log(f"{len(users)} users: " + ", ".join(f"{u.name}->class {i}" for i, u in enumerate(users)))
    if tokenizer_check_images > 0:
        device = str(resolve_device("auto"))
        meta.update(check_tokenizer(vavae_path, users, image_size, tokenizer_check_images, device, log))
    write_split(users, data_dir, out / "split.json")
    summary: dict[str, Any] = {"users": len(users), **{k: v for k, v in meta.items() if k.startswith("tokenizer_psnr")}}
    stats = None
    for split in ("train", "val"):
        items = [(f, cls) for cls, u in enumerate(users) for f in u.files.get(split, [])]
        latents, labels, skipped = encode_all(vavae_path, items, image_size, batch_size, num_workers,
                                              devices, f"stage 1 {split}")
        _check_users_left(users, labels, split)
        if split == "train":
            stats = latent_stats(latents)
        save_safetensors({"latents": latents, "user_ids": labels}, out / f"{split}.safetensors",
                         {**meta, "split": split, "num_skipped": len(skipped)})
        summary[split] = len(labels)
        summary[f"{split}_skipped"] = len(skipped)
    save_safetensors({"mean": stats[0], "std": stats[1]}, out / "latent_stats.safetensors", meta)
    log(f"stage 1 done: {summary['train']} train and {summary['val']} val latents of shape "
        f"{tuple(latents.shape[1:]) if len(latents) else '?'} in {out}; "
        f"{summary['train_skipped'] + summary['val_skipped']} unreadable image(s) skipped")
    return summary


def _check_users_left(users: list[User], labels: torch.Tensor, split: str) -> None:
    counts = torch.bincount(labels, minlength=len(users)) if len(labels) else torch.zeros(len(users))
    empty = [u.name for u, c in zip(users, counts.tolist()) if c == 0 and (split == "train" or u.files.get(split))]
    if empty:
        raise PipelineError(f"user folder(s) {', '.join(empty)} have no readable images in {split}/ "
                            "(every file was broken or unsupported). Add readable images or remove the folder.")


#################################################################################
#                                 Reading back                                  #
#################################################################################

def load_latents(latent_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(latents, user_ids, metadata) of one split written by stage 1."""
    path = Path(latent_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise PipelineError(f"{path} not found. Run stage 1 (stage1_extract_features.py) with "
                            f"--output_path {latent_dir} first.")
    tensors, meta = load_safetensors(path)
    if "latents" not in tensors or "user_ids" not in tensors:
        raise PipelineError(f"{path} is not a stage 1 latent file (it lacks 'latents'/'user_ids').")
    return tensors["latents"], tensors["user_ids"], meta


def load_stats(latent_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors, _ = load_safetensors(require_file(Path(latent_dir) / "latent_stats.safetensors",
                                               "latent statistics (latent_stats.safetensors from stage 1)"))
    return tensors["mean"], tensors["std"]
