"""The orchestrator skips a finished stage only while its flags, its input files and the stage before it are
unchanged, redoes it otherwise and says why, prints commands a shell takes back, takes paths as the user's shell
means them, and the demo ends with its results. Stage processes are replaced by a recorder except where a test
says it runs one."""
import argparse
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import pipeline.orchestrate as orch
from common.errors import PipelineError
from common.io import read_safetensors_metadata
from helpers import PYTHON, ROOT, make_dataset, track_image

def _fake_stages(monkeypatch) -> list[list[str]]:
    """Stage processes replaced by a recorder of their command lines (each 'succeeds')."""
    calls: list[list[str]] = []
    monkeypatch.setattr(orch.subprocess, "call", lambda cmd, **kwargs: calls.append(cmd) or 0)
    return calls


def _args(out: Path, data: Path, tokenizer: Path) -> argparse.Namespace:
    return argparse.Namespace(output_dir=str(out), stages=[1], force=False, generate_user_ids=[1],
                              data_dir=str(data), vavae_path=str(tokenizer), batch_size=4, devices=1, max_epochs=1,
                              num_samples_per_user=1)


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    data = make_dataset(tmp_path / "my data", users=("ID_1", "ID_2"), per_user=2, val_per_user=1, draw=track_image)
    tokenizer = tmp_path / "tok.safetensors"
    tokenizer.write_bytes(b"tokenizer weights, first fine-tune")
    return data, tokenizer


def _run(args, logged=None) -> list[str]:
    logged = [] if logged is None else logged
    orch.run_pipeline(args, [], log=logged.append)
    return logged


def test_stage1_is_redone_when_a_user_folder_is_added(tmp_path, inputs, monkeypatch):
    """'stage 1: already complete ... skipped' after a user folder was added: the new user never appeared."""
    calls, (data, tokenizer) = _fake_stages(monkeypatch), inputs
    args = _args(tmp_path / "out", data, tokenizer)
    _run(args)
    assert "already complete" in _run(args)[0] and len(calls) == 1
    make_dataset(data, users=("ID_3",), per_user=2, val_per_user=1, draw=track_image)
    logged = _run(args)
    assert len(calls) == 2
    assert any(f"stage 1: redone (--data_dir {data}: its images changed (6 -> 9 files))" in m for m in logged)
    assert "already complete" in _run(args)[0] and len(calls) == 2


def test_stage1_is_redone_when_the_tokenizer_file_is_rewritten(tmp_path, inputs, monkeypatch):
    calls, (data, tokenizer) = _fake_stages(monkeypatch), inputs
    args = _args(tmp_path / "out", data, tokenizer)
    _run(args)
    stat = tokenizer.stat()
    os.utime(tokenizer, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))     # touched, same content: skipped
    assert "already complete" in _run(args)[0] and len(calls) == 1
    tokenizer.write_bytes(b"tokenizer weights, re-fine-tuned")                # same size, new content
    logged = _run(args)
    assert len(calls) == 2 and any(f"--vavae_path {tokenizer}: the file changed" in m for m in logged)


def test_an_edited_image_redoes_stage1(tmp_path, inputs, monkeypatch):
    calls, (data, tokenizer) = _fake_stages(monkeypatch), inputs
    args = _args(tmp_path / "out", data, tokenizer)
    _run(args)
    image = data / "val" / "ID_2" / "img_000.png"
    image.write_bytes(image.read_bytes() + b"\0")
    logged = _run(args)
    assert len(calls) == 2 and any("its images changed (names, sizes or times)" in m for m in logged)


def test_printed_commands_paste_back_into_a_shell(tmp_path, inputs, monkeypatch):
    calls, (data, tokenizer) = _fake_stages(monkeypatch), inputs
    logged = _run(_args(tmp_path / "out", data, tokenizer))
    command = next(m for m in logged if m.startswith("== stage 1: python "))
    words = shlex.split(command.removeprefix("== stage 1: python "))
    assert words[words.index("--data_dir") + 1] == str(data) and " " in str(data)
    assert words[1:] == calls[0][2:]


