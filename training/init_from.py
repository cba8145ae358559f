"""Start stage 2 from pretrained LightningDiT weights (the published ImageNet checkpoints) instead of noise.

With ~150 images per user a DiT trained from scratch is data-starved. The published LightningDiT was trained
on ImageNet in the same VA-VAE f16d32 latent space this pipeline uses, so everything but the class table
transfers: the table is rebuilt for this data set's users (+ the null row for guidance), every other weight is
kept, and the EMA starts from the loaded weights.

What trains afterwards (`--finetune full | partial | lora`) is training/finetune.py's business.

Accepted files (always read with weights_only=True, so a pickle that would run code is refused):
  - the published layout: a torch pickle with `model`, `ema`, `opt`, `config` (the EMA weights are used);
  - a flat LightningDiT state dict, or one under a `state_dict` key, in a torch or a .safetensors file;
  - this project's own stage 2 checkpoints (`pipeline` key; EMA weights under `state_dict` as `ema.*`);
  the `module.` (DDP) and `_orig_mod.` (torch.compile) segments that wrappers add are removed wherever they
  occur in a key (`model._orig_mod.blocks.0...` of a Lightning module whose DiT was compiled included).
"""
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import PipelineError
from common.io import load_safetensors, require_file, torch_load_weights
from models.checkpoint import merge_lora_state
from models.lightningdit import TIME_SHIFT_TABLE, LightningDiT, LightningDiT_models
from training.finetune import GRID_TABLES, apply_finetune, apply_lora

WHAT = "LightningDiT weights (--init_from): a published checkpoint, a state dict or a stage 2 checkpoint"
CLASS_TABLE = "y_embedder.embedding_table.weight"
# Key segments that wrappers add: DDP's `module.`, torch.compile's `_orig_mod.`; at any depth, since a
# Lightning module nests its (compiled) DiT under `model.`/`ema.`. LightningDiT names no layer `module`.
WRAPPER_SEGMENT = re.compile(r"(?:^|(?<=\.))(?:module|_orig_mod)\.")
# Share of the pretrained table's std used as noise on the new user rows (see resize_class_table).
USER_ROW_NOISE = 0.1


#################################################################################
#                                Reading weights                                #
#################################################################################

@dataclass
class PretrainedWeights:
    """A LightningDiT state dict read from a file, with where it came from and what the file says about it."""
    state: dict[str, torch.Tensor]
    picked: str                                            # e.g. "ema", "model", "state_dict/ema.*", "flat"
    config: dict[str, Any] = field(default_factory=dict)   # the file's own config, if any (hints only)
    users: list[str] | None = None                         # class names, for this project's checkpoints


def load_pretrained(path: str | Path) -> PretrainedWeights:
    """Read any accepted layout (see the module docstring) into LightningDiT key names."""
    path = require_file(path, WHAT)
    if path.suffix == ".safetensors":
        obj, meta = load_safetensors(path)
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        state, picked = _pick_state(obj)
        return _checked(path, PretrainedWeights(state, picked, config))
    # mmap: a published file also holds the optimizer state (2x the weights); only touched tensors are read.
    obj = torch_load_weights(path, WHAT, mmap=zipfile.is_zipfile(path))
    if not isinstance(obj, dict):
        raise PipelineError(f"{path} holds a {type(obj).__name__}, not {WHAT}.")
    obj = strip_prefixes(obj)
    pipeline = obj.get("pipeline") if isinstance(obj.get("pipeline"), dict) else None
    config: dict[str, Any] = {}
    if pipeline is not None:
        config = dict(pipeline.get("model_config") or {})
    elif isinstance(obj.get("config"), dict):
        config = obj["config"]
    for key in ("ema", "model", "state_dict"):   # the published layout's `ema` is what its inference uses
        if isinstance(obj.get(key), dict):
            state, picked = _pick_state(obj[key])
            picked = key if picked == "flat" else f"{key}/{picked}"
            break
    else:
        state, picked = _pick_state(obj)
    users = list(pipeline["users"]) if pipeline is not None and pipeline.get("users") else None
    if pipeline is not None and pipeline.get("lora"):   # a `--finetune lora` checkpoint: adapters merged
        state = merge_lora_state(state, pipeline["lora"])
    return _checked(path, PretrainedWeights(state, picked, config, users))


