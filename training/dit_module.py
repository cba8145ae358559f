"""Stage 2 model: LightningDiT + flow-matching loss + EMA as a LightningModule.

The latents live on the training device for the whole run; the batch for a step is a pure function of
(seed, global step, rank). That makes training exactly resumable mid-epoch and keeps the step free of
host-to-device copies.
"""
import copy
import functools
import math
import time

import pytorch_lightning as pl
import torch

from common.errors import PipelineError
from models.checkpoint import PipelineInfo
from models.latent_classifier import classifier_entry
from models.lightningdit import LightningDiT
from models.transport import flow_matching_loss, sample_timesteps
from training.cli import TrainOptions
from training.augment import check_probability, random_time_shifts, shift_time
from training.latent_classifier import classifier_accuracy, train_latent_classifier
from training.repa import Projector, default_repa_depth, repa_loss, targets_on_tokens

NONFINITE_CHECK_EVERY = 50   # steps between looks at the device-side NaN flag (a host-device sync)
# Under fp16 loss scaling a step with NaN/inf gradients is skipped and the scale halved, as AMP does; only this
# many skipped steps in a row stop the run (from GradScaler's 65536 that is a scale of 2**-4: no overflow left
# to remove, the loss itself is NaN/inf).
MAX_SKIPPED_IN_A_ROW = 20