def test_git_lfs_pointer_is_named_as_one(tmp_path):
    from models.vavae import load_vavae
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 2097152\n")
    for name in ("tok.safetensors", "tok.pt"):
        (tmp_path / name).write_text(pointer)
        with pytest.raises(PipelineError, match=r"is a Git LFS pointer .*git lfs pull"):
            load_vavae(tmp_path / name)

#################################################################################
#                     Interrupted, changed and forced stages                    #
#################################################################################

def test_orchestrator_reruns_a_stage_without_marker(tmp_path, monkeypatch):
    calls, codes = [], [1, 0]
    monkeypatch.setattr(orch.subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or codes.pop(0))
    args = argparse.Namespace(output_dir=str(tmp_path), stages=[1], force=False, generate_user_ids=[1],
                              data_dir="d", vavae_path="v", batch_size=4, devices=1, max_epochs=1,
                              num_samples_per_user=1)
    marker = tmp_path / orch.STAGE_DIRS[1] / orch.DONE_MARKER
    with pytest.raises(PipelineError, match=r"stage 1 failed \(exit code 1\).*finished stages are skipped"):
        orch.run_pipeline(args, [], log=lambda m: None)
    assert not marker.exists() and len(calls) == 1
    orch.run_pipeline(args, [], log=lambda m: None)            # interrupted stage: run again
    assert marker.is_file() and len(calls) == 2
    logged = []
    orch.run_pipeline(args, [], log=logged.append)              # finished: skipped
    assert len(calls) == 2 and "already complete" in logged[0]
    marker.unlink()
    codes.append(0)
    orch.run_pipeline(args, [], log=lambda m: None)             # marker gone: the stage runs again
    assert len(calls) == 3


def _pipeline_args(out: Path, **overrides) -> argparse.Namespace:
    values = dict(output_dir=str(out), stages=[2, 3], force=False, generate_user_ids=[1], data_dir="d",
                  vavae_path="v", batch_size=4, devices=1, max_epochs=1, num_samples_per_user=1)
    return argparse.Namespace(**{**values, **overrides})


def test_orchestrator_reruns_a_stage_whose_flags_changed(tmp_path, monkeypatch):
    calls, logged = _fake_stages(monkeypatch), []
    orch.run_pipeline(_pipeline_args(tmp_path), ["--guidance_scale", "2"], log=lambda m: None)
    assert len(calls) == 2
    orch.run_pipeline(_pipeline_args(tmp_path), ["--guidance_scale", "2"], log=logged.append)    # same: both skipped
    assert len(calls) == 2 and sum("already complete" in m for m in logged) == 2
    logged.clear()
    orch.run_pipeline(_pipeline_args(tmp_path, generate_user_ids=[2, 3]), ["--num_steps", "3"], log=logged.append)
    assert len(calls) == 3 and calls[-1][1].endswith("stage3_inference.py")
    assert calls[-1][calls[-1].index("--user_ids") + 1:][:2] == ["2", "3"]
    redone = next(m for m in logged if "stage 3: redone" in m)
    assert "--user_ids: 1 -> 2 3" in redone and "--num_steps 3 added" in redone and "--guidance_scale 2 removed" in redone
    assert "stage 2: already complete" in logged[0]
    # Stage 2 redone (its flags changed): stage 3, made from the old model, is redone too.
    logged.clear()
    orch.run_pipeline(_pipeline_args(tmp_path, max_epochs=2, generate_user_ids=[2, 3]), ["--num_steps", "3"],
                      log=logged.append)
    assert [c[1].rsplit("/", 1)[-1] for c in calls[3:]] == ["stage2_train_dit.py", "stage3_inference.py"]
    assert any("--max_epochs: 1 -> 2" in m for m in logged)
    assert any("stage 3: redone (the stage before it was redone since)" in m for m in logged)


