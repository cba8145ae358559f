"""What trains when stage 2 starts from pretrained weights (`--finetune full | partial | lora`).

  full     train every weight (the default). Use it when there are more than a few dozen images per user or
           the spectrograms look little like ImageNet (the usual case). With few images, add
           `--backbone_lr_scale 0.1` (blocks learn 10x slower) to keep the pretrained features from drifting.
  partial  freeze the transformer blocks; train only the adaLN modulation layers, the embedders (t, y, x)
           and the final layer (34 % of an XL/1's weights: the adaLN layers are a third of every block).
           Use it with very little data (tens of images per user) or to get a first model quickly; it fits
           faster, over-fits less, but cannot adapt the attention/MLP features to micro-Doppler structure.
  lora     partial + low-rank adapters (peft) on every block's attention and MLP projections.

Why LoRA: a published LightningDiT-XL/1 trained in full needs ~11 GB for its weights, gradients, AdamW state
and EMA before a single activation: more than a 16 GB T4 leaves for a batch. With LoRA the projections of the
blocks (qkv, proj, w12, w3: two thirds of the weights) are frozen and, on a GPU with mixed precision, kept in
half precision (training/callbacks.py: HalfPrecisionBase); each learns a rank-r update W + (alpha / r) B A
instead. Only what trains has gradients, Adam state and an EMA: the EMA model shares the frozen tensors with
the trained one. Checkpoints hold the adapters and the (frozen) base weights under peft's names;
`merge_lora_state` (models/checkpoint.py) folds them back into a plain LightningDiT state dict for stage 3
and for `--init_from`.

This module imports neither PyTorch Lightning nor peft at import time (training/memory.py uses its name
rules to estimate memory before anything is built); peft is imported only to inject the adapters.
"""
import copy
import re

import torch
import torch.nn as nn

from common.errors import PipelineError

MODES = ("full", "partial", "lora")
# Fixed tables that are pure functions of the token grid (not learned): never trained, recomputed by
# --init_from when the grid differs. Key -> token axis.
GRID_TABLES = {"pos_embed": 1, "feat_rope.freqs_cos": 0, "feat_rope.freqs_sin": 0}
# What `--finetune partial` trains: conditioning and input/output layers; the blocks' attention/MLP stay frozen.
PARTIAL_TRAINABLE_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "time_shift_embedder.", "final_layer.")
# The nn.Linear layers that get adapters: attention qkv/proj and the MLP (SwiGLU w12/w3, or GELU fc1/fc2).
TARGET_PATTERN = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(w12|w3|fc1|fc2))"
DEFAULT_RANK = 16


#################################################################################
#                          Which parameters train                               #
#################################################################################

def partial_trainable(name: str) -> bool:
    """True for what `--finetune partial` trains: adaLN layers, the t/y/x embedders and the final layer."""
    return name.startswith(PARTIAL_TRAINABLE_PREFIXES) or ".adaLN_modulation." in name


def is_lora_target(module_name: str) -> bool:
    """True for the names of the nn.Linear layers that get adapters."""
    return re.fullmatch(TARGET_PATTERN, module_name) is not None


def lora_trainable(param_name: str) -> bool:
    """What `--finetune lora` trains: the adapters plus what `--finetune partial` trains."""
    return ".lora_A." in param_name or ".lora_B." in param_name or partial_trainable(param_name)


def _counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def apply_finetune(model: nn.Module, finetune: str) -> tuple[int, int]:
    """Set requires_grad for `full` or `partial`; returns (trainable, total) parameter counts.

    The fixed grid tables stay frozen in both modes. DiTTrainingModule.param_groups skips frozen parameters,
    so the optimizer only ever sees (and keeps Adam state for) the trainable ones.
    Raises PipelineError for any other mode (`lora` needs the training module: apply_lora).
    """
    if finetune not in ("full", "partial"):
        raise PipelineError(f"--finetune must be 'full' or 'partial', not '{finetune}'")
    for name, p in model.named_parameters():
        if name in GRID_TABLES:
            continue
        p.requires_grad_(finetune == "full" or partial_trainable(name))
    return _counts(model)


#################################################################################
#                            Adapters on a training module                      #
#################################################################################

def apply_lora(module, rank: int = DEFAULT_RANK, alpha: float | None = None) -> tuple[int, int]:
    """Inject adapters into module.model, freeze the rest, rebuild module.ema; returns (trainable, total).

    Call it after the pretrained weights are loaded: B starts at zero, so the model is unchanged at step 0.
    Raises PipelineError for a rank below 1.
    """
    if rank < 1:
        raise PipelineError(f"--lora_rank must be at least 1, not {rank}")
    alpha = float(rank if alpha is None else alpha)
    from peft import LoraConfig, inject_adapter_in_model   # optional: only --finetune lora needs peft (~3 s)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=f".*{TARGET_PATTERN}", lora_dropout=0.0,
                        bias="none")
    inject_adapter_in_model(config, module.model)
    for name, p in module.model.named_parameters():
        p.requires_grad_(lora_trainable(name) and name not in GRID_TABLES)
    module.ema = ema_sharing_frozen(module.model)
    module.info.lora = {"rank": rank, "alpha": alpha}
    return _counts(module.model)


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
