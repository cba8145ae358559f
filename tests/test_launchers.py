"""Stage 2 under the launchers of clusters, on the CPU (gloo): torchrun with two nodes on localhost, two tasks
started the way srun starts them, and --restart under torchrun. Rank-0 file work happens once, on global
rank 0, before any rank decides whether to resume; every rank resumes from the same step. Also: which rank
and GPU a process is under each launcher, and GPU runs refused where CUDA is not usable."""
import os
import re
import socket
import subprocess
import textwrap

import pytest
import torch

import training.launch as launch
import training.train_dit as td
from common.device import check_cuda_usable, cuda_unusable_reason
from common.errors import PipelineError
from helpers import PYTHON, ROOT, stage2_args

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# Rank 0 is slow to remove the previous run: before the fix another rank decided to resume from the
# last.ckpt that rank 0 was about to remove, and the ranks trained from different steps.
SLOW_RANK_ZERO = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import training.resume as resume
    real = resume.remove_previous_run

    def slow_on_rank_zero(*args, **kwargs):
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID")) == "0":
            time.sleep(3)
        return real(*args, **kwargs)

    resume.remove_previous_run = slow_on_rank_zero
    import stage2_train_dit
    stage2_train_dit.main(sys.argv[1:])
""")
TIMEOUT = 240   # s for a whole launch on a loaded 2-core box (a hang before the fix ends here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (pytest may run under one), CPU only."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def run_together(commands: list[list[str]], envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """Start the processes at once (as the nodes of a cluster would), wait for all."""
    procs = [subprocess.Popen(list(map(str, c)), cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c, e in zip(commands, envs)]
    results = []
    for command, proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
            err += "\n(killed: timed out, the ranks hung)"
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def assert_all_ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])


def torchrun(script, args, nnodes: int, nproc_per_node: int) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes N --nproc_per_node P --node_rank i --master_addr 127.0.0.1 --master_port ...` once per
    node, all on localhost."""
    port = free_port()
    commands = [[PYTHON, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc_per_node", nproc_per_node,
                 "--node_rank", node, "--master_addr", "127.0.0.1", "--master_port", port, script, *args]
                for node in range(nnodes)]
    return run_together(commands, [clean_env()] * nnodes)


def srun(script, args, ntasks: int, nodes: int) -> list[subprocess.CompletedProcess]:
    """The processes srun starts for `sbatch --nodes N --ntasks-per-node T`: SLURM_* variables, no LOCAL_RANK,
    no RANK; MASTER_PORT as an sbatch script exports it (else Lightning derives it from the job id)."""
    per_node = ntasks // nodes
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "stage2", "SLURM_NTASKS": str(ntasks),
             "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NNODES": str(nodes), "SLURM_NODELIST": "localhost",
             "MASTER_PORT": str(free_port())}
    envs = [clean_env(**slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                      SLURM_NODEID=str(rank // per_node)) for rank in range(ntasks)]
    return run_together([[PYTHON, script, *args]] * ntasks, envs)


def last_step(out) -> int:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]


def checkpoint_files(out) -> int:
    return sum((out / "checkpoints" / name).is_file() for name in ("best.ckpt", "last.ckpt"))


def assert_resumed_together(results: list[subprocess.CompletedProcess], out) -> None:
    """Every rank resumed from step 4 to step 6: had one started elsewhere, the ranks' collectives would not have
    matched and the job would have failed. Global rank 0 (the first) says so, the others print no second account."""
    assert re.search(r"resuming from .*last\.ckpt at step 4 ", results[0].stdout), results[0].stdout[-2000:]
    assert all("resuming" not in other.stdout for other in results[1:]), [r.stdout[-2000:] for r in results[1:]]
    assert last_step(out) == 6


def first_run(latent_dir, out, steps: int) -> None:
    """A finished single-process run to resume from (in this process: no interpreter to start)."""
    from training.cli import training_options
    td.train(training_options(list(map(str, stage2_args(latent_dir, out, *FLAGS, "--max_steps", steps)))),
             log=lambda m: None)
    assert last_step(out) == steps


FLAGS = ("--checkpoint_every_n_steps", 2, "--val_every_n_epochs", 1000, "--precision", "32-true")


#################################################################################
#                         Launched runs (CPU, gloo)                             #
#################################################################################

@pytest.mark.slow
def test_torchrun_two_nodes_resume_on_every_rank(tmp_path, latent_dir):
    out = tmp_path / "run"
    first_run(latent_dir, out, 4)
    results = torchrun("stage2_train_dit.py",
                       stage2_args(latent_dir, out, *FLAGS, "--max_steps", 6, "--devices", 1, "--num_nodes", 2),
                       nnodes=2, nproc_per_node=1)
    assert_all_ok(results)
    assert_resumed_together(results, out)


@pytest.mark.slow   # trains stage 2 in a process (seconds)
def test_a_dead_ddp_process_ends_the_job_with_what_happened(tmp_path, latent_dir):
    """One of two processes killed mid-training (a lost GPU, the OOM killer): rank 0's collective fails at once;
    it says so, where to look and that a rerun resumes (exit 2), instead of gloo's raw 'Connection reset'."""
    import queue
    import signal
    import threading
    import psutil
    command = [PYTHON, "stage2_train_dit.py", *map(str, stage2_args(latent_dir, tmp_path / "out", *FLAGS,
                                                                     "--max_steps", 10 ** 6, "--max_epochs", 10 ** 6,
                                                                     "--devices", 2))]
    job = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in job.stderr] + [lines.put(None)], daemon=True).start()
    try:
        seen = []
        while not (seen and seen[-1].startswith("stage 2: step")):   # training has begun on both ranks
            seen.append(lines.get(timeout=TIMEOUT))
            assert seen[-1] is not None, "".join(seen[:-1])[-3000:]
        ranks = [p for p in psutil.Process(job.pid).children() if "stage2_train_dit.py" in " ".join(p.cmdline())]
        assert len(ranks) == 1, ranks
        os.kill(ranks[0].pid, signal.SIGKILL)
        job.wait(timeout=TIMEOUT)
    finally:
        job.kill()
    err = "".join(iter(lambda: lines.get(timeout=10), None))
    assert job.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert re.search(r"error: another process of this 2-process DDP job stopped .*Its own log says why.*the run "
                     r"resumes from .*last\.ckpt", err, re.S), err[-3000:]


