"""Devices from the command line and what the hardware really runs.

resolve_device checks a --device name once, with a message instead of a CUDA traceback; bf16_supported says
where bf16 is native (not emulated), for stage 2's precision and stage 3's autocast; check_cuda_usable says why a
GPU run cannot use CUDA here instead of letting it run on the CPU.
"""
import os
import re
import shutil
import subprocess

import torch

from common.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; a CUDA device on a machine without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PipelineError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
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
