"""Same inputs, same outputs: a sample's noise is a function of (seed, user, sample) alone, and stages 1 and 3 give
identical files when rerun."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import models.sampling as sampling
from models.checkpoint import PipelineInfo
from models.lightningdit import LightningDiT, model_config
from helpers import TINY_DIT, run_stage, stage1_args

S1 = "stage1_extract_features.py"


def test_noise_is_independent_per_seed_user_and_sample(monkeypatch):
    """seed * 1_000_003 + user * 1000 + sample made (user 1, sample 1000) the same draw as (user 2, sample 0)."""
    config = model_config("LightningDiT-S/2", num_classes=3, input_size=4, **TINY_DIT)
    model = LightningDiT(**config).eval()
    info = PipelineInfo(model_config=config, users=["ID_1", "ID_2", "ID_10"], user_numbers=[1, 2, 10],
                        latent_mean=torch.zeros(1, 32, 1, 1), latent_std=torch.ones(1, 32, 1, 1))
    seen = {}

    def noise_as_output(velocity, x0, *args, **kwargs):
        seen.update(x0=x0.clone(), restart_at=kwargs.get("restart_at"))
        return x0
    monkeypatch.setattr(sampling, "sample_ode", noise_as_output)
    vae = argparse.Namespace(decode=lambda z: z[:, :3])
    sampling.sample_images(model, vae, info, [(1, 1000), (2, 0)], guidance_scale=4.0, cfg_interval_start=0.3,
                      progress=False)
    assert not torch.equal(seen["x0"][0], seen["x0"][1])
    assert seen["restart_at"] == (0.3,)           # AB2 restarts where guidance switches on
    sampling.sample_images(model, vae, info, [(1, 0)], guidance_scale=1.0, cfg_interval_start=0.3, progress=False)
    assert seen["restart_at"] == ()               # no guidance, no switch
    # Many triples, no two alike (the first values of each draw stand for the whole draw).
    firsts = {tuple(sampling.job_noise(seed, u, k, (3,)).tolist()) for seed in (0, 1) for u in (1, 2, 3)
              for k in range(1500)}
    assert len(firsts) == 2 * 3 * 1500


@pytest.mark.slow
def test_stage1_is_deterministic(tmp_path, latents, tokenizer):
    """The same command gives the same latents, bit for bit (the fixture's own command, in its own process: another
    batch size or thread count may change the last float bit of a convolution)."""
    from data.latent_files import load_latents
    proc = run_stage(S1, *stage1_args(latents.parent / "data", tokenizer, tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("train", "val"):
        a, b = load_latents(latents, split), load_latents(tmp_path / "again", split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.slow
def test_stage3_is_deterministic(tmp_path, trained, tokenizer):
    from generation.cli import GenerateOptions
    from generation.generate import generate
    ckpt = str(trained / "checkpoints" / "last.ckpt")

    def run(out: str, batch_size: int) -> list:
        return generate(GenerateOptions.defaults(dit_checkpoint=ckpt, vavae_path=str(tokenizer), output_dir=out,
                                                 user_ids=[1, 10], num_samples_per_user=2, num_steps=3, seed=5,
                                                 device="cpu", batch_size=batch_size), log=lambda m: None)
    first, second = run(str(tmp_path / "a"), 4), run(str(tmp_path / "b"), 4)
    other_batching = run(str(tmp_path / "c"), 1)
    assert [p.name for p in first] == [p.name for p in second] == [p.name for p in other_batching]
    load = lambda p: np.asarray(Image.open(p)).astype(np.int16)
    for p, q, r in zip(first, second, other_batching):
        assert np.array_equal(load(p), load(q))          # same command: the same images, bit for bit
        assert np.abs(load(p) - load(r)).max() <= 1      # noise per (user, sample): batching only rounds
    assert not np.array_equal(load(first[0]), load(first[1]))   # different samples differ
