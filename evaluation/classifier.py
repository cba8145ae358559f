"""The user classifier: a small torchvision network trained from scratch on real spectrograms until it has
learned (early stopping on held-out train images), cached next to the data.

It is the judge of identity (is a sample recognised as its user?) and its penultimate features are the space in
which FD, KID, precision/recall and memorisation are measured. The same trainer trains the augmentation gain's
classifiers (evaluation/gain.py): one recipe, so that the gain is measured on classifiers a user would accept.
"""
import copy
import hashlib
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.ops import Conv2dNormActivation

from common.io import file_sha256, read_safetensors_metadata, save_safetensors
from common.pixels import to_float
from common.progress import progress_bar
from evaluation import augment as A

CACHE_DIR = ".eval_cache"   # hidden, so scan_dataset never takes it for a user folder
CACHE_VERSION = 2           # bump when training code changes what a cached model would be (2: early stopping)
_SEEDING = threading.Lock()  # initial weights come from the global generator: one thread at a time seeds and draws


#################################################################################
#                                 Configuration                                 #
#################################################################################

@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that changes the trained weights; all of it goes into the cache fingerprint.

    Training runs until the top-1 on the held-out part of the train images has not risen for `patience`
    evaluations (one every `eval_every` steps), or until `max_steps`, and keeps the weights of the best evaluation
    (the highest top-1, among equals the lowest held-out cross-entropy).
    """
    image_size: int = 256           # decoding size (the generator's); images are then resized to `size`
    size: int = 48                  # training/inference resolution (docs/experiments.md: 48 px against 32 and 64)
    arch: str = "small_cnn"
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    ema_decay: float = 0.95         # the weights scored and kept: an exponential moving average of the trained ones
    max_steps: int = 400
    eval_every: int = 10
    patience: int = 4
    held_out_fraction: float = 0.2  # of each user's train images, for early stopping only (never val)
    augment: A.Classical = field(default_factory=lambda: A.DEFAULT)
    bf16: bool = False              # bf16 autocast in training, where the device runs it natively (1.4-1.8x on CPU)
    seed: int = 0
    # How `extra` images (the gain's samples) are used; no other classifier has them, so the cache fingerprint
    # leaves these out (GAIN_ONLY): share of each batch (None: each seen as often as a real image), and "mixed"
    # into the real batches or trained on "first", the real images then fine-tuning from those weights.
    generated_share: float | None = None
    generated_use: str = "mixed"


GAIN_ONLY = ("generated_share", "generated_use")
GENERATED_USES = ("mixed", "first")


#################################################################################
#                                     Model                                     #
#################################################################################

class Classifier(nn.Module):
    """backbone: images (N, 3, S, S) in [-1, 1] -> features (N, D); head: features -> logits (N, K)."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(dim, num_classes)
        self.dim, self.num_classes = dim, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _resnet(blocks: list[int]) -> tuple[nn.Module, int]:
    """torchvision's ResNet with BasicBlocks (resnet18: [2, 2, 2, 2]), its classification layer removed."""
    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, blocks)
    net.fc = nn.Identity()
    return net, 512


def _cnn(widths: tuple[int, ...]) -> tuple[nn.Module, int]:
    """A plain CNN of torchvision blocks: per width a 3x3 conv + BatchNorm + ReLU and a 2x2 max-pool, then global
    average pooling. At 64 px four blocks end at 4x4."""
    layers, channels = [], 3
    for width in widths:
        layers += [Conv2dNormActivation(channels, width, 3), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), channels


# Random init throughout: ImageNet features would not transfer to spectrograms reliably and pretrained weights
# would need a download.
ARCHS: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "resnet18": lambda: _resnet([2, 2, 2, 2]),
    "small_cnn": lambda: _cnn((16, 32, 64, 128)),
}


def build_classifier(num_classes: int, arch: str = ClassifierConfig.arch) -> Classifier:
    """A randomly initialised classifier of architecture `arch` (a key of ARCHS) for `num_classes` users."""
    backbone, dim = ARCHS[arch]()
    return Classifier(backbone, dim, num_classes)