def test_orchestrator_force_trains_stage2_anew(tmp_path, monkeypatch):
    calls = _fake_stages(monkeypatch)
    orch.run_pipeline(_pipeline_args(tmp_path, stages=[2]), [], log=lambda m: None)
    assert "--restart" not in calls[-1]                    # an interrupted run resumes
    orch.run_pipeline(_pipeline_args(tmp_path, stages=[2], force=True), [], log=lambda m: None)
    assert len(calls) == 2 and "--restart" in calls[-1]
    logged = []
    orch.run_pipeline(_pipeline_args(tmp_path, stages=[2]), [], log=logged.append)   # --restart is not a change
    assert len(calls) == 2 and "already complete" in logged[0]


@pytest.mark.slow
def test_orchestrator_from_another_folder_with_relative_paths(tmp_path, tokenizer):
    """Paths mean what they mean in the user's shell: data, tokenizer, outputs and markers."""
    work = tmp_path / "work"
    make_dataset(work / "data", users=("ID_1", "ID_2"), per_user=2, val_per_user=2)
    shutil.copy(tokenizer, work / "tok.safetensors")
    proc = subprocess.run([PYTHON, str(ROOT / "run_complete_pipeline.py"), "--data_dir", "data", "--vavae_path",
                           "tok.safetensors", "--output_dir", "out", "--stages", "1", "--batch_size", "4",
                           "--image_size", "64", "--num_workers", "0"],
                          cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage1 = work / "out" / "latent_features"
    assert (stage1 / "train.safetensors").is_file() and (stage1 / ".stage_complete.json").is_file()
    assert read_safetensors_metadata(stage1 / "train.safetensors")["user_numbers"] == [1, 2]


#################################################################################
#                           The demo's closing lines                            #
#################################################################################

REPORT = {
    "identity": {"generated_top1": 0.5, "real_val_top1": 0.8, "chance": 1 / 6, "relative_to_ceiling": 0.625,
                 "tokenizer_reconstructions": {"top1": 0.6, "psnr_db": 22.7}},
    "fd": {"classifier": 12.34, "classifier_real_val": 3.21},
    "memorization": {"copy_rate": 0.05},
    "augmentation": {"real_only_top1": 0.8, "with_generated_top1": 0.83, "gain": 0.03},
}


def test_demo_ends_with_its_results(tmp_path):
    from pipeline.demo import result_lines
    lines = "\n".join(result_lines(REPORT, tmp_path))
    assert "identity: 0.50 of generated samples recognised as their user (chance 0.17)" in lines
    assert "ceiling:  real val images 0.80; the tokenizer's reconstructions 0.60 (22.7 dB)" in lines
    assert "classifier FD 12.3 (real val 3.2;" in lines and "copies: 5.0%" in lines
    assert "augmentation: +0.030" in lines and str(tmp_path / "generated_images" / "micro_doppler_grid.png") in lines


def test_demo_results_without_val_numbers(tmp_path):
    from pipeline.demo import result_lines
    report = {"identity": {"generated_top1": 0.5, "real_val_top1": None, "chance": 0.5},
              "fd": {"classifier": None}, "memorization": {"copy_rate": 0.0}, "augmentation": {"gain": None}}
    lines = "\n".join(result_lines(report, tmp_path))
    assert "identity: 0.50" in lines and "n/a" in lines


def test_repa_in_stage2_makes_stage1_write_its_targets(tmp_path, inputs, monkeypatch):
    """--repa_weight above 0 (a flag or a config key) needs stage 1's repa_targets.safetensors: the orchestrator
    asks stage 1 for them (--repa_encoder auto) unless the user chose an encoder; --repa_weight 0 asks nothing."""
    calls, (data, tokenizer) = _fake_stages(monkeypatch), inputs
    for extra, expected in ((["--repa_weight", "0.5"], ["--repa_encoder", "auto"]),
                            (["--repa_weight=0.5", "--repa_encoder", "spectrogram"], ["--repa_encoder", "spectrogram"]),
                            (["--repa_weight", "0"], [])):
        calls.clear()
        orch.run_pipeline(_args(tmp_path / f"out{len(extra)}{extra[-1]}", data, tokenizer), extra,
                          log=lambda m: None)
        stage1 = calls[0]
        at = stage1.index("--repa_encoder") if "--repa_encoder" in stage1 else None
        assert (stage1[at:at + 2] if at is not None else []) == expected, stage1
