"""The fence around every private name of PyTorch Lightning (and of torch's GradScaler) that stage 2 uses.

Each name is looked up here and nowhere else; a name that a release renamed or removed reads as None (or False),
and its caller falls back to Lightning's public behaviour instead of failing at import:

- `_SubprocessScriptLauncher`, `_set_num_threads_if_needed` and `DDPStrategy._configure_launcher` / `._launcher`:
  training/launch.py's WatchedDDPStrategy swaps Lightning's launcher of a plain `--devices N` run for one that
  watches its workers. Without them the run keeps Lightning's own launcher, with one note (a dead worker then
  ends the job with Lightning's SIGKILL instead of our message).
- `_batches_that_stepped` of the training epoch loop: training/callbacks.py's KeepMetricsHistory sets it so that
  metrics.csv's steps after a resume are those of an uninterrupted run. Without it the steps logged after a resume
  from an epoch end may be one ahead (one note).
- `GradScaler._get_scale_async`: training/divergence.py reads the loss scale as a device tensor without a host
  sync. Without it, the public `get_scale()` (a host-device sync per step on a GPU, nothing lost otherwise).

The same lookups hold on Lightning 2.2.1 (requirements.txt's lowest) and 2.6.6; CI runs both (.ci/run), and
tests/test_lightning_fence.py trains with every name missing.
"""
import importlib
from typing import Any

import torch
from pytorch_lightning.strategies import DDPStrategy


def _lookup(module: str, name: str) -> Any:
    """module.name, or None when the module or the name is gone."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


SubprocessScriptLauncher = _lookup("pytorch_lightning.strategies.launchers.subprocess_script",
                                   "_SubprocessScriptLauncher")
set_num_threads_if_needed = _lookup("lightning_fabric.utilities.distributed", "_set_num_threads_if_needed")
# The hook of DDPStrategy that attaches its launcher (Lightning's accelerator connector calls it): overriding a
# renamed hook would silently do nothing, so DDPStrategy's own definition is looked for, not assumed.
HAS_CONFIGURE_LAUNCHER = callable(vars(DDPStrategy).get("_configure_launcher"))
HAS_SCALE_ASYNC = callable(getattr(torch.amp.GradScaler, "_get_scale_async", None))
# Instance attributes, looked up on the object at hand (their names here, so a test can name a missing one).
STRATEGY_LAUNCHER = "_launcher"                 # Strategy: what the public read-only `launcher` returns
LOGGING_STEP_COUNT = "_batches_that_stepped"    # the fit loop's epoch loop: Lightning's logging step


def missing_launcher_names() -> list[str]:
    """The private names that WatchedDDPStrategy needs and this Lightning lacks ([] when it has them all)."""
    needed = {"_SubprocessScriptLauncher": SubprocessScriptLauncher is not None,
              "_set_num_threads_if_needed": set_num_threads_if_needed is not None,
              "DDPStrategy._configure_launcher": HAS_CONFIGURE_LAUNCHER,
              "_SubprocessScriptLauncher._call_children_scripts":
                  callable(getattr(SubprocessScriptLauncher, "_call_children_scripts", None))}
    return [name for name, present in needed.items() if not present]


def replace_launcher(strategy: Any, launcher: Any) -> bool:
    """Attach `launcher` to the strategy in place of the one its _configure_launcher attached; False, and
    nothing changed, where the private attribute no longer backs the public read-only `launcher`."""
    if getattr(strategy, STRATEGY_LAUNCHER, object()) is not strategy.launcher:
        return False
    setattr(strategy, STRATEGY_LAUNCHER, launcher)
    return True


def set_logging_step(trainer: Any, step: int) -> bool:
    """Set the count of optimizer steps that Lightning logs metrics at; False (nothing set) where this
    Lightning's training epoch loop has no such count."""
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if not isinstance(getattr(epoch_loop, LOGGING_STEP_COUNT, None), int):
        return False
    setattr(epoch_loop, LOGGING_STEP_COUNT, step)
    return True


def loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The GradScaler's current scale as a 0-d float32 tensor: a copy of its device tensor without a host sync
    where torch has `_get_scale_async`, else from the public get_scale() (a sync); before the scaler's first
    step, its initial scale."""
    scale = scaler._get_scale_async() if HAS_SCALE_ASYNC else None
    return scale.clone() if scale is not None else torch.tensor(scaler.get_scale())
