"""Stage 2's LightningModule: the DiT, its EMA copy, the normalised latents, and the training step.

What the step is made of lives beside it, each a unit of its own:
- the loss and its draws: models/transport.py (sample_timesteps, flow_matching_loss, other_class_pairs);
- which latents form each batch, a function of (seed, global step, rank): training/batches.py;
- the time-shift augmentation: training/augment.py; REPA: training/repa.py (RepaAlignment);
- the EMA: training/ema.py; AdamW's groups, the lr warm-up and the clipping: training/optim.py;
- NaN/inf checks and fp16 skipped steps: training/divergence.py (DivergenceGuard, a callback);
- the noisy-latent user classifier: training/latent_classifier.py (LatentClassifierTraining, a callback).
Checkpoints (models/checkpoint.py): `state_dict` holds model.*, ema.* and, with REPA, repa_projector.*; every
checkpoint carries the `pipeline` entry (on_save_checkpoint).
"""
import copy
import math

import pytorch_lightning as pl
import torch

from models.checkpoint import PipelineInfo
from models.lightningdit import LightningDiT
from models.transport import flow_matching_loss, other_class_pairs, sample_timesteps
from training import ema, optim
from training.augment import check_probability, time_shifted
from training.batches import TrainBatches, steps_per_epoch, validation_batches
from training.cli import TrainOptions
from training.repa import RepaAlignment


