"""`--finetune lora`: low-rank adapters (peft) on every block's attention and MLP projections.

A published LightningDiT-XL/1 trained in full needs ~11 GB for its weights, gradients, AdamW state and EMA
before a single activation: more than a 16 GB T4 leaves for a batch. With LoRA the projections of the
blocks (qkv, proj, w12, w3: two thirds of the weights) are frozen and, on a GPU with mixed precision, kept
in half precision; each learns a rank-r update W + (alpha / r) B A instead. The adaLN modulation, the
t/y/x embedders (the class table holds the new users) and the final layer train in full, as in
`--finetune partial`. Only what trains has gradients, Adam state and an EMA: the EMA model shares the frozen
tensors with the trained one.

Checkpoints hold the adapters and the (frozen) base weights under peft's names; `merge_lora_state`
(models/checkpoint.py) folds them back into a plain LightningDiT state dict for stage 3 and for `--init_from`,
so a LoRA checkpoint is, like any other, all that sampling needs besides the tokenizer. peft is imported only to inject the adapters.
"""
import copy
import re
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn as nn

from common.errors import PipelineError
from training.init_from import GRID_TABLES, partial_trainable

# The nn.Linear layers that get adapters: attention qkv/proj and the MLP (SwiGLU w12/w3, or GELU fc1/fc2).
TARGET_PATTERN = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(w12|w3|fc1|fc2))"
DEFAULT_RANK = 16


def is_lora_target(module_name: str) -> bool:
    """True for the names of the nn.Linear layers that get adapters."""
    return re.fullmatch(TARGET_PATTERN, module_name) is not None


def lora_trainable(param_name: str) -> bool:
    """What `--finetune lora` trains: the adapters plus what `--finetune partial` trains."""
    return ".lora_A." in param_name or ".lora_B." in param_name or partial_trainable(param_name)


#################################################################################
#                            Adapters on a training module                      #
#################################################################################

def apply_lora(module, rank: int = DEFAULT_RANK, alpha: float | None = None) -> tuple[int, int]:
    """Inject adapters into module.model, freeze the rest, rebuild module.ema; returns (trainable, total).

    Call it after the pretrained weights are loaded: B starts at zero, so the model is unchanged at step 0.
    """
    if rank < 1:
        raise PipelineError(f"--lora_rank must be at least 1, not {rank}")
    alpha = float(rank if alpha is None else alpha)
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=f".*{TARGET_PATTERN}", lora_dropout=0.0,
                        bias="none")
    inject_adapter_in_model(config, module.model)
    for name, p in module.model.named_parameters():
        p.requires_grad_(lora_trainable(name) and name not in GRID_TABLES)
    module.ema = ema_sharing_frozen(module.model)
    module.info.lora = {"rank": rank, "alpha": alpha}
    total = sum(p.numel() for p in module.model.parameters())
    return sum(p.numel() for p in module.model.parameters() if p.requires_grad), total


def ema_sharing_frozen(model: nn.Module) -> nn.Module:
    """A copy of `model` for the EMA whose frozen parameters are the model's own tensors (no second copy
    of the base weights; they never change, so their average is themselves)."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    return copy.deepcopy(model, shared).eval()


def base_layers(model: nn.Module) -> list[nn.Linear]:
    """The frozen nn.Linear layers that peft wrapped (their weights are the bulk of the model)."""
    return [m.base_layer for name, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and isinstance(m.base_layer, nn.Linear)]


def halve_base_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen base projections in `dtype` (in place, so the EMA that shares them follows);
    returns the bytes saved. Autocast computes these layers in `dtype` anyway, so nothing changes but
    the memory (and no per-step cast copy of the weights is made)."""
    saved = 0
    for layer in base_layers(model):
        for p in layer.parameters():
            if p.dtype != dtype:
                saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
                p.data = p.data.to(dtype)
    return saved


class HalfPrecisionBase(pl.Callback):
    """Before the weights reach the GPU (and before a resumed checkpoint is loaded into them), store the
    frozen base projections in the autocast dtype of a mixed-precision CUDA run."""
    DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}

    def __init__(self, device_types: tuple[str, ...] = ("cuda",)):
        self.device_types = device_types

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dtype = self.DTYPES.get(str(trainer.precision))
        if dtype is not None and trainer.strategy.root_device.type in self.device_types:
            halve_base_weights(pl_module.model, dtype)


#################################################################################
#                           Checkpoints: resume check                           #
#################################################################################

def check_same_lora(saved: dict | None, current: dict | None, path: Path) -> None:
    """Resuming a LoRA run needs the same adapters; say so instead of a state-dict key error."""
    if saved == current:
        return
    describe = lambda c: f"--finetune lora --lora_rank {c['rank']} --lora_alpha {c['alpha']:g}" if c else \
        "without --finetune lora"
    raise PipelineError(f"{path} was trained {describe(saved)}, this run is {describe(current)}. Resume with "
                        "the same flags, or pass --restart (or another --output_dir) to start over.")
