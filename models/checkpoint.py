"""The stage 2 checkpoint format, in one place: what a checkpoint carries besides the weights, and reading it.

Both files carry a `pipeline` entry: everything stage 3 needs to sample without the training code or the
latents (model config, users, latent statistics, the tokenizer's sha256, LoRA adapter settings).
- last.ckpt is Lightning's dict for resuming (`state_dict` with `model.*` and `ema.*`, optimizer state, loops,
  the run's flags); training/dit_module.py adds the pipeline entry.
- best.ckpt is for sampling only (sampling_checkpoint): `state_dict` with the `ema.*` weights, the pipeline
  entry, `global_step`, `epoch` and `val_loss`; about a quarter of last.ckpt (no training weights, no
  AdamW moments).
Stage 3 and `--init_from` read either (the EMA weights); neither reader imports PyTorch Lightning.
"""
import os
import zipfile
from dataclasses import dataclass, fields
from typing import Any

import torch

from common.errors import PipelineError
from common.io import torch_load_weights

CHECKPOINT_KIND = "micro_doppler_lightningdit"
LORA_ADAPTER = "default"   # peft's adapter name; it appears in the parameter names (lora_A.default.weight)


#################################################################################
#                              What a checkpoint carries                        #
#################################################################################

@dataclass
class PipelineInfo:
    """The `pipeline` entry of a stage 2 checkpoint."""
    model_config: dict[str, Any]      # LightningDiT(**model_config) rebuilds the network
    users: list[str]                  # user folder names in class order
    user_numbers: list[int]           # the numbers in those names (ID_3 -> 3): stage 3's --user_ids
    latent_mean: torch.Tensor         # (1, C, 1, 1): latents are trained normalised with these
    latent_std: torch.Tensor
    tokenizer: str = ""               # file name and sha256 of the stage 1 tokenizer (stage 3 warns on another)
    tokenizer_sha256: str = ""
    image_size: int = 256
    lora: dict[str, Any] | None = None   # {"rank", "alpha"} of a `--finetune lora` run: adapters to merge
    # {"config", "state_dict"} of the noisy-latent user classifier trained in stage 2 (training/latent_classifier.py):
    # stage 3's classifier guidance; absent in checkpoints written before it existed
    latent_classifier: dict[str, Any] | None = None
    # the id of the stage 1 run whose latents trained it (data.latent_files.RUN_KEY): stage 3's real-anchored
    # sampling refuses another run's latent folder; "" in checkpoints written before it was recorded
    stage1_run: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored under checkpoint["pipeline"] (weights_only-loadable)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for optional in ("lora", "latent_classifier"):
            if values[optional] is None:
                del values[optional]   # the format of checkpoints written before these existed
        return {"kind": CHECKPOINT_KIND, **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PipelineInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def sampling_checkpoint(ema_state: dict[str, torch.Tensor], info: PipelineInfo, global_step: int, epoch: int,
                        val_loss: float) -> dict[str, Any]:
    """best.ckpt's contents: the EMA weights (LightningDiT key names, stored as `ema.*` like last.ckpt's) and
    what stage 3 needs; `val_loss` is the EMA validation loss these weights scored."""
    return {"state_dict": {f"ema.{k}": v for k, v in ema_state.items()}, "pipeline": info.to_dict(),
            "global_step": int(global_step), "epoch": int(epoch), "val_loss": float(val_loss)}


#################################################################################
#                                   Reading                                     #
#################################################################################

def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A stage 2 checkpoint (weights_only); a clear error for anything else."""
    mmap = mmap and zipfile.is_zipfile(path)
    ckpt = torch_load_weights(path, "a stage 2 checkpoint (checkpoints/best.ckpt or last.ckpt)", mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("pipeline", {}).get("kind") != CHECKPOINT_KIND:
        found = "a VA-VAE tokenizer" if isinstance(ckpt, dict) and any(
            str(k).startswith(("encoder.", "decoder.")) for k in ckpt.get("state_dict", ckpt)) else "another kind of file"
        raise PipelineError(f"{path} is not a stage 2 LightningDiT checkpoint (found {found}). "
                            "Pass --dit_checkpoint <output_dir>/checkpoints/best.ckpt from stage2_train_dit.py.")
    return ckpt


def checkpoint_info(checkpoint: dict[str, Any]) -> PipelineInfo:
    return PipelineInfo.from_dict(checkpoint["pipeline"])


def ema_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA weights of a stage 2 checkpoint, with LightningDiT's own key names (LoRA adapters merged)."""
    state = {k[len("ema."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema.")}
    lora = checkpoint.get("pipeline", {}).get("lora")
    return merge_lora_state(state, lora) if lora else state


def merge_lora_state(state: dict[str, torch.Tensor], lora: dict) -> dict[str, torch.Tensor]:
    """A plain LightningDiT state dict (float32) from one with adapters: W = W0 + (alpha / r) B A."""
    scaling = float(lora["alpha"]) / int(lora["rank"])
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.", 1)
            value = value.float()
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.{LORA_ADAPTER}.weight"].float()
                b = state[f"{prefix}.lora_B.{LORA_ADAPTER}.weight"].float()
                value = value + scaling * (b @ a)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged
