"""Stage 3's samples for training: real-anchored sampling (SDEdit's strength, per sample as DA-Fusion draws it) and a
guidance scale drawn per sample. The ODE from each sample's own start time on every sampler, strength 1 as today's
sampling bit for bit, anchors near their train latent, every draw a function of (seed, user, sample), recorded in
micro_doppler_samples.json, and the user's mistakes refused with exit 2."""
import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import models.sampling as sampling
import pipeline.orchestrate as orch
from common.config import non_negative_float
from common.errors import PipelineError
from common.io import load_safetensors, save_safetensors
from data.latent_files import RUN_KEY
from data.samples import MANIFEST_NAME
from generation.cli import GenerateOptions, anchor_strength
from generation.generate import generate
from generation.recipes import flag_range
from generation.ranks import LAUNCHER_VARIABLES
from helpers import (PYTHON, ROOT, assert_user_error, make_tokenizer, run_main, tiny_dit, write_generator_checkpoint,
                     write_latent_dir)
from models.sampling import PerSampleRecipes, job_anchor
from models.transport import SAMPLERS, guidance_switches, guided_velocity, linear_path, sample_ode, time_grid

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
S3 = "stage3_inference.py"
FIXED_STEP = [s for s in SAMPLERS if s != "dopri5"]


#################################################################################
#                    The ODE from each sample's own start time                  #
#################################################################################

