"""Stage 2 model: LightningDiT + flow-matching loss + EMA as a LightningModule.

The latents live on the training device for the whole run; the batch for a step is a pure function of
(seed, global step, rank). That makes training exactly resumable mid-epoch and keeps the step free of
host-to-device copies.
"""
import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch

from common.errors import PipelineError
from models.lightningdit import LightningDiT
from models.transport import flow_matching_loss, sample_timesteps

CHECKPOINT_KIND = "micro_doppler_lightningdit"


class DiTTrainingModule(pl.LightningModule):
    def __init__(self, model_config: dict, train_latents: torch.Tensor, train_labels: torch.Tensor,
                 val_latents: torch.Tensor, val_labels: torch.Tensor, pipeline_info: dict[str, Any],
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 batch_size: int = 32, ema_decay: float = 0.9995, seed: int = 0,
                 timestep_sampling: str = "uniform", cosine_loss_weight: float = 0.0,
                 compile_model: bool = False, backbone_lr_scale: float = 1.0):
        super().__init__()
        self.model = LightningDiT(**model_config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.model_config = dict(model_config)
        self.pipeline_info = pipeline_info
        self.lr, self.betas, self.weight_decay = lr, betas, weight_decay
        self.batch_size, self.ema_decay, self.seed = batch_size, ema_decay, seed
        self.timestep_sampling, self.cosine_loss_weight = timestep_sampling, cosine_loss_weight
        self.backbone_lr_scale = backbone_lr_scale
        self.forward_fn = torch.compile(self.model) if compile_model else self.model
        # Normalised once, kept as non-persistent buffers so they follow the module to its device.
        mean, std = pipeline_info["latent_mean"], pipeline_info["latent_std"]
        self.register_buffer("train_x", (train_latents - mean) / std, persistent=False)
        self.register_buffer("train_y", train_labels.long(), persistent=False)
        self.register_buffer("val_x", (val_latents - mean) / std, persistent=False)
        self.register_buffer("val_y", val_labels.long(), persistent=False)
        # Fixed validation noise and timesteps: epochs (and runs) compare on the same draws.
        g = torch.Generator().manual_seed(seed + 12345)
        self.register_buffer("val_noise", torch.randn(val_latents.shape, generator=g), persistent=False)
        n_val = len(val_latents)
        self.register_buffer("val_t", (torch.arange(n_val) + 0.5) / max(n_val, 1), persistent=False)
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

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
        """Indices of this rank's batch at a global step: epoch-wise permutations seeded by (seed, epoch)."""
        rank, world = self.world()
        spe, n = self.steps_per_epoch(), len(self.train_x)
        epoch, pos = divmod(step, spe)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        start = (pos * world + rank) * self.batch_size
        return perm[torch.arange(start, start + self.batch_size) % n]

    # ---------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx):
        rank, world = self.world()
        step = self.global_step
        # Every random draw of this step depends on (seed, step, rank) only: resumed runs match.
        torch.manual_seed(self.seed * 1_000_003 + step * world + rank)
        idx = self.batch_indices(step).to(self.device)
        x1, y = self.train_x[idx], self.train_y[idx]
        t = sample_timesteps(len(idx), self.timestep_sampling, device=self.device)
        noise = torch.randn_like(x1)
        loss = flow_matching_loss(self.forward_fn, x1, y, t, noise, self.cosine_loss_weight).mean()
        self.nonfinite |= ~torch.isfinite(loss.detach())
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(idx))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.update_ema()

    @torch.no_grad()
    def update_ema(self):
        # Warm-up: early on the EMA follows the weights closely, otherwise short runs stay near init.
        step = self.global_step
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        ema_params = [p for p in self.ema.parameters()]
        params = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - decay)

    def validation_step(self, batch, batch_idx):
        start, end = batch
        x1, y = self.val_x[start:end], self.val_y[start:end]
        loss = flow_matching_loss(self.ema, x1, y, self.val_t[start:end], self.val_noise[start:end],
                                  self.cosine_loss_weight).mean()
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=end - start)

    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        groups = self.param_groups()
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay,
                                 fused=fused, foreach=None if fused else True)

    def param_groups(self) -> list[dict]:
        """Trainable parameters; with backbone_lr_scale < 1 the transformer blocks learn slower."""
        head, backbone = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            is_backbone = name.startswith("blocks.") and "adaLN_modulation" not in name
            (backbone if is_backbone else head).append(p)
        groups = [{"params": head, "lr": self.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": self.lr * self.backbone_lr_scale})
        return groups

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if bool(self.nonfinite):
            raise NonFiniteLoss(int(self.global_step))
        checkpoint["pipeline"] = {
            "kind": CHECKPOINT_KIND,
            "model_config": self.model_config,
            **self.pipeline_info,
        }


class Batches:
    """A sized iterable of batch descriptors (a list would read as several dataloaders to Lightning)."""
    def __init__(self, items: list):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class NonFiniteLoss(PipelineError):
    def __init__(self, step: int):
        self.step = step
        super().__init__(f"the training loss became NaN or infinite by step {step}")


def ema_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The EMA weights of a stage 2 checkpoint, with LightningDiT's own key names."""
    return {k[len("ema."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema.")}
