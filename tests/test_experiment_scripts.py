"""The study scripts' shared parts (experiments/lib.sh, experiments/stage_flags.py): each stage gets from a config
what the orchestrator gives it, a finished step is skipped only while its command and the steps before it are
unchanged, and every script parses; the prepared GPU quality run (experiments/gpu_quality.sh) runs every stage at
its tiny CPU size on recordings in the mmGait layout and writes one JSON."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run_complete_pipeline
from pipeline.demo import DEMO_CONFIG, DEMO_DATA
from pipeline.orchestrate import STAGE_SCRIPTS, flag_groups

ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIG = ROOT / "configs" / "studies" / "demo_lr5e-4.yaml"


def load_study(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_stage_flags():
    return load_study("stage_flags").stage_flags


def bash(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`script` run after sourcing experiments/lib.sh, as a study script does (set -euo pipefail)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{ROOT}/experiments/lib.sh"; {script}'],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


#################################################################################
#                  stage_flags: a config's flags, routed per stage              #
#################################################################################

def orchestrator_argv(config: Path, tmp_path: Path, monkeypatch) -> dict[int, list[str]]:
    """stage -> the command line run_complete_pipeline.py --config gives it (stages not run, only recorded)."""
    calls = {}

    def record(command, **kwargs):
        stage = next(s for s, script in STAGE_SCRIPTS.items() if command[1].endswith(script))
        calls[stage] = command[2:]
        return 0
    monkeypatch.setattr("pipeline.orchestrate.subprocess.call", record)
    (tmp_path / "data").mkdir()
    (tmp_path / "tokenizer.safetensors").write_bytes(b"x")
    run_complete_pipeline.main(["--config", str(config), "--data_dir", str(tmp_path / "data"), "--vavae_path",
                                str(tmp_path / "tokenizer.safetensors"), "--output_dir", str(tmp_path / "out"),
                                "--generate_user_ids", "1"])
    return calls


@pytest.mark.parametrize("config", [DEMO_CONFIG, STUDY_CONFIG], ids=["demo", "study"])
def test_stage_flags_are_what_the_orchestrator_gives_each_stage_from_the_config(config, tmp_path, monkeypatch):
    import yaml
    keys = {f"--{k}" for k in yaml.safe_load(Path(config).read_text())}
    given = orchestrator_argv(config, tmp_path, monkeypatch)
    flags = load_stage_flags()(str(config))
    assert set(flags) == {1, 2, 3, 4}
    for stage, argv in given.items():
        from_config = [group for group in flag_groups(argv) if group[0] in keys]
        assert flag_groups(flags[stage]) == from_config, stage
    # The trap it exists for: batch_size is the DiT's (stages 1 and 2); stage 4's classifiers keep their own.
    assert flag_groups(flags[2])[0] == ["--batch_size", "32"] and "--batch_size" not in flags[4]


def test_the_study_config_is_the_demo_recipe_at_lr_5e_4_and_guidance_2(tmp_path):
    import yaml
    demo, study = (yaml.safe_load(Path(c).read_text()) for c in (DEMO_CONFIG, STUDY_CONFIG))
    differing = {k for k in demo.keys() | study.keys() if demo.get(k) != study.get(k)}
    # The recipe's levers, and the demo's training length cut for its clock on 2026-12-06 (the studies keep the
    # length they were measured at: 200 epochs, a validation every 5, the classifier's default steps).
    assert differing == {"lr", "guidance_scale", "cfg_interval_start", "max_epochs", "val_every_n_epochs",
                         "classifier_steps"}
    assert (study["lr"], study["guidance_scale"], study["cfg_interval_start"]) == (5e-4, 2.0, 0.0)
    assert (study["max_epochs"], study["val_every_n_epochs"], "classifier_steps" in study) == (200, 5, False)


def test_stage_flags_refuses_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: -1\n")
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "stage_flags.py"), str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "lr" in proc.stderr, proc.stderr
    proc = bash(f'read_config "{bad}"; echo unreachable', tmp_path)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout


#################################################################################
#                         run_once: skip a finished step                        #
#################################################################################

def test_run_once_skips_only_the_same_finished_command(tmp_path):
    count, marker = tmp_path / "count", tmp_path / "step.done"
    step = f'run_once "{marker}" sh -c "echo ran >> {count}; echo \\$0" '
    assert bash(step + "one", tmp_path).returncode == 0
    second = bash(step + "one", tmp_path)
    assert second.returncode == 0 and "done already" in second.stdout
    assert count.read_text().count("ran") == 1
    changed = bash(step + "two", tmp_path)                        # other flags: redone, said
    assert "redone" in changed.stdout and count.read_text().count("ran") == 2
    assert "two" in marker.read_text()


def test_run_once_writes_no_marker_for_a_failed_step_and_stops_the_script(tmp_path):
    marker = tmp_path / "step.done"
    proc = bash(f'run_once "{marker}" false; echo unreachable', tmp_path)
    assert proc.returncode != 0 and "unreachable" not in proc.stdout and not marker.exists()


def test_run_once_redoes_a_step_whose_earlier_step_was_redone(tmp_path):
    count, first, second = tmp_path / "count", tmp_path / "first.done", tmp_path / "second.done"

    def run(word: str) -> None:
        proc = bash(f'run_once "{first}" echo {word}; '
                    f'run_once "{second}" --after "{first}" sh -c "echo ran >> {count}"', tmp_path)
        assert proc.returncode == 0, proc.stderr
    run("a")
    run("a")
    assert count.read_text().count("ran") == 1
    run("b")                                  # the first step's command changed: it and the step after it rerun
    assert count.read_text().count("ran") == 2


def test_user_ids_are_the_numbers_of_the_user_folders_in_order(tmp_path):
    for name in ("ID_10", "ID_2", "ID_1"):
        (tmp_path / "train" / name).mkdir(parents=True)
    assert bash(f'user_ids "{tmp_path}"', tmp_path).stdout.split() == ["1", "2", "10"]


@pytest.mark.slow
def test_simulate_demo_data_writes_the_demos_people_once(tmp_path):
    first = bash(f'simulate_demo_data "{tmp_path}/data"', tmp_path)
    assert first.returncode == 0, first.stderr
    images = list((tmp_path / "data").rglob("*.png"))
    per_user = DEMO_DATA["train_per_user"] + DEMO_DATA["val_per_user"]
    assert len(images) == DEMO_DATA["num_users"] * per_user
    again = bash(f'simulate_demo_data "{tmp_path}/data"', tmp_path)
    assert "already" in again.stdout


def test_every_study_script_parses():
    scripts = sorted((ROOT / "experiments").glob("*.sh"))
    assert len(scripts) > 5
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script.name, proc.stderr)

#################################################################################
#                 scale_study.py: what it measures, on what images              #
#################################################################################

# A child that holds MB megabytes (every page written, so resident) for a second, then starts a grandchild that
# holds as much at the same time: the tree's peak is the sum, the child's alone half of it.
HOLDER = ("import subprocess, sys, time\n"
          "def hold(mb):\n"
          "    b = bytearray(mb * 2**20); b[::4096] = b'x' * len(range(0, len(b), 4096)); return b\n"
          "kept = hold(int(sys.argv[1])); time.sleep(0.6)\n"
          "if sys.argv[2] == 'parent':\n"
          "    subprocess.run([sys.executable, '-c', sys.argv[3], sys.argv[1], 'leaf', sys.argv[3]], check=True)\n"
          "else:\n"
          "    time.sleep(1.0)\n")


def test_scale_study_peak_memory_is_the_whole_process_trees(tmp_path):
    scale = load_study("scale_study")
    measured = scale.run_measured([sys.executable, "-c", HOLDER, "200", "parent", HOLDER], tmp_path / "log")
    assert measured["seconds"] >= 1.6
    assert 400 <= measured["peak_pss_mb"] < 400 + 200, measured   # two 200 MB holders, each Python's own ~10-40 MB
    with pytest.raises(subprocess.CalledProcessError):
        scale.run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log")


def test_scale_study_smaller_scales_are_the_first_people_and_images_of_the_largest(tmp_path):
    scale = load_study("scale_study")
    full = tmp_path / "full"
    for split, count in (("train", 4), ("val", 2)):
        for user in (1, 2, 3):
            (full / split / f"ID_{user}").mkdir(parents=True)
            for k in range(count):
                (full / split / f"ID_{user}" / f"ID_{user}_{k:04d}.png").write_bytes(b"png")
    out = scale.subset(full, tmp_path / "small", people=2, train_per_user=3, val_per_user=1)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["ID_1", "ID_2"]
    assert sorted(p.name for p in (out / "train" / "ID_2").iterdir()) == [f"ID_2_{k:04d}.png" for k in range(3)]
    assert [p.resolve() for p in (out / "val" / "ID_1").iterdir()] == [full / "val" / "ID_1" / "ID_1_0000.png"]
    assert scale.parse_scale("31x150") == (31, 150)


#################################################################################
#                 gpu_quality.sh, the prepared GPU run, at tiny size           #
#################################################################################

def write_recordings(folder: Path, people=(2, 11, 22), frames: int = 400) -> Path:
    """vol<NNN>.npz files as ../shared/data/mmgait60 holds them: hist (32, F) counts of radial velocities per frame,
    each person walking at their own speed (the histogram's peak bin), so the people differ."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, person in enumerate(people):
        peak = 10 + 6 * k + np.round(2 * np.sin(np.arange(frames) / 15)).astype(int)
        hist = rng.poisson(0.3, size=(32, frames)).astype(np.float32)
        hist[peak, np.arange(frames)] += rng.poisson(8, size=frames)
        np.savez(folder / f"vol{person:03d}.npz", hist=hist, velocity_mps=np.linspace(-2.35, 2.2, 32),
                 frame_ids=np.arange(frames))
    return folder


@pytest.mark.slow
def test_gpu_quality_runs_every_stage_at_tiny_size_and_writes_one_json(tmp_path):
    source = write_recordings(tmp_path / "recordings")
    out = tmp_path / "out"
    env = {**os.environ, "SIZE": "tiny", "SOURCE": str(source), "OUT": str(out),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_quality.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_quality.json").read_text())
    assert set(summary["seconds"]) == {"render", "tokenizer", "stage1", "stage2", "stage3", "stage4"}
    assert all(v > 0 for v in summary["seconds"].values())
    for key in ("identity", "ceiling_real_val", "tstr", "copy_rate"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    assert summary["identity_ci"][0] <= summary["identity"] <= summary["identity_ci"][1]
    # Stage 3 guided with the classifier the run's stage 2 trained: 3 people x 2 samples.
    assert "--classifier_scale" in summary["stage3_flags"]
    assert len(list((out / "samples").glob("micro_doppler_user*_*.png"))) == 6


def test_gpu_quality_refuses_an_unknown_size(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_quality.sh")], capture_output=True, text=True,
                          env={**os.environ, "SIZE": "huge", "OUT": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2 and "SIZE must be gpu or tiny" in proc.stdout
