"""The user classifier: a ResNet-18 trained from scratch on real spectrograms, cached next to the data.

It is the judge of identity (is a sample recognised as its user?) and its penultimate
512-d features are the space in which FD, KID, precision/recall and memorisation are measured.
"""
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file

from common.io import file_sha256, read_safetensors_metadata, save_safetensors
from common.pixels import to_float
from common.progress import progress_bar

CACHE_DIR = ".eval_cache"   # hidden, so scan_dataset never takes it for a user folder
CACHE_VERSION = 1           # bump when training code changes what a cached model would be


#################################################################################
#                                 Configuration                                 #
#################################################################################

@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that changes the trained weights; all of it goes into the cache fingerprint."""
    image_size: int = 256           # decoding size (the generator's); images are then resized to `size`
    size: int = 128                 # training/inference resolution: 4x cheaper than 256 on CPU
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_time_shift: float = 0.125   # fraction of the width (time axis)
    max_freq_shift: float = 0.03    # fraction of the height (Doppler axis): velocity is a user trait
    seed: int = 0


#################################################################################
#                                     Model                                     #
#################################################################################

def build_classifier(num_classes: int) -> nn.Module:
    """torchvision ResNet-18, random init: ImageNet features would not transfer to spectrograms reliably
    and pretrained weights would need a download."""
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate (512-d, after global pooling) features and class logits in one pass."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    feats = torch.flatten(model.avgpool(x), 1)
    return feats, model.fc(feats)


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, batch_size: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) on CPU for uint8 images, in eval mode (BatchNorm running statistics)."""
    model.eval()
    feats, logits = [], []
    for batch in torch.split(images, batch_size):
        f, l = features_and_logits(model, to_float(batch).to(device))
        feats.append(f.float().cpu())
        logits.append(l.float().cpu())
    dim, classes = model.fc.in_features, model.fc.out_features
    if not feats:
        return torch.zeros(0, dim), torch.zeros(0, classes)
    return torch.cat(feats), torch.cat(logits)


#################################################################################
#                                   Training                                    #
#################################################################################

