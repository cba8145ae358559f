"""Stage 3 over several processes, as DiT's sample_ddp.py: each process samples a share of the (user, sample)
jobs, and every image is the same, byte for byte, as a one-process run's.

Two ways in. Plain `--devices N` on one machine: spawn_ranks starts N processes (torch.multiprocessing, one per
GPU on cuda:0..N-1, or N CPU processes); the process the user started waits for them and reports. Under a
launcher (torchrun, srun), every rank runs already and launched_ranks joins it to the others. Both join the
process group as stage 2 does, with stage 2's helpers (training.launch: gloo on the CPU, NCCL on GPUs,
COLLECTIVE_TIMEOUT). Those import Lightning, so they are imported inside the functions of several processes only:
a one-process stage 3 loads neither Lightning nor training/ (tests/test_cli.py), and starts seconds sooner.

The share (Ranks.share): the one-process run's batches (batch_size jobs each, in order) dealt out in turn, batch b
to rank b mod N. Each job has its own noise (models.sampling.job_noise) and each batch holds the same jobs as on
one process, so each image is computed exactly as there (on the CPU with the same thread count: spawn_ranks).

Failures: an error on one rank inside Ranks.all_or_none reaches every rank at the block's end (one all-reduce),
so all stop together: the failed rank with its own message, the others naming it (RankFailedElsewhere). A
process that dies outright (killed, out of memory) is seen at once by spawn_ranks, which stops the others still
running STOP_GRACE_S later; under a launcher, torchrun stops them, or their next collective fails (at once on gloo,
after COLLECTIVE_TIMEOUT on NCCL).
"""
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch
import torch.multiprocessing

from common.device import resolve_device
from common.errors import PipelineError

Job = TypeVar("Job")
# When a rank dies, the others first get this long to see it themselves and stop cleanly (on gloo their next
# collective fails at once); only then does torch SIGTERM them. A SIGTERM that lands while rank 0 is already
# removing its staging folder would cut that short and leave the folder behind (seen once in CI).
STOP_GRACE_S = 10.0
# Every launcher whose ranks Lightning's cluster environments recognise (torchrun, SLURM, LSF) sets one of these:
# without them no launcher started this process, and training.launch (Lightning) need not be imported to ask.
LAUNCHER_VARIABLES = ("LOCAL_RANK", "SLURM_NTASKS", "LSB_JOBID")


class RankFailedElsewhere(PipelineError):
    """This rank stops because another rank of the same run failed (that rank's message says why)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a stage 3 run: its global rank, the number of processes, and the device it samples
    on (collectives use it too). Ranks(device=...) is a run of one process: no process group, no collective."""
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_zero(self) -> bool:
        """Rank 0 does the once-per-run work: the lock, the staging folder, the grid, the log."""
        return self.rank == 0

    def share(self, jobs: list[Job], batch_size: int) -> list[Job]:
        """The jobs this rank samples: batches rank, rank + world, ... of the one-process run (`batch_size` jobs
        each, in order), one after another. Cut by batch_size again they are those same batches, since only the
        run's last batch can be short."""
        starts = range(0, len(jobs), batch_size)[self.rank::self.world]
        return [job for start in starts for job in jobs[start:start + batch_size]]

    def gather(self, value: int) -> list[int]:
        """Every rank's `value` (an int), in rank order, on every rank: a collective, so every rank must call it.
        Raises PipelineError when another process of the run is gone (its connection lost)."""
        if self.world == 1:
            return [value]
        from training.launch import is_peer_lost   # several processes: Lightning is loaded already
        row = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        row[self.rank] = value
        try:
            torch.distributed.all_reduce(row)   # a one-hot row per rank: the sum is every rank's value
        except Exception as err:
            if not is_peer_lost(err):
                raise
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise PipelineError(f"another process of this {self.world}-process stage 3 run stopped (this one lost "
                                f"its connection to it: {first_line}); its own output says why (killed, out of "
                                "memory, a lost GPU). Nothing was written: fix that and rerun.") from None
        return row.tolist()

    @contextmanager
    def all_or_none(self) -> Iterator[None]:
        """Run the block on every rank; when it raises on any rank, it raises on every rank at its end: the
        failed rank's own exception there, RankFailedElsewhere (naming the first failed rank) on the others."""
        failure: Exception | None = None
        try:
            yield
        except Exception as err:
            failure = err
        failed = self.gather(int(failure is not None))
        if failure is not None:
            raise failure
        if any(failed):
            raise RankFailedElsewhere(f"stage 3's process {failed.index(1)} of {self.world} failed (its message "
                                      "says why); this process stopped with it and nothing was written")


def uses_cuda(device_word: str, gpus_needed: int) -> bool:
    """Whether the ranks of a run of several processes sample on GPUs (each on cuda:<local rank>) for --device
    `device_word`, with `gpus_needed` GPUs needed on this machine. PipelineError for a device with an index,
    CUDA asked for where there is none, or fewer GPUs than needed."""
    device = resolve_device(device_word)
    if device.index is not None:
        raise PipelineError(f"--device {device_word} names one GPU, but several processes sample (--devices, or a "
                            "launcher) and each takes its own, cuda:<local rank>: pass --device cuda (or auto)")
    if device.type == "cuda" and torch.cuda.device_count() < gpus_needed:
        raise PipelineError(f"{gpus_needed} processes need {gpus_needed} GPUs, and this machine has "
                            f"{torch.cuda.device_count()}: pass --devices {torch.cuda.device_count()}")
    return device.type == "cuda"


