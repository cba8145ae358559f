"""The demo path end to end, shortened: 2 simulated people, 64 px images, the shipped tokenizer, a tiny DiT."""
import json

import pytest

import pipeline.demo as demo
import run_complete_pipeline
from pipeline.orchestrate import ROOT


def test_shipped_demo_tokenizer_loads_and_is_small():
    from common.io import read_safetensors_metadata
    from models.vavae import load_vavae
    assert demo.DEMO_TOKENIZER.stat().st_size <= 20 * 2**20
    vae = load_vavae(demo.DEMO_TOKENIZER)
    assert vae.config["z_channels"] == 32 and vae.downsample_factor == 16
    assert read_safetensors_metadata(demo.DEMO_TOKENIZER)["val_psnr_db"] > 20


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_DATA", dict(num_users=2, train_per_user=6, val_per_user=2, seed=0))
    out = tmp_path / "demo"
    run_complete_pipeline.main(["--demo", "--output_dir", str(out), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
                                "--num_samples_per_user", "2"])
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "data" / "train").iterdir()) == ["ID_1", "ID_2"]
    grid = out / "generated_images" / "micro_doppler_grid.png"
    assert grid.is_file() and str(grid) in printed
    assert len(list((out / "generated_images").glob("micro_doppler_user0[12]_00[12].png"))) == 4
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert 0 <= report["identity"]["generated_top1"] <= 1 and report["fd"]["classifier"] > 0
    assert (out / "evaluation" / "report.md").is_file()
    # A second run finds everything done and redoes nothing.
    run_complete_pipeline.main(["--demo", "--output_dir", str(out), "--config", str(ROOT / "configs" / "tiny_cpu.yaml")])
    assert capsys.readouterr().out.count("already complete") == 4


def test_demo_without_tokenizer_says_how_to_restore(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_TOKENIZER", tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        run_complete_pipeline.main(["--demo", "--output_dir", str(tmp_path / "d")])
    assert exit_info.value.code == 2 and "git checkout -- assets" in capsys.readouterr().err
