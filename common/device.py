"""Devices and precisions from the command line, and what the hardware really runs: the one vocabulary of
every command.

Devices: device_word (the flags' type: auto, cpu, cuda or cuda:N; "gpu" is cuda), add_device_flag (the --device
of every command that takes one) and resolve_device (a word to a torch.device, with a message instead of a CUDA
traceback). Precisions: precision_word (32-true, 16-mixed, bf16-mixed and their aliases), add_precision_flag,
resolve_precision (the one asked for, or the nearest this device runs natively) and inference_autocast (a frozen
model's forward passes in a precision, in inference_dtype). bf16_supported says where bf16 is native (not emulated);
check_cuda_usable says why a GPU run cannot use CUDA here instead of letting it run on the CPU.
"""
import argparse
import os
import re
import shutil
import subprocess
import warnings
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch

from common.errors import PipelineError
from common.flag_groups import FlagGroup

DEVICE_WORDS = "auto (CUDA when present), cpu, cuda or cuda:N"
# --precision values that train correctly, and the aliases Lightning also takes for them (fp32: the tokenizer's).
PRECISIONS = {"32-true": ("32", "fp32"), "16-mixed": ("16",), "bf16-mixed": ("bf16",)}
HALF_WEIGHTS = ("bf16-true", "16-true", "transformer-engine", "transformer-engine-float16")


#################################################################################
#                                   Devices                                     #
#################################################################################

def device_word(text: str) -> str:
    """The type of every device flag (--device, stage 2's --accelerator): auto, cpu, cuda or cuda:N, with gpu
    (Lightning's word) read as cuda; argparse.ArgumentTypeError otherwise."""
    word = "cuda" if text == "gpu" else text
    if word in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", word):
        return word
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use {DEVICE_WORDS}")


def add_device_flag(group: FlagGroup) -> None:
    """--device, one device word (device_word), auto by default: the flag of every command that runs on one
    device, or one per process (common/flag_groups.py holds the other flags several commands share)."""
    group.add_argument("--device", type=device_word, default="auto", help=DEVICE_WORDS)


def device_type(word: str) -> str:
    """'cuda' or 'cpu': where a device word runs here (auto: CUDA when usable). No availability check for cuda."""
    if word == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device_word(word)).type


def resolve_device(name: str) -> torch.device:
    """A device word -> torch.device ('auto': cuda when present, else cpu); CUDA on a machine without it, or a
    word outside the vocabulary, is a user error."""
    try:
        name = device_word(name)
    except argparse.ArgumentTypeError as err:
        raise PipelineError(f"--device {err}") from None
    if name == "auto":
        return torch.device(device_type(name))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name} asked for CUDA but none is available here: {cuda_unusable_reason()}. "
                            "Or use --device cpu or auto")
    return device


def bf16_supported(device: str | torch.device) -> bool:
    """True where bf16 matrix multiplies run natively (and so faster than fp32).

    CUDA: compute capability 8.0 or higher (Ampere, Hopper, ...). torch.cuda.is_bf16_supported() is True on a
    T4 (7.5) too, through emulation that is slower than fp16. CPU: AVX512-BF16 or AMX (e.g. Sapphire Rapids,
    Zen 4); elsewhere bf16 autocast runs, but slower than fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        return any(getattr(cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning trains on CUDA with this --accelerator (auto: when CUDA is usable)."""
    return accelerator != "cpu" and torch.cuda.is_available()


#################################################################################
#                                  Precision                                    #
#################################################################################

def precision_word(text: str) -> str:
    """The type of every --precision flag: a name of PRECISIONS (an alias becomes its name);
    argparse.ArgumentTypeError otherwise.

    The "-true" half precisions cast the weights, the EMA and the latents to half: the EMA's step of
    (1 - ema_decay) = 5e-4 of the gap is below bf16's resolution (2^-8 of a value), so the EMA (validation,
    best.ckpt, stage 3) would never move. 64-bit gains nothing over 32-true here and doubles the memory.
    """
    for name, aliases in PRECISIONS.items():
        if text == name or text in aliases:
            return name
    choices = "choose 32-true, 16-mixed (fp16 with loss scaling, e.g. a T4) or bf16-mixed (aliases 32, 16, bf16)"
    if text in HALF_WEIGHTS:
        raise argparse.ArgumentTypeError(
            f"{text} is not supported: it casts the weights, the EMA and the latents to half precision, where the "
            f"EMA's small steps (5e-4 of the gap at --ema_decay 0.9995) round to nothing, so the EMA used for "
            f"validation and sampling would freeze; {choices}")
    if text in ("64", "64-true"):
        raise argparse.ArgumentTypeError(f"{text} is not supported (float64 doubles memory and time for no gain "
                                         f"in training); {choices}")
    raise argparse.ArgumentTypeError(f"{text!r} is not a precision; {choices}")


def add_precision_flag(group: FlagGroup, default: str, help: str) -> None:
    """--precision, one name of PRECISIONS (precision_word; aliases 32, 16, bf16): the flag of the stages, each
    with its own default and with `help` saying what it runs in that precision (the tokenizer, which refuses
    16-mixed, has its own)."""
    group.add_argument("--precision", default=default, type=precision_word, metavar="{" + ",".join(PRECISIONS) + "}",
                       help=help)


