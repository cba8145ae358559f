"""Devices from the command line and what the hardware really runs.

resolve_device checks a --device name once, with a message instead of a CUDA traceback; bf16_supported says
where bf16 is native (not emulated), for stage 2's precision and stage 3's autocast.
"""
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
        raise PipelineError(f"--device {name} asked for CUDA but none is available here; use --device cpu or auto")
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
