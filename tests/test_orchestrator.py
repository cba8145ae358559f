"""The orchestrator redoes a stage whose input files changed, and prints commands a shell takes back (issue 18: 8
and its smaller notes); the demo ends with its results (issue 21: 8)."""
import argparse
import os
import shlex
from pathlib import Path

import pytest

import pipeline.orchestrate as orch
from common.errors import PipelineError
from helpers import make_dataset, track_image

pytestmark = pytest.mark.slow   # the orchestrator runs stages as subprocesses


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