def test_a_lost_peer_in_a_collective_is_a_user_error(tmp_path, latent_dir, monkeypatch, capsys):
    """The same mapping without starting processes: each form a lost peer takes (gloo's TCP errors, NCCL's
    watchdog timeout) raised from fit in a 2-process run."""
    import pytorch_lightning as pl
    from helpers import run_main
    for text in ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer",
                 "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)"):
        def lost(*args, **kwargs):
            raise RuntimeError(text)
        monkeypatch.setattr(pl.Trainer, "fit", lost)
        proc = run_main(capsys, "stage2_train_dit.py", *stage2_args(latent_dir, tmp_path / "out", *FLAGS,
                                                                     "--max_steps", 2, "--devices", 2))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert re.search(r"another process of this 2-process DDP job stopped .*resumes from", proc.stderr, re.S)
    monkeypatch.setattr(pl.Trainer, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug of ours")))
    with pytest.raises(RuntimeError, match="a bug of ours"):   # other errors are not disguised as a lost peer
        run_main(capsys, "stage2_train_dit.py", *stage2_args(latent_dir, tmp_path / "out2", *FLAGS, "--max_steps", 2,
                                                              "--devices", 2))


def sleeper(seconds: float, code: int = 0) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", f"import sys, time; time.sleep({seconds}); sys.exit({code})"])


def test_a_dead_worker_is_reported_for_rank_zero_after_the_grace():
    """The race of Lightning's observer, made certain: a worker dies while rank 0 is busy outside any collective
    (the main thread here never notices). After the grace the watch kills the other workers and reports the
    loss with the message rank 0 would give, instead of a SIGKILL of the whole job."""
    dead, alive = sleeper(0, code=-9 % 256), sleeper(60)
    reports = []
    try:
        thread = launch.watch_workers([dead, alive], 3, "out/checkpoints/last.ckpt", grace_s=0.5, poll_s=0.05,
                                      on_loss=reports.append)
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert alive.wait(timeout=10) != 0   # killed, not left running without its peers
    finally:
        alive.kill()
    assert len(reports) == 1
    assert re.search(r"another process of this 3-process DDP job stopped .*local rank 1 exited with code 247.*"
                     r"resumes from out/checkpoints/last\.ckpt", reports[0], re.S), reports[0]


def test_workers_that_finish_end_the_watch_quietly():
    reports = []
    workers = [sleeper(0), sleeper(0.3)]
    thread = launch.watch_workers(workers, 3, "last.ckpt", grace_s=0, poll_s=0.05, on_loss=reports.append)
    thread.join(timeout=30)
    assert not thread.is_alive() and reports == []


def test_plain_devices_runs_launch_with_the_watch_and_launchers_keep_theirs(tmp_path, monkeypatch):
    """`--devices 2` alone: Lightning starts the ranks, through WatchedLauncher. Under torchrun the launcher
    started them and Lightning launches nothing."""
    from training.cli import training_options
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    args = training_options(["--latent_dir", tmp_path, "--output_dir", tmp_path / "out", "--accelerator", "cpu",
                             "--devices", 2])
    trainer = td.build_trainer(args, "32-true", tmp_path / "out", [])
    assert type(trainer.strategy.launcher) is launch.WatchedLauncher
    assert trainer.strategy.launcher.last_checkpoint == str(tmp_path / "out" / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("LOCAL_RANK", "0")   # what torchrun sets, among others
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    trainer = td.build_trainer(args, "32-true", tmp_path / "out", [])
    assert trainer.strategy.launcher.cluster_environment.creates_processes_externally   # so launch() starts none


@pytest.mark.slow
def test_restart_under_torchrun_removes_the_run_once_and_no_rank_resumes(tmp_path, latent_dir):
    """Before the fix, rank 1 (LOCAL_RANK 1) resumed from the last.ckpt that rank 0 was removing: exit 1 or a
    hang, depending on timing. Rank 0 is made slow here, so the unfixed code failed on every restart (one restart
    shows it; the test once restarted twice in a row, which cost a launch and showed nothing more)."""
    out = tmp_path / "run"
    first_run(latent_dir, out, 4)
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_RANK_ZERO.format(root=str(ROOT)))
    old_files = checkpoint_files(out)
    (result,) = torchrun(driver, stage2_args(latent_dir, out, *FLAGS, "--max_steps", 2, "--devices", 2, "--restart"),
                         nnodes=1, nproc_per_node=2)
    assert_all_ok([result])
    assert result.stdout.count("--restart: removed the previous run's") == old_files > 0
    assert "resuming" not in result.stdout
    assert last_step(out) == 2


@pytest.mark.slow
def test_srun_tasks_resume_and_restart_on_global_rank_zero(tmp_path, latent_dir):
    """Two tasks on two 'nodes' as srun starts them (SLURM_LOCALID 0 on both, no LOCAL_RANK). Before the fix both
    acted as rank 0: the slower rank 0 found the files already removed by rank 1, which announced it."""
    out = tmp_path / "run"
    first_run(latent_dir, out, 4)
    args = stage2_args(latent_dir, out, *FLAGS, "--devices", 1, "--num_nodes", 2)
    results = srun("stage2_train_dit.py", [*args, "--max_steps", 6], ntasks=2, nodes=2)
    assert_all_ok(results)
    assert_resumed_together(results, out)
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_RANK_ZERO.format(root=str(ROOT)))
    old_files = checkpoint_files(out)
    rank0, rank1 = srun(driver, [*args, "--max_steps", 2, "--restart"], ntasks=2, nodes=2)
    assert_all_ok([rank0, rank1])
    assert rank0.stdout.count("--restart: removed the previous run's") == old_files > 0
    assert "removed" not in rank1.stdout
    assert last_step(out) == 2