def test_the_path_starts_at_noise_and_the_ode_from_t0_ends_at_the_data():
    """x_t = t x1 + (1 - t) x0 (t = 0 noise), and the velocity stage 2 regresses is x1 - x0 (flow_matching_loss):
    from linear_path(x1, x0, t0) that velocity, integrated over each sample's own [t0, 1] by any sampler, lands on
    x1 exactly. The noise end taken wrongly, or another interval, would land elsewhere."""
    x1, x0 = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    assert torch.equal(linear_path(x1, x0, 0.0), x0) and torch.equal(linear_path(x1, x0, 1.0), x1)
    t0 = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    start = linear_path(x1, x0, t0.float())
    torch.testing.assert_close(start[1], 0.5 * x1[1] + 0.5 * x0[1])
    for sampler in SAMPLERS:
        out = sample_ode(lambda x, t: x1 - x0, start, 8, sampler, 0.3, t_start=t0)
        torch.testing.assert_close(out, x1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_per_sample_start_times_converge_at_the_samplers_order(sampler, order):
    """dx/dt = -x + cos(3t) from each sample's own (t0, x0): error(h) / error(h/2) -> 2^order, against the exact x(1)
    from that start (a wrong start time would converge to another value). Shift 1: at 0.3 the coarse grids are
    not yet in the asymptotic range (test_time_grid_from_t_start_is_the_tail_of_the_schedule checks that grid)."""
    t0 = torch.tensor([0.0, 0.25, 0.6], dtype=torch.float64)
    x0 = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
    exact = _exact_from(t0, x0)
    errors = [(sample_ode(_cosine_field, x0, n, sampler, 1.0, t_start=t0).double() - exact).abs().max().item()
              for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(2 ** order, rel=0.25)


@pytest.mark.parametrize("shift", [1.0, 0.3])
def test_time_grid_from_t_start_is_the_tail_of_the_schedule(shift):
    """A sample starting at a point of the 2n-step schedule gets the rest of that schedule as its n steps."""
    full = time_grid(16, shift)
    grid = time_grid(8, shift, t_start=torch.stack([full[0], full[8]]))
    torch.testing.assert_close(grid[:, 0], time_grid(8, shift), rtol=0, atol=1e-15)
    torch.testing.assert_close(grid[:, 1], full[8:], rtol=0, atol=1e-15)
    assert grid[0, 1] == full[8] and grid[-1, 1] == pytest.approx(1.0, abs=1e-12)


def test_dopri5_integrates_each_sample_over_its_own_interval():
    t0 = torch.tensor([0.0, 0.25, 0.6])
    x0 = torch.tensor([[1.0], [-0.5], [2.0]])
    out = sample_ode(_cosine_field, x0, 0, "dopri5", 1.0, t_start=t0)
    assert (out.double() - _exact_from(t0.double(), x0.double())).abs().max() < 2e-3   # rtol 1e-3, as from t = 0


def _cosine_field(x, t):
    return -x + torch.cos(3 * t).view(-1, 1)


def _exact_from(t0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """x(1) of dx/dt = -x + cos(3t) with x(t0) = x0: x = C e^-t + p(t), p(t) = (cos 3t + 3 sin 3t) / 10."""
    def p(t):
        return (torch.cos(3 * t) + 3 * torch.sin(3 * t)) / 10
    return ((x0 - p(t0)[:, None]) * torch.exp(-(1 - t0))[:, None] + p(torch.tensor(1.0, dtype=torch.float64)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_start_time_zero_is_todays_sampling_bit_for_bit(sampler):
    """The per-sample path at t_start = 0 (strength 1) gives the bits of the plain path, guidance interval and
    AB2 restarts included: a tiny DiT, classifier-free guidance only inside [0.3, 0.7]."""
    model = tiny_dit(num_classes=3).eval()
    y, x0 = torch.tensor([0, 2, 1]), torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    velocity = guided_velocity(model, y, 3, 4.0, 0.3, 0.7)
    plain = sample_ode(velocity, x0, 6, sampler, 0.3, restart_at=guidance_switches(4.0, 0.3, 0.7))
    zero = sample_ode(velocity, x0, 6, sampler, 0.3, restart_at=guidance_switches(4.0, 0.3, 0.7),
                      t_start=torch.zeros(3, dtype=torch.float64))
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_batch_of_mixed_starts_and_scales_samples_each_as_alone(sampler):
    """Per-sample start times and guidance scales in one batch, across a guidance interval that each sample enters
    at its own step (guided_velocity's per-sample mask, AB2's per-sample restart): each sample as if sampled alone."""
    model = tiny_dit(num_classes=3).eval()
    y, x0 = torch.tensor([0, 2, 1]), torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(2))
    t0, scale = torch.tensor([0.0, 0.35, 0.62], dtype=torch.float64), torch.tensor([1.5, 4.0, 2.5])
    switches = guidance_switches(scale, 0.4, 0.8)
    together = sample_ode(guided_velocity(model, y, 3, scale, 0.4, 0.8), x0, 7, sampler, 0.3, restart_at=switches,
                          t_start=t0)
    for i in range(3):
        alone = sample_ode(guided_velocity(model, y[i:i + 1], 3, float(scale[i]), 0.4, 0.8), x0[i:i + 1], 7, sampler,
                           0.3, restart_at=switches, t_start=t0[i:i + 1])
        # One sample or three through the same layers: the same sums up to the order a batched matmul takes. dopri5
        # picks its steps by the error of the whole batch: the runs agree within its rtol (1e-3) of the latents.
        atol = 1e-3 * alone.abs().max().item() if sampler == "dopri5" else 1e-5
        torch.testing.assert_close(together[i:i + 1], alone, atol=atol, rtol=1e-5)


def test_per_sample_guidance_scales_act_per_sample():
    def model(x, t, y):   # conditional velocity 1, unconditional (null class 9) -1
        return torch.where(y == 9, -1.0, 1.0).view(-1, 1) * torch.ones_like(x)
    v = guided_velocity(model, torch.tensor([0, 0, 0]), 9, torch.tensor([1.0, 2.0, 4.0]))(torch.zeros(3, 2),
                                                                                           torch.tensor(0.5))
    assert v[:, 0].tolist() == [1.0, 3.0, 7.0]     # -1 + w (1 + 1)
    inside = guided_velocity(model, torch.tensor([0, 0]), 9, 4.0, interval_start=0.5)(torch.zeros(2, 2),
                                                                                       torch.tensor([0.4, 0.6]))
    assert inside[:, 0].tolist() == [1.0, 7.0]     # each sample's own t against the interval


#################################################################################
#                       Draws: a function of (seed, user, sample)               #
#################################################################################

def test_anchors_use_every_train_latent_once_per_pass_and_depend_on_seed_and_user():
    count = 7
    first_pass = [job_anchor(0, 1, k, count) for k in range(count)]
    second_pass = [job_anchor(0, 1, k, count) for k in range(count, 2 * count)]
    assert sorted(first_pass) == sorted(second_pass) == list(range(count))
    assert first_pass != second_pass   # each pass in its own order (7! orders: a tie is a 1/5040 chance, fixed seeds)
    assert first_pass == [job_anchor(0, 1, k, count) for k in range(count)]
    assert first_pass != [job_anchor(1, 1, k, count) for k in range(count)]
    assert first_pass != [job_anchor(0, 2, k, count) for k in range(count)]


def test_recipes_draw_within_their_ranges_and_one_range_leaves_the_others_draws_alone():
    anchors = {1: torch.zeros(5, 2, 1, 1), 3: torch.zeros(4, 2, 1, 1)}
    both = PerSampleRecipes((2.0, 6.0), (0.3, 0.8), anchors)
    drawn = [both.recipe(7, u, k) for u in (1, 3) for k in range(20)]
    assert drawn == [both.recipe(7, u, k) for u in (1, 3) for k in range(20)]       # reproducible
    scales, strengths = [r.guidance_scale for r in drawn], [r.strength for r in drawn]
    assert all(2.0 <= s <= 6.0 for s in scales) and len(set(scales)) == len(scales)
    assert all(0.3 <= s <= 0.8 for s in strengths) and len(set(strengths)) == len(strengths)
    fixed_scale = PerSampleRecipes((4.0, 4.0), (0.3, 0.8), anchors)
    assert [(r.strength, r.anchor) for r in drawn] == \
        [(r.strength, r.anchor) for r in (fixed_scale.recipe(7, u, k) for u in (1, 3) for k in range(20))]
    assert {fixed_scale.recipe(7, 1, k).guidance_scale for k in range(5)} == {4.0}
    assert PerSampleRecipes((4.0, 4.0), (0.5, 0.5), anchors).recipe(7, 1, 0).strength == 0.5


def test_flag_ranges_are_checked():
    assert flag_range(None, "--f", anchor_strength) is None
    assert flag_range([0.5], "--f", anchor_strength) == (0.5, 0.5)
    assert flag_range([0.2, 0.9], "--f", anchor_strength) == (0.2, 0.9)
    for values, message in (([0.9, 0.2], r"LOW <= HIGH"), ([0.1, 0.2, 0.3], r"takes 1 or 2 value\(s\) \(got 3"),
                            ([0.0], r"must be a finite number > 0 and <= 1"), ([1.5], r"<= 1 \(got 1.5\)")):
        with pytest.raises(PipelineError, match=message):
            flag_range(values, "--f", anchor_strength)
    with pytest.raises(PipelineError, match=r"takes 2 value"):
        flag_range([3.0], "--guidance_scale_range", non_negative_float, counts=(2,))


#################################################################################
#           Stage 3 on a tiny random model and latents of the same users         #
#################################################################################

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A checkpoint written before run ids were recorded (users 1-3, statistics 0 and 1), a tokenizer, and a latent
    folder with those users and statistics (its run is told by them)."""
    root = tmp_path_factory.mktemp("anchored")
    return dict(dit_checkpoint=str(write_generator_checkpoint(root / "tiny.ckpt")),
                vavae_path=str(make_tokenizer(root / "tok.safetensors")),
                latent_dir=str(write_latent_dir(root / "latents")))


def tiny_run(tiny: dict, out: Path, **flags) -> dict[str, bytes]:
    generate(GenerateOptions.defaults(**{**tiny, "output_dir": str(out), "user_ids": [1, 3], "num_samples_per_user": 3,
                                         "num_steps": 3, "batch_size": 4, "device": "cpu", **flags}),
             log=lambda m: None)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_strength_one_writes_todays_images_and_a_rerun_the_same_files(tiny, tmp_path):
    today = tiny_run(tiny, tmp_path / "today", cfg_interval_start=0.3)
    anchored = tiny_run(tiny, tmp_path / "anchored", cfg_interval_start=0.3, real_anchored_strength=[1.0])
    manifest = json.loads(anchored.pop(MANIFEST_NAME))
    assert anchored == today
    assert [s["strength"] for s in manifest["samples"]] == [1.0] * 6
    ranged = dict(real_anchored_strength=[0.2, 0.9], guidance_scale_range=[1.0, 6.0])
    assert tiny_run(tiny, tmp_path / "a", **ranged) == tiny_run(tiny, tmp_path / "b", **ranged)
    tiny_run(tiny, tmp_path / "a")   # a run without per-sample recipes leaves no earlier run's manifest
    assert not (tmp_path / "a" / MANIFEST_NAME).exists()


def test_stage3_refuses_recipes_it_cannot_honour(tiny, tmp_path, capsys):
    base = ["--dit_checkpoint", tiny["dit_checkpoint"], "--vavae_path", tiny["vavae_path"], "--output_dir",
            tmp_path / "gen", "--user_ids", 1, "--num_steps", 2]
    other_stats = Path(shutil.copytree(tiny["latent_dir"], tmp_path / "other"))
    save_safetensors({"mean": torch.full((1, 32, 1, 1), 0.1), "std": torch.ones(1, 32, 1, 1)},
                     other_stats / "latent_stats.safetensors", {"users": ["ID_1", "ID_2", "ID_3"]})
    cases = [
        (["--real_anchored_strength", 0], [r"--real_anchored_strength: must be a finite number > 0 and <= 1"]),
        (["--real_anchored_strength", 0.5], [r"--real_anchored_strength starts each sample from a real train "
                                             r"latent: pass --latent_dir"]),
        (["--real_anchored_strength", 0.5, "--latent_dir", tmp_path / "none"], [r"holds no train\.safetensors"]),
        (["--real_anchored_strength", 0.5, "--latent_dir", other_stats], [r"is not the stage 1 folder",
                                                                          r"statistics or users differ"]),
        (["--real_anchored_strength", 0.6, 0.3, "--latent_dir", tiny["latent_dir"]], [r"LOW <= HIGH"]),
        (["--guidance_scale_range", 2], [r"--guidance_scale_range takes 2 value"]),
    ]
    for flags, patterns in cases:
        assert_user_error(run_main(capsys, S3, *base, *flags), *patterns)
        assert not (tmp_path / "gen").exists()


#################################################################################
#                Stage 3 on the trained model and stage 1's latents             #
#################################################################################

@pytest.mark.slow
def test_small_strength_stays_near_its_anchor_and_larger_strength_moves_further(tmp_path, trained, latents,
                                                                                 tokenizer, monkeypatch):
    """Each sample starts at x_t0 = t0 x1 + (1 - t0) x0 (t0 = 1 - strength) of the train latent its manifest
    names, normalised as stage 2 trained on it; at strength 0.05 the sample's nearest train latent is its anchor
    and the mean distance to the anchor grows with the strength."""
    starts, ends = [], []

    def recorded(velocity, x0, *args, **kwargs):
        z = real(velocity, x0, *args, **kwargs)
        starts.append(x0.clone())
        ends.append(z.clone())
        return z
    real = sampling.sample_ode
    monkeypatch.setattr(sampling, "sample_ode", recorded)
    tensors, meta = load_safetensors(latents / "train.safetensors")
    stats, _ = load_safetensors(latents / "latent_stats.safetensors")
    train = (tensors["latents"] - stats["mean"]) / stats["std"]
    distance = {}
    for strength in (0.05, 0.5, 1.0):
        starts.clear(), ends.clear()
        out = tmp_path / f"s{strength}"
        generate(GenerateOptions.defaults(dit_checkpoint=str(trained / "checkpoints" / "last.ckpt"),
                                          vavae_path=str(tokenizer), output_dir=str(out), user_ids=[1, 2, 10],
                                          num_samples_per_user=4, num_steps=4, device="cpu", latent_dir=str(latents),
                                          real_anchored_strength=[strength]), log=lambda m: None)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        rows = torch.tensor([s["anchor_train_row"] for s in manifest["samples"]])
        assert [meta["files"][r] for r in rows] == [s["anchor_file"] for s in manifest["samples"]]
        assert all(f"ID_{s['user']}/" in s["anchor_file"] for s in manifest["samples"])   # the sample's own user
        noise = torch.stack([sampling.job_noise(0, s["user"], s["sample"] - 1, train.shape[1:])
                             for s in manifest["samples"]])
        torch.testing.assert_close(torch.cat(starts), linear_path(train[rows], noise, 1 - strength))
        z = torch.cat(ends).flatten(1)
        to_train = torch.cdist(z, train.flatten(1))
        distance[strength] = to_train[torch.arange(len(rows)), rows].mean().item()
        if strength == 0.05:
            assert torch.equal(to_train.argmin(dim=1), rows)
    assert distance[0.05] < distance[0.5] < distance[1.0]


@pytest.mark.slow
def test_a_latent_folder_of_another_stage1_run_is_refused(tmp_path, trained, latents, tokenizer, capsys):
    """The checkpoint records stage 1's run id; a folder of another run (here the same files under a new id, as a
    rerun of stage 1 would write them) is refused even where its numbers happen to agree."""
    other = Path(shutil.copytree(latents, tmp_path / "rerun"))
    for name in ("train", "val", "latent_stats"):
        tensors, meta = load_safetensors(other / f"{name}.safetensors")
        save_safetensors(tensors, other / f"{name}.safetensors", {**meta, RUN_KEY: "0" * 32})
    split = json.loads((other / "split.json").read_text())
    (other / "split.json").write_text(json.dumps({**split, RUN_KEY: "0" * 32}))
    proc = run_main(capsys, S3, "--dit_checkpoint", trained / "checkpoints" / "last.ckpt", "--vavae_path", tokenizer,
                    "--output_dir", tmp_path / "gen", "--user_ids", 1, "--num_steps", 2, "--latent_dir", other,
                    "--real_anchored_strength", 0.5)
    assert_user_error(proc, r"holds the latents of stage 1 run 00000000, but .* was trained on run [0-9a-f]{8}")
    assert not (tmp_path / "gen").exists()


@pytest.mark.slow
def test_two_processes_write_the_same_anchored_files_as_one(tmp_path, tiny):
    """--devices 2: each rank draws its share's recipes itself, rank 0 writes the manifest of all."""
    flags = dict(real_anchored_strength=[0.3, 0.9], guidance_scale_range=[1.0, 5.0])
    one = tiny_run(tiny, tmp_path / "one", **flags)
    command = [PYTHON, S3, "--dit_checkpoint", tiny["dit_checkpoint"], "--vavae_path", tiny["vavae_path"],
               "--latent_dir", tiny["latent_dir"], "--output_dir", tmp_path / "two", "--user_ids", 1, 3,
               "--num_samples_per_user", 3, "--num_steps", 3, "--batch_size", 4, "--device", "cpu", "--devices", 2,
               "--real_anchored_strength", 0.3, 0.9, "--guidance_scale_range", 1.0, 5.0]
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}, "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(list(map(str, command)), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "two").iterdir())} == one


def test_the_orchestrator_gives_stage3_stage1s_folder_for_real_anchors(tmp_path, monkeypatch):
    """run_complete_pipeline.py --real_anchored_strength: stage 3 gets <output_dir>/latent_features (a --latent_dir
    of the user's would also reach stage 2 and redo it); without the flag stage 3's command is as before."""
    calls = []
    monkeypatch.setattr(orch.subprocess, "call", lambda cmd, **kwargs: calls.append(cmd) or 0)
    for name, extra in (("anchored", ["--real_anchored_strength", "0.4", "0.8"]), ("plain", [])):
        out = tmp_path / name
        args = argparse.Namespace(output_dir=str(out), stages=[3], force=False, generate_user_ids=[1], data_dir="d",
                                  vavae_path="tok", batch_size=4, devices=1, max_epochs=1, num_samples_per_user=1)
        orch.run_pipeline(args, extra, log=lambda m: None)
    anchored, plain = calls
    assert anchored[anchored.index("--latent_dir") + 1] == str(tmp_path / "anchored" / "latent_features")
    assert "--latent_dir" not in plain
