"""Device names from the command line, checked once with a message instead of a CUDA traceback."""
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