@torch.no_grad()
def extract(model: Classifier, images: torch.Tensor, batch_size: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), logits (N, K)) float32 on CPU for uint8 images (N, 3, S, S), in eval mode (BatchNorm
    running statistics)."""
    model.eval()
    feats, logits = [], []
    for batch in torch.split(images, batch_size):
        f = model.backbone(to_float(batch).to(device))
        feats.append(f.float().cpu())
        logits.append(model.head(f).float().cpu())
    if not feats:
        return torch.zeros(0, model.dim), torch.zeros(0, model.num_classes)
    return torch.cat(feats), torch.cat(logits)


#################################################################################
#                                    Splits                                     #
#################################################################################

def held_out_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held_out) int64 index tensors into `labels` (N,): per class, round(fraction * n) of its images (at
    least one when it has two or more, never all) are held out, drawn with `seed`. Both sorted."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        k = min(max(1, round(fraction * len(members))), len(members) - 1) if fraction > 0 else 0
        held.append(members[torch.randperm(len(members), generator=gen)[:k]])
    held_out = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return keep.nonzero().flatten(), held_out


#################################################################################
#                                   Training                                    #
#################################################################################

def _stream(seed: int, purpose: int) -> torch.Generator:
    """One random stream per (seed, purpose): batch order 0, its augmentation 1, extra images 2 and 3."""
    return torch.Generator().manual_seed(seed * 16 + purpose)


def batch_indices(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs over range(n), `batch_size` per batch; a last batch of one is merged into the
    previous one (BatchNorm needs two)."""
    while True:
        parts = list(torch.split(torch.randperm(n, generator=gen), batch_size))
        if len(parts) > 1 and len(parts[-1]) == 1:
            last = parts.pop()     # popped first: `parts[-2] = cat(parts[-2], parts.pop())` assigns a shorter list
            parts[-1] = torch.cat([parts[-1], last])
        yield from parts


def steady_indices(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs over range(n) read `size` at a time across the epochs' ends: every part has `size`
    indices (batch_indices' last part of an epoch is shorter)."""
    pending = torch.empty(0, dtype=torch.int64)
    while True:
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(n, generator=gen)])
        yield pending[:size]
        pending = pending[size:]


@dataclass
class Fit:
    """A trained classifier and how its training went."""
    model: Classifier
    best_step: int                  # the step whose weights were kept
    steps: int                      # steps run before stopping
    held_out_top1: float | None     # at best_step; None without held-out images
    stopped_early: bool             # True when the patience ran out before max_steps
    seconds: float


@torch.no_grad()
def _held_out_score(model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    device: torch.device) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of the model in eval mode on held-out uint8 images."""
    logits = extract(model, images, batch_size, device)[1]
    return float((logits.argmax(1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def training_batches(images: torch.Tensor, labels: torch.Tensor, cfg: ClassifierConfig,
                     extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless augmented training batches (uint8 images (B, 3, S, S), labels (B,)) of uint8 images (N, 3, S, S)
    with labels (N,) int64.

    cfg.seed fixes the order of the batches of `images` and their augmentation draws (cfg.augment), each a stream
    of its own, so two calls with the same seed that differ only in `extra` or cfg.augment see the same images in
    the same order. `extra` (images, labels: e.g. generated samples) join every batch after those of `images`,
    about batch_size * len(extra) / len(images) of them (their own streams), so that each is seen about as often
    as each of `images`, or, with cfg.generated_share s, batch_size * s / (1 - s) of them (at least one), so that
    they make a share s of every batch whatever their number; they get the same augmentation.
    """
    order, order_aug = batch_indices(len(images), cfg.batch_size, _stream(cfg.seed, 0)), _stream(cfg.seed, 1)
    extra_order = None
    if extra is not None and len(extra[0]):
        share, gen = cfg.generated_share, _stream(cfg.seed, 2)
        extra_order = (batch_indices(len(extra[0]), math.ceil(cfg.batch_size * len(extra[0]) / len(images)), gen)
                       if share is None else
                       steady_indices(len(extra[0]), max(1, round(cfg.batch_size * share / (1 - share))), gen))
    extra_aug = _stream(cfg.seed, 3)
    # Mask fill colours once, not per batch: each image's median costs more than the rest of its augmentation.
    fill = A.background(images)
    extra_fill = A.background(extra[0]) if extra_order is not None else None
    while True:
        index = next(order)
        x, y = A.augment(images[index], cfg.augment, order_aug, fill[index]), labels[index]
        if extra_order is not None:
            more = next(extra_order)
            x = torch.cat([x, A.augment(extra[0][more], cfg.augment, extra_aug, extra_fill[more])])
            y = torch.cat([y, extra[1][more]])
        yield x, y