class DiTTrainingModule(pl.LightningModule):
    """The DiT, its EMA copy, the normalised latents and the optimiser; checkpoints carry what stage 3 needs."""
    def __init__(self, info: PipelineInfo, train_latents: torch.Tensor, train_labels: torch.Tensor,
                 val_latents: torch.Tensor, val_labels: torch.Tensor, options: TrainOptions,
                 repa_targets: torch.Tensor | None = None):
        """info: the model config, users and latent statistics (saved in every checkpoint); latents (N, C, H, W)
        float32 as stage 1 wrote them (normalised here) with their (N,) int64 user classes; options: stage 2's
        flags (training/cli.py, where their defaults live); repa_targets (N_train, g*g, D) for --repa_weight."""
        super().__init__()
        self.model = LightningDiT(**info.model_config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.info = info   # saved with every checkpoint (models/checkpoint.py)
        self.lr, self.betas, self.weight_decay = options.lr, (0.9, options.beta2), options.weight_decay
        self.batch_size, self.ema_decay, self.seed = options.batch_size, options.ema_decay, options.seed
        self.timestep_sampling, self.cosine_loss_weight = options.timestep_sampling, options.cosine_loss_weight
        self.backbone_lr_scale, self.warmup_steps = options.backbone_lr_scale, options.warmup_steps
        self.time_shift_aug = check_probability(options.time_shift_aug)
        self.ema_gamma = power_ema_gamma(options.ema_std) if options.ema_std else None
        self.contrastive_weight = options.contrastive_weight
        self.classifier_steps = options.classifier_steps
        # REPA (training/repa.py): targets (N_train, g*g, D) from stage 1, a projector trained with the model.
        self.repa_weight, self.repa_stop_step = options.repa_weight, options.repa_stop_step
        self.repa_depth = options.repa_depth or default_repa_depth(len(self.model.blocks))
        self.repa_projector = None
        if self.repa_weight > 0:
            if repa_targets is None or len(repa_targets) != len(train_latents):
                raise ValueError("repa_weight > 0 needs one row of repa_targets per train latent")
            if not 1 <= self.repa_depth <= len(self.model.blocks):
                raise PipelineError(f"--repa_depth {self.repa_depth} is not a block of this "
                                    f"{len(self.model.blocks)}-block model: pass 1..{len(self.model.blocks)}")
            self.repa_projector = Projector(self.model.pos_embed.shape[-1], repa_targets.shape[-1])
        # float16 on the device (half the memory; REPA compares directions only)
        self.register_buffer("repa_targets", repa_targets.half() if self.repa_weight > 0 else None, persistent=False)
        if self.time_shift_aug > 0 and not info.model_config.get("time_shift_cond"):
            raise ValueError("time_shift_aug > 0 needs a model built with time_shift_cond (train_dit.build_module)")
        # Kept out of the registered submodules: as one it would put a second copy of the weights in every
        # checkpoint (under forward_fn._orig_mod.* when compiled, so --compile runs could not resume without).
        self.__dict__["forward_fn"] = torch.compile(self.model) if options.compile else self.model
        # Normalised once, kept as non-persistent buffers so they follow the module to its device.
        mean, std = info.latent_mean, info.latent_std
        self.register_buffer("train_x", (train_latents - mean) / std, persistent=False)
        self.register_buffer("train_y", train_labels.long(), persistent=False)
        self.register_buffer("val_x", (val_latents - mean) / std, persistent=False)
        self.register_buffer("val_y", val_labels.long(), persistent=False)
        # Fixed validation noise and timesteps: epochs (and runs) compare on the same draws.
        g = torch.Generator().manual_seed(self.seed + 12345)
        self.register_buffer("val_noise", torch.randn(val_latents.shape, generator=g), persistent=False)
        n_val = len(val_latents)
        self.register_buffer("val_t", (torch.arange(n_val) + 0.5) / max(n_val, 1), persistent=False)
        # First step whose loss was NaN/inf (-1: none), kept on the device: no sync in the step itself.
        self.register_buffer("nonfinite_step", torch.full((), -1, dtype=torch.int64), persistent=False)
        # Under loss scaling (16-mixed): steps GradScaler skipped, in all and in a row, and the step at which
        # MAX_SKIPPED_IN_A_ROW was reached (-1: never). Device tensors, updated without a sync.
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("skipped_in_a_row", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("persistent_skip_step", torch.full((), -1, dtype=torch.int64), persistent=False)
        self._perm: torch.Tensor | None = None   # this epoch's permutation, on the device
        self._perm_epoch = -1

    # ---------------------------------------------------------------- data
    def world(self) -> tuple[int, int]:
        return (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    def steps_per_epoch(self) -> int:
        _, world = self.world()
        return max(1, len(self.train_x) // (self.batch_size * world))

    def train_dataloader(self):
        return range(self.steps_per_epoch())

    def val_dataloader(self):
        rank, world = self.world()
        shard = math.ceil(len(self.val_x) / world)
        starts = range(rank * shard, min(len(self.val_x), (rank + 1) * shard), self.batch_size)
        return Batches([(s, min(s + self.batch_size, (rank + 1) * shard, len(self.val_x))) for s in starts])

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices (on the latents' device) of this rank's batch at a global step: epoch-wise permutations
        seeded by (seed, epoch).

        The permutation is drawn on the CPU (identical on every device) once per epoch and cached on the
        device: copying fresh indices to the GPU every step would block the host on the GPU every step.
        """
        rank, world = self.world()
        spe, n = self.steps_per_epoch(), len(self.train_x)
        epoch, pos = divmod(step, spe)
        device = self.train_x.device
        if self._perm_epoch != epoch or self._perm is None or self._perm.device != device:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            self._perm, self._perm_epoch = perm.to(device, non_blocking=True), epoch
        start = (pos * world + rank) * self.batch_size
        return self._perm[torch.arange(start, start + self.batch_size, device=device) % n]

    # ---------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx):
        rank, world = self.world()
        step = self.global_step
        # Every random draw of this step depends on (seed, step, rank) only: resumed runs match.
        torch.manual_seed(self.seed * 1_000_003 + step * world + rank)
        idx = self.batch_indices(step)
        x1, y = self.train_x[idx], self.train_y[idx]
        t = sample_timesteps(len(idx), self.timestep_sampling, device=self.device)
        noise = torch.randn_like(x1)
        x1, model, shifts = self.augment(x1)
        negatives = other_class_pairs(y) if self.contrastive_weight > 0 else None
        if self.repa_projector is not None:
            model, alignment = self.with_alignment(model, idx, shifts)
        loss = flow_matching_loss(model, x1, y, t, noise, self.cosine_loss_weight,
                                  negatives, self.contrastive_weight).mean()
        if self.repa_projector is not None:
            # After --repa_stop_step (HASTE) the term is weighted 0 rather than skipped: under DDP every
            # parameter, the projector's too, must take part in each backward.
            weight = self.repa_weight if self.repa_stop_step is None or step < self.repa_stop_step else 0.0
            repa = alignment["loss"].mean()
            self.log("train_repa", repa, on_step=True, on_epoch=True, batch_size=len(idx), sync_dist=True)
            loss = loss + weight * repa
        if self.loss_scaler() is None:   # with a scaler, GradScaler skips the step (counted in optimizer_step)
            self.nonfinite_step.masked_fill_(~torch.isfinite(loss.detach()) & (self.nonfinite_step < 0), step)
        # sync_dist: the logged loss is the mean over the DDP processes (one scalar all-reduce a step)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(idx), sync_dist=True)
        return loss

    def augment(self, x1: torch.Tensor):
        """(x1, the velocity model to train, the shifts or None): with --time_shift_aug, latents rolled along time
        and the model told each shift. Drawn after t and the noise, so those stay the draws of a run without it."""
        if self.time_shift_aug <= 0:
            return x1, self.forward_fn, None
        shifts = random_time_shifts(len(x1), x1.shape[-1], self.time_shift_aug, device=x1.device)
        return shift_time(x1, shifts), functools.partial(self.forward_fn, time_shift=shifts), shifts

    def with_alignment(self, model, idx: torch.Tensor, shifts: torch.Tensor | None):
        """(a velocity model for flow_matching_loss, a dict that receives its REPA loss (N,) under "loss"): the
        same forward also returns the tokens after block repa_depth, scored against the batch's targets."""
        targets = targets_on_tokens(self.repa_targets[idx], shifts, math.isqrt(self.model.pos_embed.shape[1]))
        alignment = {}

        def velocity(x, t, y):
            v, tokens = model(x, t, y, features_at=self.repa_depth)
            alignment["loss"] = repa_loss(self.repa_projector, tokens, targets)
            return v
        return velocity, alignment

    def optimizer_step(self, epoch, batch_idx, optimizer, *args, **kwargs):
        # Linear lr warm-up as a function of the global step (no scheduler state: a checkpoint written in
        # on_train_batch_end would hold a scheduler one step behind, and a resume would repeat an lr).
        ramp = min(1.0, (self.global_step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = group.get("base_lr", self.lr) * ramp
        # The EMA follows each optimizer step here, not in on_train_batch_end: ModelCheckpoint saves in
        # its own on_train_batch_end, which runs before the module's, and would miss this step's update.
        scaler = self.loss_scaler()
        scale_before = scaler_scale(scaler) if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        if scaler is not None:
            self.count_skipped_step(scale_before, scaler_scale(scaler))
        self.update_ema(self.global_step + 1)   # global_step counts this step only after this hook

    def loss_scaler(self) -> "torch.amp.GradScaler | None":
        """The GradScaler of 16-mixed precision; None under bf16-mixed/32-true (and outside a Trainer)."""
        if self._trainer is None:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    @torch.no_grad()
    def count_skipped_step(self, scale_before: torch.Tensor, scale_after: torch.Tensor) -> None:
        """GradScaler lowers its scale exactly when it skipped the step (NaN/inf gradients); it only grows
        otherwise. Counted on the device; the run stops at MAX_SKIPPED_IN_A_ROW (check_finite)."""
        skipped = (scale_after < scale_before).long()
        self.skipped_steps += skipped
        self.skipped_in_a_row.mul_(skipped).add_(skipped)
        reached = (self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW) & (self.persistent_skip_step < 0)
        self.persistent_skip_step.masked_fill_(reached, self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.loss_scaler() is not None:   # logged as a device tensor: the logger syncs when it writes
            self.log("skipped_steps", self.skipped_steps.float(), on_step=True, on_epoch=False)
        if (self.global_step % NONFINITE_CHECK_EVERY == 0 or self.global_step < 10):
            self.check_finite()

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if any rank's loss was NaN/inf since the start (without loss scaling), if loss
        scaling skipped MAX_SKIPPED_IN_A_ROW steps in a row, or if the weights or the EMA are no longer finite
        (one device sync).

        Every rank raises with the first bad step over all ranks, so each prints the same message. The flags are
        rank-local: DDP must not broadcast buffers (train_dit builds it with broadcast_buffers=False), or rank
        0's flags would overwrite the others' before each forward.
        """
        none = torch.iinfo(torch.int64).max
        weights = [p for m in (self.model, self.ema) for p in m.parameters()]
        weights_finite = torch.stack([torch.isfinite(p).all() for p in weights]).all()
        steps = torch.stack([self.nonfinite_step, self.persistent_skip_step,
                             torch.where(weights_finite, -1, self.global_step)])
        first = self.trainer.strategy.reduce(torch.where(steps >= 0, steps, none), reduce_op="min").tolist()
        for kind, step in zip(("loss", "skipped", "weights"), first):
            if step != none:
                raise NonFiniteLoss(step, kind, skipped=int(self.skipped_steps))

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay after optimizer step `step` (from 1).

        With --ema_std, EDM2's power-function EMA (Karras et al. 2024, eq. 3 with sec. 3.1's
        gamma(sigma_rel)): beta = (1 - 1/step)^(gamma + 1), an average over a fixed *fraction* of the run so far,
        so an early checkpoint is not held back by old weights and a long run still averages widely. Otherwise
        a constant decay with a warm-up, (1 + step) / (10 + step) until it reaches --ema_decay (itself a power
        function with gamma = 8, sigma_rel ~0.09, until then).
        """
        if self.ema_gamma is not None:
            return (1 - 1 / step) ** (self.ema_gamma + 1)
        return min(self.ema_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update_ema(self, step: int):
        decay = self.ema_decay_at(step)
        # One fused multi-tensor lerp over the trained parameters (frozen ones equal their EMA already; with
        # LoRA they are the same tensors); the decay is a Python float (no device sync).
        pairs = [(e, p.detach()) for e, p in zip(self.ema.parameters(), self.model.parameters()) if p.requires_grad]
        if pairs:
            ema_params, params = map(list, zip(*pairs))
            torch._foreach_lerp_(ema_params, params, 1 - decay)

    def validation_step(self, batch, batch_idx):
        start, end = batch
        x1, y = self.val_x[start:end], self.val_y[start:end]
        loss = flow_matching_loss(self.ema, x1, y, self.val_t[start:end], self.val_noise[start:end],
                                  self.cosine_loss_weight).mean()
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=end - start)

    def configure_optimizers(self):
        # Fused AdamW on every device (CUDA, and CPU since torch 2.4): one kernel for the whole update, 3-4x
        # faster than foreach on the CPU. The same construction everywhere, so the CPU tests run the GPU's.
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr, betas=self.betas,
                                      weight_decay=self.weight_decay, fused=True)
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
        return optimizer

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip the global gradient norm of the true (unscaled) gradients.

        Lightning's own clipping refuses a fused optimizer under mixed precision ("does not allow for gradient
        clipping because it performs unscaling of gradients internally"): with fp16 loss scaling, fused AdamW
        would unscale inside its step, after the clip. So unscale here first; GradScaler records it, and its
        step() then hands the fused kernel no scale (still skipping the step on inf/NaN gradients).
        """
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"only norm clipping is implemented, not {gradient_clip_algorithm}")
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)   # 16-mixed only
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def param_groups(self) -> list[dict]:
        """Trainable parameters; with backbone_lr_scale < 1 the transformer blocks learn slower.

        With weight decay, norms, biases and the class table (null row included) go to groups without it:
        decaying them pulls gains and rows towards 0, not towards a simpler model. (Without, the groups stay
        as they were, so that earlier checkpoints' optimizer states still load.)
        """
        embeddings = {id(p) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)
                      for p in m.parameters()}
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_backbone = name.startswith("blocks.") and "adaLN_modulation" not in name
            no_decay = self.weight_decay > 0 and (p.ndim < 2 or id(p) in embeddings)
            groups.setdefault((is_backbone, no_decay), []).append(p)
        layout = [{"params": params, "lr": self.lr * (self.backbone_lr_scale if is_backbone else 1.0),
                   **({"weight_decay": 0.0} if no_decay else {})}
                  for (is_backbone, no_decay), params in sorted(groups.items())]
        if self.repa_projector is not None:   # last, so the model's groups keep their places
            layout.append({"params": list(self.repa_projector.parameters()), "lr": self.lr})
        return layout

    # ---------------------------------------------------------------- identity
    def on_fit_start(self) -> None:
        """Train the noisy-latent user classifier on the train latents before the first step (a resume brings it
        in the checkpoint: training/resume.py), on this device, the same on every rank (seeded)."""
        if self.info.latent_classifier is not None or self.classifier_steps == 0:
            return
        started = time.monotonic()
        classifier = train_latent_classifier(self.train_x, self.train_y, self.model.num_classes, seed=self.seed,
                                             steps=self.classifier_steps)
        self.info.latent_classifier = classifier_entry(classifier)
        if self.global_rank == 0:
            accuracy = classifier_accuracy(classifier, self.val_x, self.val_y, seed=self.seed)
            print(f"noisy-latent user classifier ({time.monotonic() - started:.0f} s): val accuracy "
                  + ", ".join(f"{a:.2f} at t={t:g}" for t, a in accuracy.items())
                  + f" (chance {1 / self.model.num_classes:.2f}; t = 1 clean)", flush=True)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()   # a checkpoint is only written while the loss and the weights are finite
        checkpoint["pipeline"] = self.info.to_dict()
        checkpoint["skipped_steps"] = int(self.skipped_steps)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps.fill_(checkpoint.get("skipped_steps", 0))   # the count goes on over a resume


def power_ema_gamma(sigma_rel: float) -> float:
    """EDM2's exponent gamma of a power-function EMA of relative standard deviation sigma_rel (the width of the
    averaging window as a fraction of training so far): the root of sigma_rel^2 = (g+1) / ((g+2)^2 (g+3))
    (Karras et al. 2024, eq. 2-3; edm2 training/phema.py solves the same cubic). sigma_rel in (0, 0.28)."""
    if not 0 < sigma_rel < 0.28:
        raise ValueError(f"sigma_rel must be in (0, 0.28) (got {sigma_rel}); 0.05-0.15 are EDM2's useful range")
    # The right side falls monotonically in g on [0, inf): bisection, no root-finder needed.
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel ** 2:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def other_class_pairs(y: torch.Tensor) -> torch.Tensor:
    """For each sample i of a batch, the index j of a random sample of another class (y[j] != y[i]), or -1
    where the batch holds no other class: the negatives of contrastive flow matching. y: (N,) int64."""
    scores = torch.rand(len(y), len(y), device=y.device).masked_fill(y[:, None] == y[None, :], -1.0)
    best, index = scores.max(dim=1)
    return torch.where(best >= 0, index, -1)


class Batches:
    """A sized iterable of batch descriptors (a list would read as several dataloaders to Lightning)."""
    def __init__(self, items: list):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def scaler_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """GradScaler's current scale as a device tensor (reading get_scale() would sync every step); before its
    first step, the initial scale."""
    scale = scaler._get_scale_async()
    return scale.clone() if scale is not None else torch.tensor(scaler.get_scale())


class NonFiniteLoss(PipelineError):
    """Training diverged. kind: 'loss' (a NaN/inf loss without loss scaling), 'skipped' (loss scaling skipped
    MAX_SKIPPED_IN_A_ROW steps in a row, the last one `step`) or 'weights' (the weights or the EMA hold NaN/inf);
    skipped: steps that loss scaling skipped in the run so far."""
    def __init__(self, step: int, kind: str = "loss", skipped: int = 0):
        self.step, self.kind, self.skipped = step, kind, skipped
        what = {"loss": f"the training loss became NaN or infinite by step {step}",
                "skipped": f"loss scaling skipped {MAX_SKIPPED_IN_A_ROW} steps in a row up to step {step} "
                           "(NaN/inf loss or gradients)",
                "weights": f"the weights or their EMA hold NaN/inf values at step {step}"}[kind]
        super().__init__(what)