def resolve_precision(precision: str, device: str | torch.device, warn: bool = True,
                      loss_scaling: bool = True) -> str:
    """The precision asked for (a name of PRECISIONS), or the nearest one `device` (a device word or
    torch.device) runs natively, with a warning unless warn is False.

    bf16-mixed needs native bf16 (bf16_supported): a T4 gets 16-mixed with loss scaling, a CPU without
    AVX512-BF16/AMX gets 32-true. fp16 on a CPU is slow and needs loss scaling for nothing: a CPU asked for
    16-mixed gets bf16-mixed where it has bf16, else 32-true. A loop without loss scaling (the tokenizer's)
    never gets 16-mixed: 32-true instead.
    """
    kind = device.type if isinstance(device, torch.device) else device_type(device)
    where = "GPU" if kind == "cuda" else "CPU"
    instead = precision
    if precision == "bf16-mixed" and not bf16_supported(kind):
        instead = "16-mixed" if kind == "cuda" and loss_scaling else "32-true"
        why = f"this {where} has no native bf16 ({'e.g. a T4' if kind == 'cuda' else 'no AVX512-BF16 or AMX'})"
    elif precision == "16-mixed" and kind == "cpu":
        instead = "bf16-mixed" if bf16_supported("cpu") else "32-true"
        why = "16-mixed is for GPUs"
    if instead != precision and warn:
        warnings.warn(f"precision {precision}: {why}; training in {instead} instead")
    return instead


def inference_autocast(precision: str, device: str | torch.device) -> Callable[[], ContextManager]:
    """A factory of the context that runs a frozen model's forward passes (the tokenizer's encoding and
    reconstructions) in `precision` (a name of PRECISIONS) on `device`: bf16 autocast for the mixed precisions
    where the device runs bf16 natively (bf16_supported), else none (fp32).

    16-mixed also means bf16 where it is native and fp32 elsewhere (a T4): no fp16 for a frozen encoder, whose
    activations nobody checked against fp16's range, and without training there is no loss scale to protect it.
    """
    dtype = inference_dtype(precision, device)
    if dtype is None:
        return nullcontext
    kind = torch.device(device).type
    return lambda: torch.autocast(kind, dtype=dtype)


def inference_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of inference_autocast(precision, device): torch.bfloat16, or None for fp32 (no autocast)."""
    return None if precision == "32-true" or not bf16_supported(device) else torch.bfloat16


def check_cuda_usable(accelerator: str, devices: int, num_nodes: int = 1) -> None:
    """Stage 2's --accelerator gpu/cuda, or --devices/--num_nodes above 1 without --accelerator cpu, needs CUDA:
    without it Lightning would stop with a traceback, or run DDP on CPU processes without a word.
    --accelerator cpu --devices N stays allowed (N CPU processes).

    Raises PipelineError saying why CUDA is not usable and what to install.
    """
    if accelerator == "cpu" or torch.cuda.is_available():
        return
    if accelerator == "auto" and devices * num_nodes <= 1:
        return   # one process: auto means the CPU here
    asked = f"--accelerator {accelerator}" if accelerator != "auto" else f"--devices {devices} --num_nodes {num_nodes}"
    raise PipelineError(f"{asked} asks for GPUs, but CUDA is not usable here: {cuda_unusable_reason()}. "
                        "To train on the CPU anyway, pass --accelerator cpu (with --devices N: N CPU processes).")


def cuda_unusable_reason() -> str:
    """Why torch.cuda.is_available() is False, with what to do: a CPU-only torch build, no NVIDIA driver, a
    driver older than the CUDA torch was built for, or no GPU visible (CUDA_VISIBLE_DEVICES)."""
    built_for = torch.version.cuda
    index = "https://pytorch.org/get-started/locally/ (pip install torch --index-url https://download.pytorch.org/whl/cuXYZ)"
    if built_for is None:
        return (f"this torch {torch.__version__} is a CPU-only build. On a machine with an NVIDIA GPU install a "
                f"CUDA build for the CUDA version that `nvidia-smi` shows, from {index}")
    driver_cuda = driver_cuda_version()
    if driver_cuda is None:
        return (f"no NVIDIA driver answers (`nvidia-smi` is missing or fails); this torch {torch.__version__} "
                f"is built for CUDA {built_for}. Install the NVIDIA driver, or use a machine with a GPU")
    if _version_tuple(driver_cuda) < _version_tuple(built_for):
        return (f"this torch {torch.__version__} is built for CUDA {built_for}, newer than the CUDA {driver_cuda} "
                f"that the NVIDIA driver supports. Install a torch build for CUDA {driver_cuda} or older from "
                f"{index}, or update the driver")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU; unset it or name the GPUs to use"
    return (f"the driver supports CUDA {driver_cuda} and torch is built for CUDA {built_for}, but torch finds no "
            "usable GPU (`nvidia-smi` lists the GPUs; a GPU in use by another container or in a bad state?)")


def driver_cuda_version() -> str | None:
    """The highest CUDA version the NVIDIA driver supports ('12.4'), from nvidia-smi's header; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return found.group(1) if found else None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])