def test_srun_with_other_task_count_than_the_flags_says_which(monkeypatch):
    for key, value in {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_JOB_NAME": "stage2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(PipelineError, match=r"SLURMEnvironment job cannot run stage 2.*--ntasks-per-node"):
        launch.check_world_size(2, 2)   # Lightning's own refusal, as a message
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    with pytest.raises(PipelineError, match=r"srun started 4 processes, but --devices 2 x --num_nodes 1 = 2"):
        launch.check_world_size(2, 1)
    launch.check_world_size(2, 2)


#################################################################################
#                    Ranks and devices under each launcher                      #
#################################################################################

@pytest.mark.parametrize("env, devices, rank, local", [
    ({}, 2, 0, 0),                                                           # python stage2 ... --devices 2
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "4"}, 2, 1, 1),     # a rank Lightning started
    ({"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, 2, 2, 0),                # node 1 started by hand
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "2",
      "LOCAL_WORLD_SIZE": "1"}, 1, 1, 0),                                    # torchrun, node 1 of 2
    ({"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
      "SLURM_NODEID": "1", "SLURM_JOB_NAME": "stage2"}, 2, 3, 1),            # srun, task 3 of 2 x 2
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
      "SLURM_JOB_NAME": "interactive", "LOCAL_RANK": "1"}, 2, 1, 1),         # salloc shell: Lightning launches
])
def test_global_and_local_rank_under_each_launcher(monkeypatch, env, devices, rank, local):
    for key in [*LAUNCHER_VARS, *[k for k in os.environ if k.startswith("SLURM_")]]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch.global_rank(devices) == rank
    assert launch.local_rank() == local