def initial_model(num_classes: int, cfg: ClassifierConfig, device: torch.device) -> Classifier:
    """The untrained classifier of cfg.arch, its weights drawn from cfg.seed (the same for every arm of a seed,
    also when classifiers are built on several threads at once)."""
    with _SEEDING:
        torch.manual_seed(cfg.seed)
        model = build_classifier(num_classes, cfg.arch)
    return model.to(device)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ClassifierConfig,
                     device: torch.device, held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     extra: tuple[torch.Tensor, torch.Tensor] | None = None, desc: str = "classifier",
                     progress: bool = True, init: Classifier | None = None) -> Fit:
    """Train a classifier on uint8 images (N, 3, S, S) with labels (N,) int64, stopping early on `held_out`.

    AdamW with a linear warmup, then a constant learning rate (forward passes in bf16 autocast with cfg.bf16):
    with early stopping the end of training is not known in advance, so no decay is scheduled towards it. What is
    scored and kept is an exponential moving average of the weights (cfg.ema_decay; torch.optim.swa_utils), which
    smooths the step-to-step swings of a constant learning rate that would otherwise decide where training stops.
    Every cfg.eval_every steps the averaged model is scored in fp32 on held_out (uint8 images, labels), its
    BatchNorm statistics first recalibrated on `images`. Training ends after cfg.patience scores without a higher
    top-1 (accuracy has stopped rising), or at cfg.max_steps; the weights kept are those of the best score (the
    highest top-1, among equals the lowest cross-entropy: a tie keeps the better-fitted weights but does not
    prolong training, which on a small held-out set that reaches 1.0 it would do for as long as the loss creeps
    down). Without held_out it runs cfg.max_steps steps.

    cfg.seed fixes the initial weights (initial_model) and the batches (training_batches, which adds `extra`), so
    the arms of the augmentation gain, which differ only in `extra` or cfg.augment, are paired. Every random draw
    comes from the seed's own generators, so classifiers trained on several threads at once come out the same.
    init: start from a copy of these weights (a classifier trained before: fine-tuning) instead of the seed's.
    progress: show a progress bar. Raises ValueError with fewer than two images.
    """
    if images.shape[0] < 2:
        raise ValueError("need at least two images to train a classifier")
    start = time.perf_counter()
    model = initial_model(num_classes, cfg, device) if init is None else copy.deepcopy(init).to(device).train().requires_grad_(True)
    batches = training_batches(images, labels, cfg, extra)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay > 0 else None
    kept = model if ema is None else ema.module         # the model scored, kept and returned
    scoring = held_out is not None and len(held_out[0]) > 0
    best, best_state, best_step, since_rise, step = (-1.0, math.inf), None, 0, 0, 0
    with progress_bar(total=cfg.max_steps, desc=f"training {desc}", unit="step", leave=False, upper_bound=True,
                      disable=not progress) as bar:
        while step < cfg.max_steps:
            model.train()
            x, y = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = F.cross_entropy(model(to_float(x).to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            bar.update(1)
            if not scoring or (step % cfg.eval_every and step < cfg.max_steps):
                continue
            recalibrate_batchnorm(kept, images, cfg.batch_size, device)
            top1, ce = _held_out_score(kept, *held_out, cfg.batch_size, device)
            bar.set_postfix(held_out=f"{top1:.3f}")
            since_rise = 0 if top1 > best[0] else since_rise + 1
            if top1 > best[0] or (top1 == best[0] and ce < best[1]):
                best, best_step = (top1, ce), step
                best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
            if since_rise >= cfg.patience:
                break
    if best_state is not None:
        kept.load_state_dict(best_state)        # BatchNorm statistics recalibrated when it was scored
    else:
        recalibrate_batchnorm(kept, images, cfg.batch_size, device)
        best_step = step
    return Fit(kept.eval(), best_step, step, best[0] if best_state is not None else None, step < cfg.max_steps,
               time.perf_counter() - start)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Replace BatchNorm running statistics by exact averages over the un-augmented training images.

    The exponential running averages lag behind the weights (badly so early in training), and eval-mode
    features and accuracies depend on them; one extra forward pass fixes that.
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


def train_judge(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ClassifierConfig,
                device: torch.device, desc: str = "user classifier", progress: bool = True) -> Fit:
    """The recipe of every classifier stage 4 trains on real images: hold out cfg.held_out_fraction of each user's
    train images (drawn with cfg.seed), train on the rest until the held-out top-1 stops rising, keep the best.

    The held-out images stay out of the training rather than being added back for a second run of the found
    length: that second run would double the cost, and its weights would not be the ones whose held-out score
    was measured. The price is a fifth fewer images to learn from.
    """
    fit, held = held_out_split(labels, cfg.held_out_fraction, cfg.seed)
    return train_classifier(images[fit], labels[fit], num_classes, cfg, device,
                            held_out=(images[held], labels[held]), desc=desc, progress=progress)


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
    config = {k: v for k, v in asdict(cfg).items() if k not in GAIN_ONLY}
    digest.update(json.dumps({"version": CACHE_VERSION, "classes": class_names, "config": config},
                             sort_keys=True).encode())
    for path in sorted(train_files, key=lambda p: p.relative_to(data_dir).as_posix()):
        digest.update(f"{path.relative_to(data_dir).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def cache_candidates(data_dir: Path, output_dir: Path, key: str) -> list[Path]:
    """Where a cached classifier may live: beside the data first, the output folder as fallback."""
    name = f"classifier_{key[:16]}.safetensors"
    return [data_dir / CACHE_DIR / name, output_dir / CACHE_DIR / name]


def _load_cached(path: Path, key: str, num_classes: int, arch: str) -> tuple[Classifier, dict] | None:
    """The cached model and its metadata, or None when the file is unreadable or belongs to other data."""
    try:
        meta = read_safetensors_metadata(path)
        if meta.get("fingerprint") != key:
            return None
        model = build_classifier(num_classes, arch)
        model.load_state_dict(load_file(str(path)))
        return model.eval(), meta
    except Exception:       # a half-written or foreign file is simply retrained over
        return None


def load_or_train(data_dir: Path, output_dir: Path, class_names: list[str], train_files: list[Path],
                  images: torch.Tensor, labels: torch.Tensor, cfg: ClassifierConfig,
                  device: torch.device, log: Callable[[str], None] = print,
                  progress: bool = True) -> tuple[Classifier, dict]:
    """Load the user classifier (train_judge) for these training files and settings, training (and caching) it
    once. Returns the model and its info: cached, path, fingerprint, train_seconds, best_step, steps,
    held_out_top1, stopped_early. progress: show the training's progress bar."""
    key = fingerprint(data_dir, class_names, train_files, cfg)
    candidates = cache_candidates(data_dir, output_dir, key)
    for path in candidates:
        if path.is_file():
            loaded = _load_cached(path, key, len(class_names), cfg.arch)
            if loaded is not None:
                log(f"classifier: reusing cached {path}")
                model, meta = loaded
                return model.to(device), {"cached": True, "path": str(path), "fingerprint": key,
                                          **{k: meta.get(k) for k in ("train_seconds", "best_step", "steps",
                                                                      "held_out_top1", "stopped_early")}}
    log(f"classifier: training {cfg.arch} on {images.shape[0]} real images at {cfg.size}px until its top-1 on "
        f"{cfg.held_out_fraction:.0%} of them held out stops rising (at most {cfg.max_steps} steps)")
    fit = train_judge(images, labels, len(class_names), cfg, device, progress=progress)
    info = {"train_seconds": fit.seconds, "best_step": fit.best_step, "steps": fit.steps,
            "held_out_top1": fit.held_out_top1, "stopped_early": fit.stopped_early}
    meta = {"fingerprint": key, "classes": class_names, "config": asdict(cfg), "device": str(device), **info}
    saved = None
    for path in candidates:
        try:
            save_safetensors(dict(fit.model.state_dict()), path, meta)
            saved = path
            break
        except OSError as err:      # read-only data folder: fall back to the output folder
            log(f"classifier: cannot write cache {path} ({err.strerror or err}); trying the next place")
    if saved is None:
        log("classifier: could not cache the classifier anywhere; it will be retrained next run")
    else:
        log(f"classifier: cached at {saved} ({fit.seconds:.0f}s of training, best at step {fit.best_step} of "
            f"{fit.steps})")
    return fit.model, {"cached": False, "path": str(saved) if saved else None, "fingerprint": key, **info}
