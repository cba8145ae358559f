"""Who this process is in a multi-process run, before the Trainer exists: plain `--devices N` (Lightning starts
the other ranks itself), torchrun, or srun (SLURM), on one node or several.

Lightning's cluster environments read the launcher's variables (torchrun: RANK, LOCAL_RANK, GROUP_RANK; srun:
SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID). LOCAL_RANK alone is not enough: srun does not set it, so every rank
would act as rank 0, and with several nodes each node has a LOCAL_RANK 0.

File work that must happen once (removing the previous run on --restart) goes through rank_zero_first: rank 0
does it before any other rank looks at the folder. Lightning's own launcher starts the other ranks only inside
trainer.fit, so there rank 0 is first by construction; torchrun and srun start every rank at once, so the ranks
join the process group early (Lightning then reuses it) and wait for rank 0's verdict.
"""
import atexit
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
from lightning_fabric.plugins.environments import (ClusterEnvironment, LightningEnvironment, LSFEnvironment,
                                                   SLURMEnvironment, TorchElasticEnvironment)
from pytorch_lightning.strategies import DDPStrategy

from common.errors import PipelineError
from training import lightning_private

# How long a collective waits for a process that stopped answering before the job ends with an error. NCCL's own
# watchdog would wait 30 minutes under Lightning's default (a lost GPU burning half an hour of a Kaggle session);
# 5 minutes is still ~3x the longest wait of a healthy run (rank 0 writing XL/1's 11 GB last.ckpt at ~100 MB/s
# while the other ranks wait at the barrier). Used by the DDPStrategy and by join_process_group.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# How a collective fails when another process of the job is gone: gloo's TCP errors, NCCL's watchdog and aborts.
PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|ECONNRESET|EPIPE|NCCL communicator was aborted"
                       r"|Watchdog caught collective operation timeout|ProcessGroupNCCL.*(timeout|abort)"
                       r"|Socket Timeout|recvBytes|sendBytes|connection closed|Timed out waiting", re.I)


def is_peer_lost(err: BaseException) -> bool:
    """Whether `err`, raised in a multi-process run, says that another process of the job stopped (killed, out
    of memory, a lost GPU or node) rather than that this one failed."""
    dist_errors = tuple(getattr(torch.distributed, name) for name in ("DistBackendError", "DistNetworkError")
                        if hasattr(torch.distributed, name))
    return isinstance(err, dist_errors) or (isinstance(err, RuntimeError) and bool(PEER_LOST.search(str(err))))


def peer_lost_message(err: BaseException | str, world: int, last_checkpoint: str) -> str:
    """What a rank says when another process of its job died (`err`: how this process noticed): the cause is
    in that process's log, and a rerun resumes."""
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return (f"another process of this {world}-process DDP job stopped (this process lost its connection to it: "
            f"{first_line}). Its own log says why (killed, out of memory, a lost GPU or node). Fix that and rerun "
            f"the same command: the run resumes from {last_checkpoint}.")


def cluster_environment() -> ClusterEnvironment:
    """The environment Lightning's Trainer will pick (the same order: torchrun first, it also runs inside SLURM).

    Raises PipelineError for a SLURM job that Lightning refuses (--ntasks without --ntasks-per-node).
    """
    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment):
        if env_type.detect():
            try:
                return env_type()
            except RuntimeError as err:   # SLURMEnvironment refuses a job of --ntasks without --ntasks-per-node
                raise PipelineError(f"this {env_type.__name__} job cannot run stage 2: {err}") from None
    return LightningEnvironment()


def started_by_launcher(env: ClusterEnvironment | None = None) -> bool:
    """True under torchrun, srun or LSF: every rank runs this script from the start."""
    env = env or cluster_environment()
    return not isinstance(env, LightningEnvironment) and env.creates_processes_externally


def global_rank(devices_per_node: int = 1) -> int:
    """This process's rank over all nodes (0: the one that writes files). Under Lightning's own launcher the
    process that the user started has no LOCAL_RANK and is local rank 0 of its NODE_RANK."""
    env = cluster_environment()
    if started_by_launcher(env):
        return env.global_rank()
    return env.node_rank() * devices_per_node + env.local_rank()


def local_rank() -> int:
    """This process's index on its node: the GPU it trains on (cuda:local_rank, as Lightning assigns them)."""
    return cluster_environment().local_rank()


def check_world_size(devices: int, num_nodes: int) -> None:
    """A launcher that started another number of processes than --devices x --num_nodes would hang or fail in
    Lightning with a ValueError; say which flags to set instead.

    Raises PipelineError.
    """
    env = cluster_environment()
    if not started_by_launcher(env):
        return
    world = env.world_size()
    if world != devices * num_nodes:
        launcher = "srun" if isinstance(env, SLURMEnvironment) else "the launcher (torchrun?)"
        raise PipelineError(f"{launcher} started {world} processes, but --devices {devices} x --num_nodes "
                            f"{num_nodes} = {devices * num_nodes}: pass --devices <processes per node> and "
                            "--num_nodes <nodes> as given to the launcher (torchrun --nproc_per_node/--nnodes, "
                            "sbatch --ntasks-per-node/--nodes)")


@contextmanager
def rank_zero_first(devices: int, num_nodes: int, use_cuda: bool) -> Iterator[bool]:
    """`with rank_zero_first(...) as is_rank_zero:` the body's file work (when is_rank_zero) is finished before
    any rank goes past the block. If rank 0's body raises, every rank stops (rank 0 with its own error).

    Under torchrun/srun with several processes this joins the default process group (backend as Lightning would
    choose: nccl on CUDA, else gloo), which Lightning's DDP strategy then uses as it finds it.
    """
    env = cluster_environment()
    is_zero = global_rank(devices) == 0
    if not (started_by_launcher(env) and devices * num_nodes > 1):
        yield is_zero
        return
    device = join_process_group(env, use_cuda)
    failed = torch.zeros((), device=device)
    try:
        yield is_zero
    except BaseException:
        failed.fill_(1)
        raise
    finally:
        # Every rank reaches this point; the others learn whether rank 0's work succeeded.
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item() and not is_zero:
        raise PipelineError("rank 0 stopped before training (its message says why); this rank stops with it")