def test_memory_check_probes_this_ranks_gpu_under_srun(monkeypatch):
    """srun sets SLURM_LOCALID, not LOCAL_RANK: before the fix every task probed cuda:0."""
    from training.cli import training_options
    from training.memory_check import check_cuda_memory
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "1",
                       "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "stage2"}.items():
        monkeypatch.setenv(key, value)
    probed = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: probed.append(device) or (80e9, 80e9))
    # The estimate resolves --precision as stage 2 does, asking the GPU for native bf16.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    args = training_options(["--latent_dir", "unused", "--output_dir", "unused", "--model", "LightningDiT-S/2",
                             "--devices", "2"])
    check_cuda_memory(args, log=lambda m: None)
    assert probed == [1]


#################################################################################
#                 GPUs asked for where CUDA is not usable                       #
#################################################################################

def no_cuda(monkeypatch, built_for: str | None, nvidia_smi: str | None, visible: str | None = "0") -> None:
    import common.device as cd
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", built_for)
    monkeypatch.setattr(cd.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if nvidia_smi else None)
    monkeypatch.setattr(cd.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, nvidia_smi, ""))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


SMI_12_4 = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"


@pytest.mark.parametrize("built_for, smi, visible, expected", [
    ("13.0", SMI_12_4, "0", r"built for CUDA 13.0, newer than the CUDA 12.4 that the NVIDIA driver supports.*"
                            r"torch build for CUDA 12.4 or older.*download.pytorch.org/whl"),
    (None, None, None, r"CPU-only build.*CUDA build"),
    ("12.4", None, None, r"no NVIDIA driver answers"),
    ("12.4", SMI_12_4, "", r"CUDA_VISIBLE_DEVICES='' hides every GPU"),
])
def test_why_cuda_is_not_usable(monkeypatch, built_for, smi, visible, expected):
    no_cuda(monkeypatch, built_for, smi, visible)
    assert re.search(expected, cuda_unusable_reason())


@pytest.mark.parametrize("accelerator, devices, num_nodes", [("gpu", 1, 1), ("cuda", 2, 1), ("auto", 2, 1),
                                                             ("auto", 1, 2)])
def test_gpu_runs_refused_where_cuda_is_not_usable(monkeypatch, capsys, tmp_path, accelerator, devices, num_nodes):
    """Before the fix --devices 2 ran DDP on two CPU processes without a word, and --accelerator gpu ended in
    Lightning's MisconfigurationException traceback."""
    from helpers import assert_user_error, run_main
    no_cuda(monkeypatch, "13.0", SMI_12_4)
    result = run_main(capsys, "stage2_train_dit.py", "--latent_dir", tmp_path / "none", "--output_dir",
                      tmp_path / "out", "--accelerator", accelerator, "--devices", devices, "--num_nodes", num_nodes)
    assert_user_error(result, r"asks for GPUs, but CUDA is not usable here", r"newer than the CUDA 12.4",
                      r"--accelerator cpu")
    assert not (tmp_path / "out").exists()


def test_cpu_runs_stay_allowed_without_cuda(monkeypatch):
    no_cuda(monkeypatch, "13.0", SMI_12_4)
    check_cuda_usable("cpu", 2, 1)     # DDP on CPU processes, asked for explicitly (the tests use it)
    check_cuda_usable("auto", 1, 1)    # one process: auto means the CPU


def test_sbatch_example_passes_stage2_flags_that_match_its_tasks():
    """examples/slurm_stage2.sbatch: its srun line parses as stage 2 flags (its --config included), and
    --devices/--num_nodes come from the job's tasks per node and nodes."""
    import shlex
    from common.config import parse_args
    from training.cli import REQUIRED, build_parser
    text = (ROOT / "examples" / "slurm_stage2.sbatch").read_text()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    command = shlex.split(text[text.index("srun python stage2_train_dit.py"):].replace("\\\n", " "))[3:]
    values = {"$SLURM_NTASKS_PER_NODE": header["ntasks-per-node"], "$SLURM_NNODES": header["nodes"]}
    args = parse_args(build_parser(), [values.get(a, a) for a in command], required=REQUIRED)
    assert (args.devices, args.num_nodes) == (int(header["ntasks-per-node"]), int(header["nodes"]))
