"""Shared benchmark helpers: timing with medians, device/peak-FLOPs facts, tables, JSON, the reference loader."""
import json
import platform
import resource
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.device import resolve_device  # noqa: E402  (after the path: benchmarks run as scripts)


#################################################################################
#                                   Timing                                      #
#################################################################################

def setup_device(name: str, threads: int | None = None) -> torch.device:
    """The device to time on, with the settings training uses there (TF32, cuDNN autotuning, threads)."""
    device = resolve_device(name)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device,
               cpu_times: list[float] | None = None) -> list[float]:
    """Wall seconds per call of fn, one sync after each call (so a step is charged its own GPU work).

    cpu_times, if given, receives the process CPU seconds per call: on a shared CPU with one torch
    thread that is the work done, unlike wall time, which also counts waiting for other jobs.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu_start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (monotonic)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


#################################################################################
#                               Device facts                                    #
#################################################################################

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched by substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("A10G", 125.0), ("A10", 125.0), ("L40S", 362.0), ("L4", 121.0), ("T4", 65.0),
    ("V100", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak TFLOP/s, where the number came from): the table, else a measured big matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops, f"table ({key})"
    return measure_matmul_tflops(device, dtype), "measured matmul"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Best-of-several square matmul throughput: an achievable peak for cards missing from the table."""
    if device.type == "cpu":
        dtype, n = torch.float32, n or 1024
    n = n or 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_steps(lambda: a @ b, steps=5, warmup=2, device=device)
    return 2 * n**3 / min(times) / 1e12


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


#################################################################################
#                               Tables and JSON                                 #
#################################################################################

def print_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    """A plain fixed-width table; floats get 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


#################################################################################
#                         Reference LightningDiT loader                         #
#################################################################################

def load_reference_lightningdit(reference_dir: str | None):
    """The reference's LightningDiT class, imported at run time from a directory holding its files
    (lightningdit.py, swiglu_ffn.py, pos_embed.py, rmsnorm.py), or None (with a message) if absent.

    Its files import each other as `models.*`, which is also our package name: they are imported
    under a temporary `models` package and our modules are put back afterwards. Its @torch.compile
    decorators are made no-ops during the import (the comparison is eager vs eager), and the unused
    fairscale imports of rmsnorm.py are satisfied by empty modules (its RMSNorm never touches them).
    """
    ref = Path(reference_dir) if reference_dir else None
    if ref is None or not (ref / "lightningdit.py").is_file():
        print(f"reference comparison skipped: no lightningdit.py in {reference_dir!r} "
              "(fetch hustvl/LightningDiT and pass --reference_dir)")
        return None
    saved = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    stubs = {}
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel",
                 "fairscale.nn.model_parallel.initialize", "fairscale.nn.model_parallel.layers"):
        if name not in sys.modules:
            stubs[name] = types.ModuleType(name)
    layers = stubs.get("fairscale.nn.model_parallel.layers")
    if layers is not None:
        layers.ColumnParallelLinear = layers.ParallelEmbedding = layers.RowParallelLinear = None
    package = types.ModuleType("models")
    package.__path__ = [str(ref)]
    real_compile = torch.compile
    try:
        for k in saved:
            del sys.modules[k]
        sys.modules.update(stubs)
        sys.modules["models"] = package
        torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
        import importlib
        module = importlib.import_module("models.lightningdit")
        return module.LightningDiT
    except ImportError as err:
        print(f"reference comparison skipped: importing it failed ({err}); it needs timm and einops")
        return None
    finally:
        torch.compile = real_compile
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            sys.modules[f"reference_{k}"] = sys.modules.pop(k)
        for k in stubs:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
