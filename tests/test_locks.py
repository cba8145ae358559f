"""One run per output (common/lock.py): a second run into the same folder is refused at once naming the first,
a lock left by a dead process is taken over, and two pipelines into one folder leave the first one's work whole."""
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT, assert_user_error, make_dataset, run_main, stage1_args

S1, S3 = "stage1_extract_features.py", "stage3_inference.py"


def hold_lock(path: Path, what: str) -> subprocess.Popen:
    """Another process holding the lock `path` through common.lock, as a running command does."""
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from common.lock import run_lock\n"
                               f"with run_lock({str(path)!r}, {what!r}, 'elsewhere'):\n"
                               "    print('held', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _lock_cases(tmp_path: Path, tokenizer: Path, trained: Path):
    """(command and flags, its lock file) of every command that writes an output."""
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=1)
    out = tmp_path / "out"
    return {
        "stage1": ([S1, *stage1_args(data, tokenizer, out)], out / "stage1.lock"),
        "stage3": ([S3, "--dit_checkpoint", trained / "checkpoints" / "last.ckpt", "--vavae_path", tokenizer,
                    "--output_dir", out, "--user_ids", 1, "--num_steps", 2], out / "stage3.lock"),
        "stage4": (["stage4_evaluate.py", "--data_dir", data, "--generated_dir", out, "--output_dir", out],
                   out / "stage4.lock"),
        "tokenizer": (["train_tokenizer.py", "--data_dir", data, "--output_path", out / "tok.safetensors",
                       "--steps", 1], out / "tok.safetensors.lock"),
        "pipeline": (["run_complete_pipeline.py", "--data_dir", data, "--vavae_path", tokenizer, "--output_dir", out],
                     out / "pipeline.lock"),
    }


@pytest.mark.parametrize("command", ["stage1", "stage3", "stage4", "tokenizer", "pipeline"])
@pytest.mark.slow
def test_a_second_run_into_the_same_output_is_refused_naming_the_first(tmp_path, tokenizer, trained, capsys, command):
    (script, *flags), lock = _lock_cases(tmp_path, tokenizer, trained)[command]
    holder = hold_lock(lock, "the first run")
    try:
        proc = run_main(capsys, script, *flags)
        assert_user_error(proc, rf"another the first run run \(pid {holder.pid} on {re.escape(socket.gethostname())}, "
                                r"started \d{4}-\d\d-\d\d \d\d:\d\d", r"Wait for it to finish")
        assert sorted(p.name for p in lock.parent.iterdir()) == [lock.name]   # the first run's output untouched
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, tokenizer, capsys):
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=1)
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stage1.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                             "started": "then", "what": "stage 1"}))
    proc = run_main(capsys, S1, *stage1_args(data, tokenizer, tmp_path / "out", "--tokenizer_check_images", 0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"left by stage 1 process {dead.pid}" in proc.stdout and not (tmp_path / "out" / "stage1.lock").exists()


@pytest.mark.slow
def test_two_pipelines_into_one_folder_the_second_is_refused_the_first_finishes(tmp_path, tokenizer, capsys):
    """The issue's case: the same command started twice; the second stops at once, the first is untouched."""
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=1)
    out = tmp_path / "out"
    command = ["run_complete_pipeline.py", "--data_dir", data, "--vavae_path", tokenizer, "--output_dir", out,
               "--stages", 1, "--image_size", 64, "--batch_size", 4, "--num_workers", 0]
    first = subprocess.Popen([PYTHON, *map(str, command)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 60
        while not (out / "pipeline.lock").is_file() and time.time() < deadline:
            time.sleep(0.05)
        second = run_main(capsys, *command)
        assert_user_error(second, rf"another pipeline run \(pid {first.pid} on ", r"another --output_dir")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert "mixes the files" not in stderr and (out / "latent_features" / ".stage_complete.json").is_file()
    assert not (out / "pipeline.lock").exists()
