"""Outputs are replaced together or not at all: a disk that fills up (here a file-size limit, `ulimit -f`) ends
with a message naming the folder and leaves the previous result; a kill while files are written or moved in
leaves no half-written file and is seen by the next stage; a rerun leaves only its own samples; stage 3 never
writes NaN samples."""
import os
import resource
import signal
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import generation.generate as gen
import models.sampling as sampling
from generation.cli import GenerateOptions
from common.errors import PipelineError, cli_entry, is_out_of_space
from common.io import save_safetensors, save_torch, write_text
from helpers import (PYTHON, ROOT, assert_user_error, load_ckpt, make_dataset, make_tokenizer, run_main,
                     write_generator_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
USERS, NUMBERS = ["ID_1", "ID_2", "ID_3"], [1, 2, 3]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """(stage 2 checkpoint of a tiny random LightningDiT for users 1-3, tiny tokenizer): latents (32, 4, 4)."""
    root = tmp_path_factory.mktemp("outputs")
    return write_generator_checkpoint(root / "tiny.ckpt", USERS, NUMBERS), make_tokenizer(root / "tok.safetensors")


def run_generate(files, out: Path, user_ids: list[int], **kwargs) -> list[Path]:
    ckpt, tok = files
    return gen.generate(GenerateOptions.defaults(dit_checkpoint=str(ckpt), vavae_path=str(tok), output_dir=str(out),
                                                 user_ids=user_ids, num_samples_per_user=2, num_steps=2, device="cpu",
                                                 **kwargs), log=lambda m: None)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def file_size_limit(limit: int):
    """preexec_fn of a child whose files may not grow past `limit` bytes: writes past it fail with EFBIG,
    as on a full disk (SIGXFSZ, which would kill the child instead, is ignored)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_stage3_on_a_full_disk_keeps_the_previous_run(tmp_path, files):
    """The rerun used to leave its new samples beside the old run's samples of another user and the old grid,
    and end with a raw OSError traceback."""
    out = tmp_path / "gen"
    run_generate(files, out, [1, 2])
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    # The file-size limit: above every new sample, below the new grid (measured by a run without a limit).
    run_generate(files, tmp_path / "measure", [3])
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "measure").iterdir()}
    grid = sizes.pop(gen.GRID_NAME)
    assert max(sizes.values()) < grid
    limit = (max(sizes.values()) + grid) // 2
    ckpt, tok = files
    proc = subprocess.run([PYTHON, "stage3_inference.py", "--dit_checkpoint", ckpt, "--vavae_path", tok,
                           "--output_dir", out, "--user_ids", "3", "--num_samples_per_user", "2", "--num_steps", "2",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(limit), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert_user_error(proc, f"could not write to {out}: no space left", "Free space there", "left as it was")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "measure"]   # no staging folder left
    run_generate(files, out, [3])   # with space again: this run's files only (and the user's own)
    assert sorted(snapshot(out)) == sorted([gen.GRID_NAME, "micro_doppler_user03_001.png",
                                            "micro_doppler_user03_002.png", "notes.txt"])


CHILD = """
import resource, signal, sys, torch
from common.errors import PipelineError, cli_entry, is_out_of_space
from common.io import save_safetensors, save_torch, write_text
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
big = torch.zeros(100_000)
for name, save in [("a.ckpt", lambda p: save_torch({"w": big}, p)),
                   ("b.safetensors", lambda p: save_safetensors({"w": big}, p)),
                   ("c.json", lambda p: write_text(p, "x" * 200_000))]:
    try:
        save(sys.argv[1] + "/" + name)
        print("written", name)
    except PipelineError as err:
        print("error:", err)
"""


@pytest.mark.slow
def test_every_save_function_names_the_folder_when_the_disk_is_full(tmp_path):
    """torch.save on a full disk raised 'RuntimeError: basic_ios::clear' / 'unexpected pos' with no word of
    space (stage 2's checkpoints); safetensors and text writes raised raw OSErrors."""
    save_torch({"w": torch.ones(3)}, tmp_path / "a.ckpt")
    save_safetensors({"w": torch.ones(3)}, tmp_path / "b.safetensors")
    write_text(tmp_path / "c.json", "{}")
    before = snapshot(tmp_path)
    proc = subprocess.run([PYTHON, "-c", CHILD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3, proc.stdout
    for line, name in zip(lines, ["a.ckpt", "b.safetensors", "c.json"]):
        assert line.startswith(f"error: could not write to {tmp_path}: no space left"), line
        assert f"{name} there is as it was before" in line and "Free space there" in line, line
    assert snapshot(tmp_path) == before        # the previous files, and no temporary left


def test_the_out_of_space_forms_are_recognised():
    assert is_out_of_space(OSError(28, "No space left on device"))
    assert is_out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    assert is_out_of_space(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert is_out_of_space(RuntimeError("basic_ios::clear: iostream error"))
    assert not is_out_of_space(OSError(13, "Permission denied"))
    assert not is_out_of_space(RuntimeError("shape mismatch"))


def test_a_full_disk_outside_the_atomic_writers_is_a_message(capsys):
    """e.g. Lightning's metrics.csv: no traceback, the file named, exit code 2."""
    @cli_entry
    def main():
        raise OSError(28, "No space left on device", "/runs/x/lightning_logs/metrics.csv")
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: no space left to write /runs/x/lightning_logs/metrics.csv")
    assert "Free space" in err


def nan_under_autocast(real):
    """sample_ode whose result is NaN when run under CPU autocast (as fp16 overflows on a T4)."""
    def sample(*args, **kwargs):
        z = real(*args, **kwargs)
        return torch.full_like(z, float("nan")) if torch.is_autocast_enabled("cpu") else z
    return sample


def test_stage3_resamples_a_nonfinite_half_precision_batch_in_fp32(tmp_path, files, monkeypatch):
    """fp16 autocast on a T4 can overflow to NaN, which was written as black PNGs with exit code 0."""
    run_generate(files, tmp_path / "fp32", [1, 2])
    monkeypatch.setattr(sampling, "sampling_dtype", lambda device: torch.bfloat16)   # autocast on this CPU
    monkeypatch.setattr(sampling, "sample_ode", nan_under_autocast(sampling.sample_ode))
    with pytest.warns(UserWarning, match=r"gave NaN/inf latents for user\(s\) 1, 2; this batch is sampled again "
                                         r"in fp32"):
        run_generate(files, tmp_path / "half", [1, 2])
    assert snapshot(tmp_path / "half") == snapshot(tmp_path / "fp32")


def test_stage3_refuses_to_write_nonfinite_samples(tmp_path, files, monkeypatch):
    real = sampling.sample_ode
    monkeypatch.setattr(sampling, "sample_ode", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(PipelineError, match=r"latents of user\(s\) 2 are NaN/inf even in fp32.*Nothing was written"):
        run_generate(files, tmp_path / "gen", [2])
    assert not (tmp_path / "gen").exists()
    monkeypatch.setattr(sampling, "sample_ode", real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a finite run warns of nothing
        run_generate(files, tmp_path / "gen", [2])

#################################################################################
#                       Interrupted writes and reruns                           #
#################################################################################

@pytest.mark.slow
def test_stage3_rerun_leaves_only_this_runs_samples(tmp_path, trained, tokenizer):
    ckpt, out = str(trained / "checkpoints" / "last.ckpt"), tmp_path / "gen"
    flags = dict(dit_checkpoint=ckpt, vavae_path=str(tokenizer), output_dir=str(out), num_steps=2, device="cpu")
    gen.generate(GenerateOptions.defaults(user_ids=[1, 10], num_samples_per_user=2, **flags), log=lambda m: None)
    mine = ["notes.txt", "micro_doppler_user01_001.jpg", "my_micro_doppler_user01_001.png"]
    for name in mine:                          # the user's own files, not of the project's naming
        (out / name).write_text("keep me")
    logged = []
    gen.generate(GenerateOptions.defaults(user_ids=[2], num_samples_per_user=1, **flags), log=logged.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["micro_doppler_grid.png", "micro_doppler_user02_001.png", *mine])
    assert "removed 4 sample(s) of an earlier run" in logged[-1]


def test_interrupted_write_leaves_no_final_file(tmp_path, monkeypatch):
    import common.io
    target = tmp_path / "sub" / "train.safetensors"

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(common.io, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors({"x": torch.zeros(3)}, target)
    assert not target.exists() and not list(target.parent.iterdir())   # no temporary file left either
    monkeypatch.undo()
    save_safetensors({"x": torch.zeros(3)}, target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


@pytest.mark.slow
def test_interrupted_stage1_is_not_finished_work(tmp_path, tokenizer, monkeypatch):
    import data.latents as latents_mod
    from data.cli import ExtractOptions
    real = latents_mod.encode_all

    def dies_on_val(*args, **kwargs):
        if args[-1] == "stage 1 val":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(latents_mod, "encode_all", dies_on_val)
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2"), per_user=3)
    with pytest.raises(KeyboardInterrupt):
        latents_mod.extract_features(ExtractOptions.defaults(data_dir=str(data), vavae_path=str(tokenizer),
                                                             output_path=str(tmp_path / "out"), batch_size=4,
                                                             image_size=64), log=lambda m: None)
    assert not (tmp_path / "out" / "val.safetensors").exists()
    assert not (tmp_path / "out" / "latent_stats.safetensors").exists()


@pytest.mark.slow
def test_stage3_killed_while_moving_its_samples_in_is_detected(tmp_path, trained, tokenizer, monkeypatch, capsys):
    """Stage 3 and stage 1 share one staged write (common.io.replaced_together): a kill between two of its
    renames leaves a marker that stage 4 refuses, naming stage 3."""
    import common.io
    real, moved = os.replace, []

    def killed_after_the_first_sample(src, dst):
        if Path(src).parent.name == common.io.STAGING_DIR:
            if moved:
                raise KeyboardInterrupt
            moved.append(dst)
        return real(src, dst)

    monkeypatch.setattr(common.io.os, "replace", killed_after_the_first_sample)
    gen_dir = tmp_path / "gen"
    with pytest.raises(KeyboardInterrupt):
        gen.generate(GenerateOptions.defaults(dit_checkpoint=str(trained / "checkpoints" / "best.ckpt"),
                                              vavae_path=str(tokenizer), output_dir=str(gen_dir), user_ids=[1, 2],
                                              num_samples_per_user=2, num_steps=2), log=lambda m: None)
    monkeypatch.undo()
    assert len(list(gen_dir.glob("micro_doppler_*.png"))) == 1   # one of the five moved in
    data = make_dataset(tmp_path / "data", users=("ID_1", "ID_2", "ID_10"), per_user=2, val_per_user=1)
    proc = run_main(capsys, "stage4_evaluate.py", "--data_dir", data, "--generated_dir", gen_dir, "--output_dir",
                    tmp_path / "eval", "--image_size", 64)
    assert_user_error(proc, r"a stage 3 run stopped while moving its samples", r"Rerun stage 3")


def test_checkpoint_interrupted_mid_save_keeps_the_previous_one(tmp_path, monkeypatch):
    """Stage 2's checkpoints go through atomic_path: a kill mid-save leaves last.ckpt as it was."""
    import common.io
    from training.callbacks import AtomicCheckpointIO
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])   # truncated, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(common.io.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 10, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_ckpt(path)["global_step"] == 5 and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