class DiTTrainingModule(pl.LightningModule):
    """The DiT, its EMA copy, the normalised latents and the optimiser; checkpoints carry what stage 3 needs."""
    def __init__(self, info: PipelineInfo, train_latents: torch.Tensor, train_labels: torch.Tensor,
                 val_latents: torch.Tensor, val_labels: torch.Tensor, options: TrainOptions,
                 repa_targets: torch.Tensor | None = None):
        """info: the model config, users and latent statistics (saved in every checkpoint); latents (N, C, H, W)
        float32 as stage 1 wrote them (normalised here) with their (N,) int64 user classes; options: stage 2's
        flags (training/cli.py, where their defaults live); repa_targets (N_train, g*g, D) for --repa_weight.
        Raises ValueError for repa_targets or time shifts the model cannot take, PipelineError for a bad flag."""
        super().__init__()
        self.options = options
        self.model = LightningDiT(**info.model_config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.info = info   # saved with every checkpoint (models/checkpoint.py)
        self.ema_schedule = ema.EMASchedule.from_flags(options.ema_decay, options.ema_std)
        self.time_shift_aug = check_probability(options.time_shift_aug)
        # REPA (training/repa.py); the attribute's name is its weights' key prefix in checkpoints.
        self.repa_projector = None
        if options.repa_weight > 0:
            if repa_targets is None or len(repa_targets) != len(train_latents):
                raise ValueError("repa_weight > 0 needs one row of repa_targets per train latent")
            self.repa_projector = RepaAlignment(self.model.pos_embed.shape[-1], len(self.model.blocks),
                                                repa_targets, options.repa_weight, options.repa_depth,
                                                options.repa_stop_step)
        if self.time_shift_aug > 0 and not info.model_config.get("time_shift_cond"):
            raise ValueError("time_shift_aug > 0 needs a model built with time_shift_cond (train_dit.build_module)")
        # Kept out of the registered submodules: as one it would put a second copy of the weights in every
        # checkpoint (under forward_fn._orig_mod.* when compiled, so --compile runs could not resume without).
        self.__dict__["forward_fn"] = torch.compile(self.model) if options.compile else self.model
        self.register_latents(info, train_latents, train_labels, val_latents, val_labels)
        self.batches = TrainBatches(len(train_latents), options.batch_size, options.seed)

    def register_latents(self, info: PipelineInfo, train_latents: torch.Tensor, train_labels: torch.Tensor,
                         val_latents: torch.Tensor, val_labels: torch.Tensor) -> None:
        """The latents, normalised once, and the fixed validation draws as non-persistent buffers: they follow the
        module to its device and stay out of checkpoints."""
        mean, std = info.latent_mean, info.latent_std
        self.register_buffer("train_x", (train_latents - mean) / std, persistent=False)
        self.register_buffer("train_y", train_labels.long(), persistent=False)
        self.register_buffer("val_x", (val_latents - mean) / std, persistent=False)
        self.register_buffer("val_y", val_labels.long(), persistent=False)
        # Fixed validation noise and timesteps: epochs (and runs) compare on the same draws.
        g = torch.Generator().manual_seed(self.options.seed + 12345)
        self.register_buffer("val_noise", torch.randn(val_latents.shape, generator=g), persistent=False)
        n_val = len(val_latents)
        self.register_buffer("val_t", (torch.arange(n_val) + 0.5) / max(n_val, 1), persistent=False)

    # ---------------------------------------------------------------- data
    def world(self) -> tuple[int, int]:
        """(this process's global rank, the number of processes); (0, 1) outside a Trainer."""
        try:
            return self.global_rank, self.trainer.world_size
        except RuntimeError:   # "not attached to a Trainer"
            return 0, 1

    def train_dataloader(self):
        return range(steps_per_epoch(len(self.train_x), self.options.batch_size, self.world()[1]))

    def val_dataloader(self):
        return validation_batches(len(self.val_x), self.options.batch_size, *self.world())

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices, on the latents' device, of this rank's batch at a global step (training/batches.py)."""
        return self.batches.indices(step, *self.world(), self.train_x.device)

    # ---------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx):
        rank, world = self.world()
        step, options = self.global_step, self.options
        # Every random draw of this step depends on (seed, step, rank) only: resumed runs match.
        torch.manual_seed(options.seed * 1_000_003 + step * world + rank)
        idx = self.batch_indices(step)
        x1, y = self.train_x[idx], self.train_y[idx]
        t = sample_timesteps(len(idx), options.timestep_sampling, device=self.device)
        noise = torch.randn_like(x1)
        # Drawn after t and the noise, so those stay the draws of a run without the augmentation.
        x1, model, shifts = time_shifted(x1, self.forward_fn, self.time_shift_aug)
        negatives = other_class_pairs(y) if options.contrastive_weight > 0 else None
        if self.repa_projector is not None:
            token_grid = math.isqrt(self.model.pos_embed.shape[1])
            model, alignment = self.repa_projector.aligned(model, idx, shifts, token_grid)
        loss = flow_matching_loss(model, x1, y, t, noise, options.cosine_loss_weight,
                                  negatives, options.contrastive_weight).mean()
        if self.repa_projector is not None:
            repa = alignment["loss"].mean()
            self.log("train_repa", repa, on_step=True, on_epoch=True, batch_size=len(idx), sync_dist=True)
            loss = loss + self.repa_projector.weight_at(step) * repa
        # sync_dist: the logged loss is the mean over the DDP processes (one scalar all-reduce a step)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(idx), sync_dist=True)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, *args, **kwargs):
        optim.warm_up(optimizer, self.global_step, self.options.warmup_steps, self.options.lr)
        super().optimizer_step(epoch, batch_idx, optimizer, *args, **kwargs)
        # The EMA follows each optimizer step here, not in on_train_batch_end: the checkpoint callbacks save in
        # theirs, which run before the module's, and would miss this step's update.
        self.update_ema(self.global_step + 1)   # global_step counts this step only after this hook

    def update_ema(self, step: int) -> None:
        """After optimizer step `step` (from 1): the EMA moves towards the weights by its schedule's decay."""
        ema.update_ema(self.ema, self.model, self.ema_schedule(step))

    def validation_step(self, batch, batch_idx):
        start, end = batch
        x1, y = self.val_x[start:end], self.val_y[start:end]
        loss = flow_matching_loss(self.ema, x1, y, self.val_t[start:end], self.val_noise[start:end],
                                  self.options.cosine_loss_weight).mean()
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=end - start)

    # ---------------------------------------------------------------- optimizer
    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups (training/optim.param_groups), the REPA projector's last."""
        options = self.options
        return optim.param_groups(self.model, options.lr, options.weight_decay, options.backbone_lr_scale,
                                  self.repa_projector)

    def configure_optimizers(self):
        return optim.adamw(self.param_groups(), self.options.lr, self.options.beta2, self.options.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip the global norm of the true (unscaled) gradients (training/optim.clip_true_gradients says why not
        Lightning's own clipping)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"only norm clipping is implemented, not {gradient_clip_algorithm}")
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)   # 16-mixed only
        optim.clip_true_gradients(optimizer, gradient_clip_val, scaler)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pipeline"] = self.info.to_dict()