def join_process_group(env: ClusterEnvironment, use_cuda: bool) -> torch.device:
    """Initialise torch.distributed the way Lightning's DDPStrategy does (MASTER_ADDR/PORT from the
    environment, env:// rendezvous); returns the device for collectives."""
    device = torch.device("cuda", env.local_rank()) if use_cuda else torch.device("cpu")
    if torch.distributed.is_initialized():
        return device
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    torch.distributed.init_process_group(backend, rank=env.global_rank(), world_size=env.world_size(),
                                         timeout=COLLECTIVE_TIMEOUT)
    # Destroyed while the interpreter is still whole: a gloo group left to interpreter shutdown can abort the
    # process ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489, seen in CI on a
    # torchrun stage 3), and PyTorch warns about an NCCL group left undestroyed (Lightning destroys it too).
    atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
    return device


#################################################################################
#               Plain --devices N: rank 0 watches the ranks it started            #
#################################################################################

# After a DDP worker dies, rank 0's next collective fails and rank 0 says what happened (exit 2, the run resumes
# from last.ckpt). Lightning's own watch on the workers it starts SIGKILLs the whole job at its next 5 s poll, often
# before that collective: the user then read "Forcefully terminating all other processes" and exit -9. This watch
# gives rank 0 WORKER_LOSS_GRACE_S to report it itself (a collective on gloo fails at once; one on NCCL only at
# COLLECTIVE_TIMEOUT), then reports it for rank 0 and ends the job with the same message and exit code.
WORKER_LOSS_GRACE_S = 60.0


def watch_workers(workers: list[subprocess.Popen], world: int, last_checkpoint: str,
                  grace_s: float = WORKER_LOSS_GRACE_S, poll_s: float = 1.0,
                  on_loss: Callable[[str], Any] | None = None) -> threading.Thread:
    """Start a daemon thread of rank 0 that polls `workers` (the local ranks 1.. it started) every poll_s
    seconds. When one exits with a non-zero code, it waits grace_s seconds (the process normally ends itself
    first, from its failed collective, taking the thread with it), then kills the other workers and calls
    on_loss(message) (default: print `error: message` to stderr and os._exit(2)). It ends quietly once every
    worker exited 0."""
    def report_and_exit(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(2)   # the main thread may be blocked in a collective that would wait COLLECTIVE_TIMEOUT

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            codes = [w.poll() for w in workers]
            if all(code == 0 for code in codes):
                return
            failed = [(rank, code) for rank, code in enumerate(codes, start=1) if code not in (None, 0)]
            if failed:
                break
        time.sleep(grace_s)
        for w in workers:
            if w.poll() is None:
                w.kill()
        rank, code = failed[0]
        cause = f"local rank {rank} exited with code {code}"
        (on_loss or report_and_exit)(peer_lost_message(cause, world, last_checkpoint))

    thread = threading.Thread(target=watch, name="stage2-worker-watch", daemon=True)
    thread.start()
    return thread


# Lightning's private launcher (training/lightning_private.py); where this Lightning lacks it, WatchedLauncher is
# never built (WatchedDDPStrategy keeps Lightning's own launcher), and `object` only lets this module import.
_LAUNCHER_BASE: type = lightning_private.SubprocessScriptLauncher or object


class WatchedLauncher(_LAUNCHER_BASE):
    """Lightning's launcher for plain `--devices N` (it starts the other ranks as copies of this command), with
    watch_workers in place of Lightning's observer. The body of `launch` is Lightning's, but for that line."""

    def __init__(self, *args: Any, last_checkpoint: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.last_checkpoint = last_checkpoint

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            watch_workers(self.procs, self.num_processes * self.num_nodes, self.last_checkpoint)
        lightning_private.set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


def unwatched_note(missing: list[str]) -> str:
    """The one line a run prints when this Lightning lacks what WatchedLauncher needs."""
    return (f"note: this PyTorch Lightning lacks {', '.join(missing)}: DDP workers run under Lightning's own "
            "launcher, which ends the job with SIGKILL when one dies (rerunning the command still resumes)")


class WatchedDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy, launching plain `--devices N` runs with WatchedLauncher (torchrun, srun and LSF
    start the ranks themselves and keep their own watch). Where this Lightning lacks the private names that needs
    (training/lightning_private.py), it is Lightning's DDPStrategy with its own launcher, and `note` says so once
    (note: a print-like function; pass a no-op on ranks other than 0)."""

    def __init__(self, *args: Any, last_checkpoint: str, note: Callable[[str], Any] = print, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.last_checkpoint, self.note = last_checkpoint, note
        missing = lightning_private.missing_launcher_names()
        if missing:
            note(unwatched_note(missing))

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if lightning_private.missing_launcher_names() or isinstance(self.launcher, WatchedLauncher):
            return
        # isinstance, not type(...) is: a subclass of Lightning's launcher that a release might attach is watched too
        if isinstance(self.launcher, lightning_private.SubprocessScriptLauncher):
            watched = WatchedLauncher(self.cluster_environment, self.num_processes, self.num_nodes,
                                      last_checkpoint=self.last_checkpoint)
            if not lightning_private.replace_launcher(self, watched):
                self.note(unwatched_note([f"DDPStrategy.{lightning_private.STRATEGY_LAUNCHER}"]))
