"""What the hardware really runs: native bf16 (not emulated), used by stage 2's precision and stage 3's autocast."""
import torch


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
