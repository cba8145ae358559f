"""Training the noisy-latent user classifier (models/latent_classifier.py) on the train latents, and the identity
score that stage 2 logs at each validation.

The classifier is trained once per stage 2 run, before the DiT's first step, on the train latents only (the val
latents only measure it), and travels inside every checkpoint's `pipeline` entry (PipelineInfo.latent_classifier),
so that stage 3 can guide with it and a resume reuses it instead of training it again (LatentClassifierTraining).
"""
import math
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from common.progress import progress_bar
from models.latent_classifier import CLASSIFIER_STEPS, NoisyLatentClassifier, classifier_entry
from models.transport import DEFAULT_SHIFT, guided_velocity, sample_ode

CLASSIFIER_BATCH = 64
CLASSIFIER_LR = 2e-3
CLASSIFIER_WEIGHT_DECAY = 0.05
REPORT_TIMES = (0.25, 0.5, 0.75, 1.0)   # val accuracy is reported at these points of the path (1 = clean)
IDENTITY_STEPS = 8           # sampler steps of the identity score: a preview, as the validation grids


def train_latent_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, seed: int = 0,
                            steps: int = CLASSIFIER_STEPS, batch_size: int = CLASSIFIER_BATCH,
                            lr: float = CLASSIFIER_LR, progress: bool = False) -> NoisyLatentClassifier:
    """A NoisyLatentClassifier trained on (x_t, t) -> user, x_t = t x1 + (1 - t) x0 with t ~ U[0, 1] and fresh noise
    each step. train_x: (N, C, H, W) normalised latents on the training device; train_y: (N,) int64 classes.
    AdamW with a cosine lr; every draw comes from a generator seeded by `seed`, so every rank of a DDP run (and a
    rerun) trains the same classifier. progress: a bar (or a line now and then) over its steps, for the one rank
    that shows it. Returns it in eval mode, frozen, on train_x's device."""
    device = train_x.device
    classifier = NoisyLatentClassifier(train_x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=CLASSIFIER_WEIGHT_DECAY)
    generator = torch.Generator(device).manual_seed(seed + 777)
    for step in progress_bar(range(steps), desc="stage 2: noisy-latent user classifier", unit="step",
                             disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(train_x), (batch_size,), device=device, generator=generator)
        x1, y = train_x[idx], train_y[idx]
        t = torch.rand(batch_size, device=device, generator=generator)
        noise = torch.randn(x1.shape, device=device, generator=generator)
        x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * noise
        loss = F.cross_entropy(classifier(x_t, t), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return classifier.eval().requires_grad_(False)


class LatentClassifierTraining(pl.Callback):
    """Before the DiT's first step (on_fit_start), train the noisy-latent user classifier on the module's train
    latents, on the training device, the same on every rank (seeded by `seed`), and store it in the module's
    PipelineInfo, which every checkpoint carries. Nothing to do with steps = 0 (--classifier_steps 0) or when the
    info already holds one (a resume: training/resume.py takes it from last.ckpt). Global rank 0 prints its val
    accuracy at REPORT_TIMES.

    The module has `info` (PipelineInfo), `model` (its num_classes), and normalised `train_x`/`val_x` (N, C, H, W)
    with their (N,) int64 classes `train_y`/`val_y`.
    """
    def __init__(self, steps: int = CLASSIFIER_STEPS, seed: int = 0):
        self.steps, self.seed = steps, seed

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.info.latent_classifier is not None or self.steps == 0:
            return
        started, num_classes = time.monotonic(), pl_module.model.num_classes
        classifier = train_latent_classifier(pl_module.train_x, pl_module.train_y, num_classes, seed=self.seed,
                                             steps=self.steps, progress=trainer.is_global_zero)
        pl_module.info.latent_classifier = classifier_entry(classifier)
        if trainer.is_global_zero:
            accuracy = classifier_accuracy(classifier, pl_module.val_x, pl_module.val_y, seed=self.seed)
            print(f"noisy-latent user classifier ({time.monotonic() - started:.0f} s): val accuracy "
                  + ", ".join(f"{a:.2f} at t={t:g}" for t, a in accuracy.items())
                  + f" (chance {1 / num_classes:.2f}; t = 1 clean)", flush=True)


@torch.no_grad()
def classifier_accuracy(classifier: NoisyLatentClassifier, x: torch.Tensor, y: torch.Tensor,
                        times: tuple[float, ...] = REPORT_TIMES, seed: int = 0) -> dict[float, float]:
    """Top-1 accuracy of the classifier on latents x (N, C, H, W) with classes y (N,) at each t of `times`
    (fixed noise from `seed`); {t: accuracy in [0, 1]}."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)
    result = {}
    for t in times:
        tt = torch.full((len(x),), t, device=x.device)
        logits = classifier(t * x + (1 - t) * noise, tt)
        result[t] = float((logits.argmax(-1) == y).float().mean())
    return result


@torch.no_grad()
def sample_identity(model: torch.nn.Module, classifier: NoisyLatentClassifier, num_classes: int,
                    samples_per_class: int, latent_shape: tuple[int, ...], seed: int = 0,
                    device: torch.device | str = "cpu") -> float:
    """Share of the model's conditional samples that the classifier assigns to the user they were drawn for,
    in [0, 1]: samples_per_class unguided samples per class (AB2, IDENTITY_STEPS steps, the default shift, fixed
    noise from `seed`), scored at t = 1 (clean latents). model: a LightningDiT in eval mode; latent_shape (C, H, W).
    Chance is 1 / num_classes."""
    y = torch.arange(num_classes, device=device).repeat_interleave(samples_per_class)
    noise = torch.randn((len(y), *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    latents = sample_ode(guided_velocity(model, y, num_classes, 1.0), noise, IDENTITY_STEPS, "ab2", DEFAULT_SHIFT)
    logits = classifier(latents, torch.ones(len(y), device=device))
    return float((logits.argmax(-1) == y).float().mean())
