"""Stage 1's REPA targets: a frozen encoder's patch features of every train image, computed once and written beside
the latents (repa_targets.safetensors, rows in train.safetensors' order) for stage 2's --repa_weight.

The encoder (--repa_encoder): `dinov2`, the DINOv2 the published VA-VAE file carries; `spectrogram`, a small CNN
trained here to tell the users apart on their train images only (never on val images, and never the stage 4
judge, which is trained apart in stage 4); `auto`, the first of the two the tokenizer allows; `none`, no targets.
"""
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.errors import PipelineError
from common.io import load_safetensors, require_file
from common.progress import progress_bar
from models.repa_encoders import SpectrogramEncoder, dinov2_from_state_dict
from models.vavae import read_tokenizer_file

TARGETS_FILE = "repa_targets.safetensors"
REPA_ENCODERS = ("none", "auto", "dinov2", "spectrogram")
ENCODER_STEPS = 400         # SpectrogramEncoder training steps (about 20 s for the demo's 240 images on 2 cores)
ENCODER_BATCH = 64


def dinov2_of_tokenizer(vavae_path: str | Path):
    """The DINOv2 carried by the tokenizer file (models/repa_encoders.dinov2_from_state_dict), or None."""
    tensors, _ = read_tokenizer_file(Path(vavae_path))
    return dinov2_from_state_dict(tensors)


def train_spectrogram_encoder(images: torch.Tensor, labels: torch.Tensor, num_users: int, seed: int = 0,
                              steps: int = ENCODER_STEPS, device: str | torch.device = "cpu",
                              log=print) -> SpectrogramEncoder:
    """Train a SpectrogramEncoder to classify the user of each train image.

    images: (N, 3, S, S) uint8 train images; labels: (N,) int64 user classes. Each batch is rolled circularly
    along time (the last axis) by a random shift, so the features describe the gait, not where a stride starts.
    AdamW, lr 2e-3 with a cosine decay, batch 64. Returns the encoder in eval mode on `device`."""
    generator = torch.Generator().manual_seed(seed + 777)
    torch.manual_seed(seed + 777)
    encoder = SpectrogramEncoder(num_users).to(device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in progress_bar(range(steps), desc="stage 1 REPA encoder", unit="step", dynamic_ncols=True):
        idx = torch.randint(len(images), (min(ENCODER_BATCH, len(images)),), generator=generator)
        x = to_unit_range(images[idx]).to(device)
        shift = int(torch.randint(x.shape[-1], (), generator=generator))
        loss = F.cross_entropy(encoder(torch.roll(x, shift, dims=-1)), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return encoder.eval()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float32 in [-1, 1], stage 1's preprocessing."""
    return images.float() / 127.5 - 1


@torch.no_grad()
def encoder_accuracy(encoder: SpectrogramEncoder, images: torch.Tensor, labels: torch.Tensor,
                     device: str | torch.device = "cpu") -> float:
    """Top-1 user accuracy of the encoder's head on (N, 3, S, S) uint8 images (e.g. val images: reported, not
    trained on)."""
    if not len(images):
        return float("nan")
    hits = sum(int((encoder(to_unit_range(images[i:i + 64]).to(device)).argmax(1).cpu() == labels[i:i + 64]).sum())
               for i in range(0, len(images), 64))
    return hits / len(images)


@torch.no_grad()
def compute_targets(encoder, images: torch.Tensor, device: str | torch.device = "cpu",
                    batch_size: int = 32) -> torch.Tensor:
    """(N, 3, S, S) uint8 images -> (N, g*g, D) float16 targets (the encoder's features; float16 halves the file
    and REPA compares directions only). Batches are written into the result as they come rather than joined at
    the end, which would hold the targets twice (2 x 1.5 GB for DINOv2 on 31 users x 120 train images)."""
    targets = None
    for i in progress_bar(range(0, len(images), batch_size), desc="stage 1 REPA targets", unit="batch",
                          dynamic_ncols=True):
        part = encoder.features(to_unit_range(images[i:i + batch_size]).to(device)).half().cpu()
        if targets is None:
            targets = torch.empty(len(images), *part.shape[1:], dtype=part.dtype)
        targets[i:i + len(part)] = part
    if targets is None:
        raise ValueError("no images to compute REPA targets of")
    return targets


def build_targets(choice: str, vavae_path: str, train_images: torch.Tensor, train_labels: torch.Tensor,
                  val_images: torch.Tensor, val_labels: torch.Tensor, num_users: int, device: str | torch.device,
                  log=print) -> tuple[torch.Tensor, dict[str, Any]]:
    """(targets (N_train, g*g, D) float16, metadata) for --repa_encoder `choice` (not 'none').

    Raises PipelineError for `dinov2` with a tokenizer that carries no DINOv2 (project tokenizers)."""
    encoder = dinov2_of_tokenizer(vavae_path) if choice in ("auto", "dinov2") else None
    if choice == "dinov2" and encoder is None:
        raise PipelineError(f"--repa_encoder dinov2: {vavae_path} carries no DINOv2 (foundation_model.model.* keys; "
                            "only the published vavae-imagenet256-f16d32-dinov2.pt does). Use --repa_encoder "
                            "spectrogram (trained here on your train images) or auto.")
    meta: dict[str, Any] = {}
    if encoder is None:
        encoder = train_spectrogram_encoder(train_images, train_labels, num_users, device=device, log=log)
        accuracy = encoder_accuracy(encoder, val_images, val_labels, device)
        meta.update(repa_encoder="spectrogram", repa_encoder_val_accuracy=accuracy)
        log(f"REPA encoder: spectrogram CNN trained on {len(train_images)} train images, val accuracy "
            f"{accuracy:.2f} (chance {1 / num_users:.2f})")
    else:
        meta.update(repa_encoder="dinov2")
        encoder = encoder.to(device)
        log(f"REPA encoder: the tokenizer's DINOv2 ({encoder.dim} features per patch)")
    targets = compute_targets(encoder, train_images, device)
    return targets, {**meta, "repa_dim": targets.shape[-1]}


def load_targets(latent_dir: str | Path, num_train: int, run_id: str | None) -> torch.Tensor:
    """Stage 1's REPA targets, (N_train, g*g, D) float16 as stored (stage 2's REPA head keeps them so; a float32
    copy would be 2.9 GB for DINOv2's 768-d targets of 31 users x 120 train images), checked against
    train.safetensors (same run, same count).

    Raises PipelineError when the file is missing (stage 1 ran without --repa_encoder) or belongs to another run."""
    path = Path(latent_dir) / TARGETS_FILE
    require_file(path, f"REPA targets ({TARGETS_FILE}): rerun stage 1 with --repa_encoder auto (or spectrogram) "
                       "to write them, or train without --repa_weight")
    tensors, meta = load_safetensors(path)
    targets = tensors["targets"]
    if meta.get("stage1_run") != run_id or len(targets) != num_train:
        raise PipelineError(f"{path} belongs to another stage 1 run than {Path(latent_dir) / 'train.safetensors'} "
                            f"({len(targets)} rows for {num_train} latents). Rerun stage 1 with --repa_encoder.")
    return targets