#################################################################################
#                 Under a launcher: every rank runs this already                #
#################################################################################

def launched_ranks(device_word: str, devices: int) -> Ranks | None:
    """This process's Ranks, joined to the others, when a launcher (torchrun, srun, LSF) started several; None
    otherwise. `devices`: --devices, the processes per machine, which must divide the launcher's count.
    Raises PipelineError for a --devices or --device that does not fit the launcher."""
    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        return None
    # a launcher's variables are set: only now pay for Lightning's import (~6 s), which training.launch needs
    from training.launch import cluster_environment, join_process_group, started_by_launcher
    env = cluster_environment()
    if not (started_by_launcher(env) and env.world_size() > 1):
        return None
    world = env.world_size()
    if world % devices:
        raise PipelineError(f"the launcher started {world} processes, which --devices {devices} (processes per "
                            "machine) does not divide: every process it starts samples a share, so leave --devices "
                            "out or pass the launcher's processes per machine")
    use_cuda = uses_cuda(device_word, env.local_rank() + 1)
    return Ranks(env.global_rank(), world, join_process_group(env, use_cuda))


#################################################################################
#                  Plain --devices N: the processes stage 3 starts              #
#################################################################################

def spawn_ranks(entry: Callable[[Ranks], object], devices: int, use_cuda: bool) -> None:
    """Run entry(Ranks) in `devices` new processes of this machine, rank r on cuda:r (use_cuda) or on the CPU,
    and wait for them all. `entry` must pickle (a module-level function, or a functools.partial of one).

    Each rank keeps this process's intra-op thread count, even on the CPU where N processes then share the
    cores: a CPU matmul's sums run in an order that depends on its thread count, so fewer threads per process
    would change the images in their last bits (seen on the tiny test model).

    Raises PipelineError: the message of the first rank that failed with one (a rank that only stopped with it,
    RankFailedElsewhere, comes after), or one naming a process that died (killed, out of memory). Another
    exception in a rank (a bug) comes back as torch's ProcessRaisedException with that rank's traceback.
    """
    # several processes only: a one-process stage 3 never imports Lightning (~6 s; tests/test_cli.py)
    from lightning_fabric.plugins.environments import LightningEnvironment
    port = LightningEnvironment().main_port   # a free port (or MASTER_PORT), the same for every rank
    errors = torch.multiprocessing.get_context("spawn").SimpleQueue()
    try:
        processes = torch.multiprocessing.start_processes(_run_rank, args=(devices, port, use_cuda,
                                                                           torch.get_num_threads(), entry, errors),
                                                          nprocs=devices, start_method="spawn", join=False)
        while not processes.join(grace_period=STOP_GRACE_S):   # False until every process has ended
            pass
    except torch.multiprocessing.ProcessExitedException as err:
        how = f"signal {err.signal_name}" if err.signal_name else f"exit code {err.exit_code}"
        raise PipelineError(f"stage 3's process {err.error_index} of {devices} died ({how}; SIGKILL is often the "
                            "system's out-of-memory killer) and the others were stopped; nothing was written. Use "
                            "less memory (a smaller --batch_size, fewer --devices) and rerun.") from None
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    if reported:
        raise PipelineError(min(reported)[2])


def _run_rank(rank: int, world: int, port: int, use_cuda: bool, threads: int, entry: Callable[[Ranks], object],
              errors) -> None:
    """One spawned rank: join the process group, run entry; a PipelineError goes to `errors` as
    (stopped only because another rank failed, rank, message), and the process ends normally (all ranks stop
    together through Ranks.all_or_none, so the spawner has nobody to stop)."""
    # a spawned rank (a fresh process): Lightning is imported here, never by a one-process stage 3
    from lightning_fabric.plugins.environments import LightningEnvironment
    from training.launch import join_process_group
    if getattr(sys.stdout, "line_buffering", True) is False and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)   # rank 0's log lines as they happen (Kaggle, a pipe)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    env = LightningEnvironment()
    env.set_global_rank(rank)
    env.set_world_size(world)
    torch.set_num_threads(threads)   # the spawner's (see spawn_ranks)
    # When a rank dies, torch stops the others with SIGTERM: as an exception, rank 0 still releases the lock and
    # removes the staging folder on its way out.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        entry(Ranks(rank, world, join_process_group(env, use_cuda)))
    except PipelineError as err:
        errors.put((isinstance(err, RankFailedElsewhere), rank, str(err)))
    finally:
        # The rank's work and clean-up are done: a SIGTERM from now on (the spawner stopping the others while this
        # one exits) just ends it, instead of raising inside an atexit finaliser (a traceback on stderr).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)   # not an Exception: no rank waits in Ranks.all_or_none for a rank that left