def strip_prefixes(obj: Any) -> Any:
    """Remove the DDP/compile segments (`module.`, `_orig_mod.`) wherever they occur in the keys of every
    (nested) dict: `module._orig_mod.x`, `model._orig_mod.x` and `model.module.x` all become `x` / `model.x`."""
    if not isinstance(obj, dict):
        return obj
    return {WRAPPER_SEGMENT.sub("", key) if isinstance(key, str) else key: strip_prefixes(value)
            for key, value in obj.items()}


def _pick_state(tensors: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """From a flat dict: the `ema.*` weights if present, else `model.*`, else the dict itself."""
    tensors = {k: v for k, v in strip_prefixes(tensors).items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("state_dict.") for k in tensors):   # safetensors exports of a nested dict
        tensors = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    # LightningDiT's own keys never start with `ema.`/`model.`, so these prefixes are unambiguous.
    for prefix in ("ema.", "model."):
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if sub:
            return sub, f"{prefix}*"
    return tensors, "flat"


def _checked(path: Path, weights: PretrainedWeights) -> PretrainedWeights:
    if "x_embedder.proj.weight" not in weights.state or CLASS_TABLE not in weights.state:
        sample = ", ".join(list(weights.state)[:4]) or "no tensors"
        found = " (it looks like a VA-VAE tokenizer)" if any(
            k.startswith(("encoder.", "decoder.")) for k in weights.state) else ""
        raise PipelineError(
            f"{path} holds no LightningDiT weights{found}: expected keys like x_embedder.proj.weight and "
            f"{CLASS_TABLE}, found {sample}. Pass a LightningDiT checkpoint (e.g. the published "
            "lightningdit-xl-imagenet256-*.pt) or a stage 2 checkpoints/best.ckpt.")
    return weights


#################################################################################
#                          Architecture checks and hints                        #
#################################################################################

def deduce_architecture(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """depth / hidden_size / patch_size / in_channels / num_heads (when knowable) / grid of a state dict."""
    w = state["x_embedder.proj.weight"]                                   # (D, C, p, p)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    arch: dict[str, Any] = dict(depth=len(blocks), hidden_size=w.shape[0], in_channels=w.shape[1],
                                patch_size=w.shape[-1], use_qknorm=any(".attn.q_norm." in k for k in state))
    # Heads are not in the weight shapes, but RoPE's tables and qk-norm weights are head_dim wide.
    head_dim = (state["feat_rope.freqs_cos"].shape[1] if "feat_rope.freqs_cos" in state
                else state["blocks.0.attn.q_norm.weight"].shape[0] if "blocks.0.attn.q_norm.weight" in state
                else None)
    if head_dim:
        arch["num_heads"] = arch["hidden_size"] // head_dim
    elif isinstance((config or {}).get("num_heads"), int):
        arch["num_heads"] = config["num_heads"]
    if "pos_embed" in state:
        arch["grid"] = round(state["pos_embed"].shape[1] ** 0.5)
    return arch


def suggest_flags(arch: dict[str, Any]) -> str:
    """The stage 2 flags that build the architecture `arch` (a named size if one fits, else overrides)."""
    keys = ("depth", "hidden_size", "num_heads")
    named = [n for n, c in LightningDiT_models.items() if c["patch_size"] == arch["patch_size"]]
    exact = [n for n in named if all(LightningDiT_models[n][k] == arch[k] for k in keys if k in arch)]
    if exact:
        flags = f"--model {exact[0]}"
    else:
        base = next((n for n in named if LightningDiT_models[n]["hidden_size"] == arch["hidden_size"]), None)
        base = base or (named[0] if named else f"LightningDiT-S/{arch['patch_size']}")
        cfg = LightningDiT_models.get(base, {})
        flags = f"--model {base}" + "".join(f" --{k} {arch[k]}" for k in keys if k in arch and cfg.get(k) != arch[k])
    return flags + (" --use_qknorm" if arch.get("use_qknorm") else "")


def _describe(arch: dict[str, Any]) -> str:
    heads = f", {arch['num_heads']} heads" if "num_heads" in arch else ""
    return f"depth {arch['depth']}, hidden {arch['hidden_size']}{heads}, patch {arch['patch_size']}"


def check_compatible(weights: PretrainedWeights, model: LightningDiT, path: str | Path,
                     log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Every tensor of the file against the model; returns the loadable state (the model's own grid tables
    if the input size differs). Raises a PipelineError naming the first mismatches and the flags that would fit."""
    state, target = weights.state, model.state_dict()
    state_grid = dict(state)
    ours = deduce_architecture(target)
    theirs = deduce_architecture(state, weights.config)
    # A different token grid changes only the fixed sin-cos / RoPE tables: keep the model's own tables.
    grid_differs = [k for k, axis in GRID_TABLES.items() if k in state and k in target
                    and state[k].shape != target[k].shape
                    and _without(state[k].shape, axis) == _without(target[k].shape, axis)]
    for k in grid_differs:
        state_grid[k] = target[k]
    if TIME_SHIFT_TABLE in target and TIME_SHIFT_TABLE not in state:
        state_grid[TIME_SHIFT_TABLE] = target[TIME_SHIFT_TABLE]   # --time_shift_aug on a file without: starts at 0
    mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state_grid.items()
                  if k in target and k != CLASS_TABLE and v.shape != target[k].shape]
    if CLASS_TABLE in target and state[CLASS_TABLE].shape[1] != target[CLASS_TABLE].shape[1]:
        mismatched.insert(0, (CLASS_TABLE, tuple(state[CLASS_TABLE].shape), tuple(target[CLASS_TABLE].shape)))
    missing = sorted(set(target) - set(state_grid))
    unexpected = sorted(set(state) - set(target))
    if mismatched or missing or unexpected:
        lines = [f"{k}: file {a} vs model {b}" for k, a, b in mismatched[:4]] + (
            [f"(+{len(mismatched) - 4} more)"] if len(mismatched) > 4 else [])
        if missing:
            lines.append(f"missing in the file: {_first(missing)}")
        if unexpected:
            lines.append(f"only in the file: {_first(unexpected)}")
        hints = []
        if theirs["in_channels"] != ours["in_channels"]:
            hints.append(f"the file was trained on {theirs['in_channels']}-channel latents but stage 1 wrote "
                         f"{ours['in_channels']}-channel ones: it needs latents from the same tokenizer "
                         "(VA-VAE f16d32 for the published LightningDiT)")
        if ("blocks.0.mlp.fc1.weight" in state) != ("blocks.0.mlp.fc1.weight" in target):
            hints.append("the file and stage 2 use different MLP types (SwiGLU vs plain GELU)")
        if theirs["in_channels"] == ours["in_channels"]:
            named = weights.config.get("model", {}).get("model_type") if isinstance(
                weights.config.get("model"), dict) else None
            said = f" (its config says {named})" if named else ""
            hints.append(f"the file is {_describe(theirs)}{said}: pass {suggest_flags(theirs)}")
        raise PipelineError(
            f"the weights in {path} do not fit the stage 2 model ({_describe(ours)}): "
            f"{len(mismatched)} tensor(s) differ in shape, {len(missing)} missing, {len(unexpected)} extra. "
            + "; ".join(lines) + ". " + ". ".join(hints) + ".")
    if grid_differs:
        log(f"note: {path} was trained on a {theirs.get('grid')}x{theirs.get('grid')} token grid, this model "
            f"uses {ours.get('grid')}x{ours.get('grid')} (different latent size or patch): the fixed pos_embed "
            "and RoPE tables are recomputed for the new grid (nothing learned is lost), but the weights saw "
            "another resolution in pre-training, so expect to need more fine-tuning steps")
    return state_grid


def _first(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _without(shape: torch.Size, axis: int) -> tuple[int, ...]:
    return tuple(s for i, s in enumerate(shape) if i != axis)


#################################################################################
#                                  Class table                                  #
#################################################################################

def resize_class_table(table: torch.Tensor, num_users: int, keep: dict[int, int] | None = None,
                       noise: float = USER_ROW_NOISE, generator: torch.Generator | None = None) -> torch.Tensor:
    """(K+1, D) pretrained table, null row last -> (num_users+1, D) for this data set.

    - null row (last): the pretrained null row. Classifier-free guidance and unconditional sampling use it,
      and it is the one row whose meaning ("no class") carries over from ImageNet unchanged.
    - user rows: the mean of the pretrained class rows, plus N(0, (noise * table std)^2). The mean is an
      "average class": conditioning the pretrained network on it gives plausible, on-manifold samples from
      step 0, where a random row (or a copy of one ImageNet class) would start every user at an arbitrary
      point. The small noise makes users start apart, so their rows are not interchangeable at step 0.
    - `keep` (new index -> old index): rows carried over as they are (same user in a stage 2 checkpoint).
    """
    table = table.detach().float()
    classes, null = table[:-1], table[-1]
    if len(classes):
        mean, std = classes.mean(0), classes.std(unbiased=False)
    else:   # a table with only the null row: start users there
        mean, std = null, null.std(unbiased=False)
    g = generator or torch.Generator().manual_seed(0)
    rows = mean + noise * std * torch.randn(num_users, table.shape[1], generator=g)
    for new, old in (keep or {}).items():
        rows[new] = classes[old]
    return torch.cat([rows, null[None]])


#################################################################################
#                                  Entry point                                  #
#################################################################################

def initialise_from(module, path: str | Path, finetune: str = "full", log: Callable[[str], None] = print,
                    lora_rank: int = 16, lora_alpha: float | None = None) -> None:
    """Load pretrained weights into a DiTTrainingModule (model and EMA) and set the fine-tune mode.

    The architecture comes from the stage 2 flags (--model, --depth, ...); the file must match it except for
    the class table (rebuilt for this data set's users) and, for another latent size, the fixed grid tables.
    """
    weights = load_pretrained(path)
    model: LightningDiT = module.model
    state = check_compatible(weights, model, path, log)

    users = list(module.info.users or range(model.num_classes))
    # Same user name in a stage 2 checkpoint -> keep its learned row; everyone else starts fresh.
    keep = {i: weights.users.index(u) for i, u in enumerate(users) if u in weights.users} if weights.users else {}
    old_rows = state[CLASS_TABLE].shape[0] - 1
    state[CLASS_TABLE] = resize_class_table(
        state[CLASS_TABLE], len(users), keep,
        generator=torch.Generator().manual_seed(int(getattr(module, "seed", 0)))).to(state[CLASS_TABLE].dtype)

    model.load_state_dict(state, strict=True)
    # The EMA must start at the loaded weights: from random init it would take ~1/(1-decay) steps to forget.
    module.ema.load_state_dict(model.state_dict())
    if finetune == "lora":
        trainable, total = apply_lora(module, lora_rank, lora_alpha)
    else:
        trainable, total = apply_finetune(model, finetune)

    log(f"initialised from {path} ({weights.picked} weights, {len(state)} tensors): class table "
        f"{old_rows}+1 -> {len(users)}+1 rows (null row kept, {len(keep)} user row(s) carried over, the rest "
        "from the mean class), every other weight loaded; EMA reset to the loaded weights")
    scale = getattr(module, "backbone_lr_scale", 1.0)
    if finetune == "lora":
        log(f"--finetune lora (rank {lora_rank}): training {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
            "(adapters on attention/MLP, adaLN, t/y/x embedders, final layer); base projections frozen")
    elif finetune == "partial":
        log(f"--finetune partial: training {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
            "(adaLN, t/y/x embedders, final layer); attention/MLP of the blocks frozen")
    elif scale != 1.0:
        log(f"--finetune full with --backbone_lr_scale {scale:g}: the blocks learn at {scale:g}x the lr")