def augment(batch: torch.Tensor, cfg: ClassifierConfig, gen: torch.Generator) -> torch.Tensor:
    """Random small shifts with edge padding; no flips.

    A horizontal flip reverses time (gait played backwards) and a vertical one swaps approaching
    and receding Doppler, so both would teach the classifier invariances the data does not have.
    Shifts in time are harmless (a gait cycle can start anywhere in a window); shifts in Doppler
    are kept tiny because the Doppler position encodes walking speed.
    """
    n, _, h, w = batch.shape
    pad_w, pad_h = round(w * cfg.max_time_shift), round(h * cfg.max_freq_shift)
    if pad_w == 0 and pad_h == 0:
        return batch
    padded = F.pad(batch, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
    dx = torch.randint(0, 2 * pad_w + 1, (n,), generator=gen).tolist()
    dy = torch.randint(0, 2 * pad_h + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One shuffled epoch; a last batch of one is merged into the previous (BatchNorm needs two)."""
    parts = list(torch.split(torch.randperm(n, generator=gen), batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2] = torch.cat([parts[-2], parts.pop()])
    return parts


def steps_for(num_images: int, cfg: ClassifierConfig) -> int:
    return cfg.epochs * max(1, math.ceil(num_images / cfg.batch_size))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ClassifierConfig,
                     device: torch.device, steps: int | None = None, desc: str = "classifier") -> nn.Module:
    """AdamW with warmup + cosine decay for `steps` optimizer steps (default: cfg.epochs epochs)."""
    if images.shape[0] < 2:
        raise ValueError("need at least two images to train a classifier")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_classifier(num_classes).to(device)
    total = steps or steps_for(images.shape[0], cfg)
    warmup = max(1, round(total * cfg.warmup_fraction))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    model.train()
    step = 0
    with progress_bar(total=total, desc=f"training {desc}", unit="step", leave=False) as bar:
        while step < total:
            for index in _batches(images.shape[0], cfg.batch_size, gen):
                x = augment(to_float(images[index]), cfg, gen).to(device)
                loss = F.cross_entropy(model(x), labels[index].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step >= total:
                    break
    recalibrate_batchnorm(model, images, cfg.batch_size, device)
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Replace BatchNorm running statistics by exact averages over the un-augmented training images.

    The exponential running averages lag behind the weights (badly so after a short schedule),
    and eval-mode features and accuracies depend on them; one extra forward pass fixes that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None           # cumulative moving average = plain mean over the batches
    model.train()
    # Shuffled batches, as in training: files come sorted by user, and one-user batches have a
    # smaller variance than the mixed batches the weights were fitted to.
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    for index in torch.split(order, batch_size):
        if len(index) > 1:
            model(to_float(images[index]).to(device))
    for m in norms:
        m.momentum = 0.1


#################################################################################
#                                    Caching                                    #
#################################################################################

def fingerprint(data_dir: Path, class_names: list[str], train_files: list[Path], cfg: ClassifierConfig) -> str:
    """sha256 over the training files (relative path and content), the classes and the hyper-parameters.

    Content, not size and mtime: an image replaced by another of the same size within the clock's
    resolution (or with its mtime restored, as by rsync -t or an archive) still retrains, and a copied
    or touched data folder still reuses the cache. Validation files are left out on purpose: they do not
    change the weights, and adding val images should not cost a retraining. Device is left out too: a
    CPU-trained model is as good.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, "classes": class_names, "config": asdict(cfg)},
                             sort_keys=True).encode())
    for path in sorted(train_files, key=lambda p: p.relative_to(data_dir).as_posix()):
        digest.update(f"{path.relative_to(data_dir).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def cache_candidates(data_dir: Path, output_dir: Path, key: str) -> list[Path]:
    """Where a cached classifier may live: beside the data first, the output folder as fallback."""
    name = f"classifier_{key[:16]}.safetensors"
    return [data_dir / CACHE_DIR / name, output_dir / CACHE_DIR / name]


def _load_cached(path: Path, key: str, num_classes: int) -> nn.Module | None:
    """The cached model, or None when the file is unreadable or belongs to other data."""
    try:
        meta = read_safetensors_metadata(path)
        if meta.get("fingerprint") != key:
            return None
        model = build_classifier(num_classes)
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    except Exception:       # a half-written or foreign file is simply retrained over
        return None


def load_or_train(data_dir: Path, output_dir: Path, class_names: list[str], train_files: list[Path],
                  images: torch.Tensor, labels: torch.Tensor, cfg: ClassifierConfig,
                  device: torch.device, log: Callable[[str], None] = print) -> tuple[nn.Module, dict]:
    """Load the classifier for these training files and settings, training (and caching) it once."""
    key = fingerprint(data_dir, class_names, train_files, cfg)
    candidates = cache_candidates(data_dir, output_dir, key)
    for path in candidates:
        if path.is_file():
            model = _load_cached(path, key, len(class_names))
            if model is not None:
                log(f"classifier: reusing cached {path}")
                return model.to(device), {"cached": True, "path": str(path), "fingerprint": key,
                                          "train_seconds": read_safetensors_metadata(path).get("train_seconds")}
    log(f"classifier: training ResNet-18 on {images.shape[0]} real images at {cfg.size}px for {cfg.epochs} epochs")
    start = time.perf_counter()
    model = train_classifier(images, labels, len(class_names), cfg, device, desc="user classifier")
    seconds = time.perf_counter() - start
    meta = {"fingerprint": key, "classes": class_names, "config": asdict(cfg), "train_seconds": seconds,
            "device": str(device)}
    state = {k: v for k, v in model.state_dict().items()}
    saved = None
    for path in candidates:
        try:
            save_safetensors(state, path, meta)
            saved = path
            break
        except OSError as err:      # read-only data folder: fall back to the output folder
            log(f"classifier: cannot write cache {path} ({err.strerror or err}); trying the next place")
    if saved is None:
        log("classifier: could not cache the classifier anywhere; it will be retrained next run")
    else:
        log(f"classifier: cached at {saved} ({seconds:.0f}s of training)")
    return model, {"cached": False, "path": str(saved) if saved else None, "fingerprint": key,
                   "train_seconds": seconds}
