"""Stage 3 on several processes (generation/ranks.py): `--devices 2` and torchrun on 2 CPU processes write the same
files, byte for byte, as one process; each process evaluates the model only for its share of the batches; a rank
that fails ends the run with its message and exit 2, leaving the previous run's files as they were."""
import json
import os
import subprocess
import textwrap
from pathlib import Path

from unittest import mock

import pytest

from generation.cli import GenerateOptions
from generation.generate import generate
from generation.ranks import Ranks
from helpers import PYTHON, ROOT, assert_user_error, make_tokenizer, write_generator_checkpoint
from models.lightningdit import LightningDiT
from pipeline.orchestrate import config_to_flags

pytestmark = pytest.mark.usefixtures("one_thread_per_module")   # the one-process run: one thread, as the others

# Stage 3's command line with LightningDiT.forward counted per process, into <calls dir>/<pid>.json with the rank
# (RANK under torchrun, LOCAL_RANK in a rank that --devices spawned, 0 alone). This file runs again, as
# __mp_main__, in each process that --devices spawns, so the count is in place there too. A fault "nan:R" or
# "kill:R" makes rank R's model give NaN, or kills rank R at its first model call.
COUNTED_STAGE3 = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from models.lightningdit import LightningDiT
    calls_dir, fault = Path(sys.argv[1]), sys.argv[2]
    real_forward, calls = LightningDiT.forward, []

    def counted_forward(self, *args, **kwargs):
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
        calls.append(rank)
        (calls_dir / f"{{os.getpid()}}.json").write_text(json.dumps({{"rank": rank, "calls": len(calls)}}))
        if fault == f"kill:{{rank}}":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real_forward(self, *args, **kwargs)
        return out * float("nan") if fault == f"nan:{{rank}}" else out

    LightningDiT.forward = counted_forward
    if __name__ == "__main__":
        import stage3_inference
        stage3_inference.main(sys.argv[3:])
""")
USERS, NUMBERS = ["ID_1", "ID_2", "ID_3"], [1, 2, 3]
# 3 users x 2 samples in batches of 2: 3 batches, rank 0 samples batches 0 and 2, rank 1 batch 1.
SAMPLING = dict(user_ids=NUMBERS, num_samples_per_user=2, batch_size=2, num_steps=2, device="cpu", seed=3)
STEPS_PER_BATCH = 2    # AB2 at 2 steps: 2 model calls per batch (classifier-free guidance in one batched call)
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
                 "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = 240   # s for a run on a loaded 2-core box; a hang ends here


def test_each_rank_gets_whole_batches_of_the_one_process_run_in_turn():
    jobs = [(u, k) for u in (1, 2, 10) for k in range(5)]           # 15 jobs, batches of 4: 4, 4, 4, 3
    one = [jobs[i:i + 4] for i in range(0, len(jobs), 4)]
    for world in (1, 2, 3, 5):
        shares = [Ranks(rank, world).share(jobs, 4) for rank in range(world)]
        assert sorted(job for share in shares for job in share) == sorted(jobs)    # every job once
        for rank, share in enumerate(shares):
            assert [share[i:i + 4] for i in range(0, len(share), 4)] == one[rank::world]
    assert Ranks(4, 5).share(jobs, 4) == []    # more ranks than batches: this one samples nothing


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(tiny stage 2 checkpoint, tiny tokenizer, the counting stage 3 script)."""
    root = tmp_path_factory.mktemp("ranks")
    script = root / "counted_stage3.py"
    script.write_text(COUNTED_STAGE3.format(root=str(ROOT)))
    return write_generator_checkpoint(root / "tiny.ckpt", USERS, NUMBERS), make_tokenizer(root / "tok.safetensors"), \
        script


def run_counted(files, out: Path, *extra, launcher: list = (),
                fault: str = "none") -> tuple[subprocess.CompletedProcess, dict[int, int]]:
    """Stage 3 (the counting script) into `out`, with one thread per process (as torchrun sets it) and no launcher
    variables of the environment pytest runs in; returns the finished process and the model calls per rank."""
    ckpt, tok, script = files
    calls = out.parent / f"{out.name}_calls"
    calls.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = [PYTHON, *launcher, script, calls, fault, "--dit_checkpoint", ckpt, "--vavae_path", tok,
               "--output_dir", out, *config_to_flags(SAMPLING), *extra]
    proc = subprocess.run(list(map(str, command)), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    per_rank: dict[int, int] = {}
    for record in calls.glob("*.json"):
        count = json.loads(record.read_text())
        assert count["rank"] not in per_rank, "two processes sampled as the same rank"
        per_rank[count["rank"]] = count["calls"]
    return proc, per_rank


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a finished stage 3 folder (the staging folder and the lock must be gone too)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory) -> dict[str, bytes]:
    """The files of a one-process run (in this process, with one thread as the runs above, counted the same way)."""
    ckpt, tok, _ = files
    out = tmp_path_factory.mktemp("one") / "gen"
    calls = []
    real_forward = LightningDiT.forward

    def counted_forward(self, *args, **kwargs):
        calls.append(1)
        return real_forward(self, *args, **kwargs)
    with mock.patch.object(LightningDiT, "forward", counted_forward):
        generate(GenerateOptions.defaults(dit_checkpoint=str(ckpt), vavae_path=str(tok), output_dir=str(out),
                                          **SAMPLING), log=lambda m: None)
    assert len(calls) == 3 * STEPS_PER_BATCH
    files_written = snapshot(out)
    assert len(files_written) == 3 * 2 + 1   # the samples and the grid, nothing else
    return files_written


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["devices", "torchrun"])
def test_two_processes_write_the_same_files_each_sampling_its_share(files, one_process, tmp_path, launch):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2] if launch == "torchrun" else []
    extra = ["--devices", 2] if launch == "devices" else []
    proc, calls = run_counted(files, tmp_path / "gen", *extra, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(tmp_path / "gen") == one_process                        # byte for byte, the grid too
    assert calls == {0: 2 * STEPS_PER_BATCH, 1: 1 * STEPS_PER_BATCH}       # batches 0 and 2; batch 1
    assert proc.stdout.count("stage 3 done: 6 images") == 1                 # one account, from rank 0
    assert "2 processes sampled 4 + 2" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["nan:1", "kill:1"])
def test_a_failing_rank_ends_the_run_with_its_message_and_the_previous_files(files, one_process, tmp_path, fault):
    """Rank 1's samples are NaN (its own error, reached by rank 0 through the all-reduce), or rank 1 is killed
    (the spawning process sees it die): exit 2 with what happened, and the folder keeps the previous run."""
    out = tmp_path / "gen"
    out.mkdir()
    for name, data in one_process.items():
        (out / name).write_bytes(data)
    proc, calls = run_counted(files, out, "--devices", 2, "--seed", 4, fault=fault)
    if fault.startswith("nan"):
        assert_user_error(proc, r"latents of user\(s\) 2 are NaN/inf even in fp32", "Nothing was written")
    else:
        assert_user_error(proc, r"stage 3's process 1 of 2 died \(signal SIGKILL", "nothing was written")
    assert snapshot(out) == one_process                     # no new sample, no staging folder, no lock left
    assert calls[1] >= 1
