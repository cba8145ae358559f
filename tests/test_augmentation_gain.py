"""The augmentation gain: classical augmentations do what they say, the arms of a seed are paired, the gain
statistics are right on known numbers, and report.json's augmentation block has the documented keys."""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import augment as A  # noqa: E402
from evaluation import classifier as clf  # noqa: E402
from evaluation import gain  # noqa: E402
from evaluation.intervals import seeds_and_images_interval  # noqa: E402

H, W = 12, 20
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def ramp(n: int = 6) -> torch.Tensor:
    """uint8 (n, 3, H, W): pixel = H * column + row (< 256), so where each pixel came from can be read off it."""
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return (H * cols + rows).to(torch.uint8).expand(n, 3, H, W).contiguous()


#################################################################################
#                            Classical augmentations                            #
#################################################################################

def test_time_roll_is_a_circular_shift_within_its_range():
    x = ramp()
    out = A.augment(x, A.Classical(time_roll=0.25), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    shifts = set()
    for image in out:
        shift = next(s for s in range(W) if torch.equal(image, torch.roll(x[0], s, dims=2)))
        shifts.add(min(shift, W - shift))
    assert max(shifts) <= round(0.25 * W) and shifts != {0}


def test_frequency_shift_moves_rows_and_repeats_the_edge():
    x = ramp()
    out = A.augment(x, A.Classical(freq_shift=0.25), torch.Generator().manual_seed(1))
    moved = 0
    for image in out:
        source_rows = (image[0, :, 0] % H).tolist()         # row index each output row was taken from
        steps = np.diff(source_rows)
        assert set(steps.tolist()) <= {0, 1}                 # in order, edge rows repeated, no wrap-around
        shift = round(float(np.median(np.arange(H) - np.array(source_rows))))
        assert abs(shift) <= round(0.25 * H)
        moved += shift != 0
        assert torch.equal(image[:, :, 1:], image[:, :, :1] + H * torch.arange(1, W, dtype=torch.uint8))  # no roll
    assert moved > 0


def test_masks_fill_bands_of_at_most_the_given_width_with_the_background():
    x = ramp(8)
    recipe = A.Classical(time_masks=1, time_mask_width=0.3, freq_masks=1, freq_mask_width=0.25)
    out = A.augment(x, recipe, torch.Generator().manual_seed(2))
    fill = A.background(x)[0, 0]                             # the ramp's median value
    masked_any = False
    for image, before in zip(out[:, 0], x[:, 0]):
        columns = (image == fill).all(0).nonzero().flatten()  # time-masked: whole columns of the fill colour
        rows = (image == fill).all(1).nonzero().flatten()     # frequency-masked: whole rows
        for band, limit in ((columns, round(0.3 * W)), (rows, round(0.25 * H))):
            assert len(band) <= limit and (len(band) == 0 or band[-1] - band[0] == len(band) - 1)  # one band
        changed = image != before
        covered = torch.zeros_like(changed)
        covered[:, columns], covered[rows, :] = True, True
        assert not (changed & ~covered).any()                # nothing else moves
        masked_any |= bool(changed.any())
    assert masked_any


def test_no_recipe_is_the_identity_and_draws_follow_the_generator():
    x = ramp()
    assert A.augment(x, A.Classical(), torch.Generator()) is x
    a = A.augment(x, A.DEFAULT, torch.Generator().manual_seed(5))
    b = A.augment(x, A.DEFAULT, torch.Generator().manual_seed(5))
    c = A.augment(x, A.DEFAULT, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


#################################################################################
#                           Paired arms within a seed                           #
#################################################################################

def test_arms_of_a_seed_share_initial_weights_and_batch_order():
    cfg = clf.ClassifierConfig(size=16, arch="small_cnn", batch_size=8, seed=3)
    images = torch.randint(0, 256, (30, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    extra = (images[:10].flip(3), labels[:10])
    arms = {arm: gain.arm_config(cfg, arm, seed=3) for arm in gain.ARMS}
    weights = [clf.initial_model(3, arms[arm], torch.device("cpu")).state_dict() for arm in gain.ARMS]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])
    first = {arm: next(clf.training_batches(images, labels, arms[arm], extra if arm == "generated" else None))
             for arm in gain.ARMS}
    # real and classical: the same images in the same order, one of them augmented.
    assert torch.equal(first["real"][1], first["classical"][1]) and not torch.equal(first["real"][0],
                                                                                     first["classical"][0])
    # generated: exactly the classical batch, then about batch_size * 10 / 30 generated images.
    x, y = first["generated"]
    assert torch.equal(x[:8], first["classical"][0]) and torch.equal(y[:8], first["classical"][1])
    assert len(x) == 8 + 3
    other_seed = next(clf.training_batches(images, labels, replace(arms["classical"], seed=4)))
    assert not torch.equal(other_seed[0], first["classical"][0])


@pytest.mark.parametrize("n", [9, 17, 25, 16])
def test_batch_indices_cover_every_image_once_per_epoch_merging_a_last_batch_of_one(n):
    """With n = k * 8 + 1 the last batch of one joins the one before it (BatchNorm needs two images); every epoch
    still holds each index once (the 31 x 50 scale run found 9 = 8 + 1 failing and longer lists losing a batch)."""
    parts = clf.batch_indices(n, 8, torch.Generator().manual_seed(0))
    for _ in range(3):
        epoch = [next(parts) for _ in range(max(1, n // 8))]
        assert sorted(torch.cat(epoch).tolist()) == list(range(n))
        assert all(len(part) >= 2 for part in epoch) and [len(p) for p in epoch[:-1]] == [8] * (len(epoch) - 1)


@pytest.mark.parametrize("share, samples, expected", [(0.5, 10, 8), (0.5, 100, 8), (0.2, 10, 2), (0.01, 10, 1)])
def test_a_generated_share_fixes_the_samples_part_of_every_batch_whatever_their_number(share, samples, expected):
    cfg = replace(clf.ClassifierConfig(size=16, batch_size=8, seed=3), generated_share=share)
    images = torch.randint(0, 256, (30, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    extra = (torch.zeros(samples, 3, 16, 16, dtype=torch.uint8), torch.full((samples,), 2))
    batches = clf.training_batches(images, labels, cfg, extra)
    plain = clf.training_batches(images, labels, replace(cfg, generated_share=None))
    for _ in range(5):
        (x, y), (real_x, real_y) = next(batches), next(plain)
        # the real part is the batch without samples (same order and augmentation), the rest `expected` samples:
        # 8 * s / (1 - s) of them, at least one, in every batch (30 real images end each epoch with 6)
        real = len(real_x)
        assert torch.equal(x[:real], real_x) and torch.equal(y[:real], real_y)
        assert len(x) == real + expected and (y[real:] == 2).all()


def test_generated_first_pretrains_on_the_samples_and_fine_tunes_on_the_real_batches():
    from evaluation.imageset import ImageSet
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 2
    # the two people differ in brightness, so a few steps learn them
    images = (torch.rand(24, 3, 16, 16, generator=gen) * 60 + 40 + 120 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    def image_set(x: torch.Tensor, y: torch.Tensor, name: str) -> ImageSet:
        return ImageSet([Path(f"{name}{i}.png") for i in range(len(y))], y, x, torch.zeros(len(y), 1))
    train, samples = image_set(images, labels, "r"), image_set(images[:8].flip(3), labels[:8], "g")
    cfg = clf.ClassifierConfig(size=16, batch_size=8, max_steps=30, eval_every=10, patience=1, seed=2)
    mixed = gain.regime_jobs(train, samples, cfg, [2], None, "all")
    first = gain.regime_jobs(train, samples, replace(cfg, generated_use="first"), [2], None, "all")
    by_arm = {job.arm: job for job in first}
    assert [j.arm for j in first] == [j.arm for j in mixed] == list(gain.ARMS)
    assert by_arm["generated"].extra is None and torch.equal(by_arm["generated"].pretrain[0], samples.images)
    assert all(job.pretrain is None for job in first if job.arm != "generated")
    assert mixed[2].pretrain is None and torch.equal(mixed[2].extra[0], samples.images)
    val = image_set(images[::3], labels[::3], "v")
    _, info = gain.train_and_score(by_arm["generated"], val, 2, torch.device("cpu"), progress=False)
    assert info["pretrain_steps"] > 0 and info["steps"] > 0


def test_fine_tuning_starts_from_a_copy_of_the_given_weights():
    images = torch.randint(0, 256, (12, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.arange(12) % 2
    cfg = clf.ClassifierConfig(size=16, batch_size=4, max_steps=2, lr=0.0, weight_decay=0.0, ema_decay=0.0, seed=5)
    start = clf.initial_model(2, replace(cfg, seed=9), torch.device("cpu")).eval()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    fit = clf.train_classifier(images, labels, 2, cfg, torch.device("cpu"), progress=False, init=start)
    # lr 0: the weights stay the given ones (not seed 5's), and the given model is left untouched
    weights = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    assert all(torch.equal(fit.model.state_dict()[k], before[k]) for k in weights)
    assert fit.model is not start and all(torch.equal(start.state_dict()[k], before[k]) for k in before)
    own = clf.initial_model(2, cfg, torch.device("cpu")).state_dict()
    assert not all(torch.equal(own[k], before[k]) for k in weights)


@pytest.mark.slow
def test_classifiers_trained_at_once_on_threads_come_out_as_one_by_one():
    from evaluation.imageset import ImageSet
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    images = torch.randint(0, 60, (40, 3, 16, 16), generator=gen, dtype=torch.uint8)
    images[labels == 1, :, :8] += 120                       # learnable: user 1 is bright on top
    as_set = lambda x, y: ImageSet([Path(f"{i}.png") for i in range(len(y))], y, x, torch.zeros(len(y), 1))
    train, extra, val = as_set(images[:24], labels[:24]), as_set(images[24:32], labels[24:32]), as_set(images[32:],
                                                                                                       labels[32:])
    cfg = clf.ClassifierConfig(size=16, batch_size=8, max_steps=20, eval_every=5, patience=2)
    jobs = gain.regime_jobs(train, extra, cfg, [0, 1], None, "all") + gain.tstr_jobs(extra, cfg, [0])
    tasks = [lambda job=job: gain.train_and_score(job, val, 2, torch.device("cpu"), progress=False) for job in jobs]
    one_by_one = gain.run_tasks(tasks, workers=1, desc="t")
    at_once = gain.run_tasks(tasks, workers=3, desc="t")
    assert len(at_once) == len(jobs) == 7
    for (a, info_a), (b, info_b) in zip(one_by_one, at_once):
        assert np.array_equal(a, b) and (info_a["best_step"], info_a["steps"]) == (info_b["best_step"], info_b["steps"])
    assert torch.get_num_threads() == 1                      # the module's one thread, restored after the pool


def test_low_data_subset_takes_n_per_user_drawn_by_seed():
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 5)
    chosen = gain.low_data_subset(labels, 20, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [20, 20, 5]
    assert torch.equal(chosen, gain.low_data_subset(labels, 20, seed=0))
    assert not torch.equal(chosen, gain.low_data_subset(labels, 20, seed=1))


#################################################################################
#                              Gain statistics                                  #
#################################################################################

def test_paired_gain_on_known_numbers():
    before = np.zeros((5, 10))
    before[:, :5] = 1                                        # every seed: 0.5
    after = before.copy()
    after[:3, 5] = 1                                         # seeds 0-2 one more right: +0.1
    after[3, 0] = 0                                          # seed 3 one fewer: -0.1; seed 4 unchanged
    g = gain.paired_gain(after, before)
    assert g["per_seed"] == pytest.approx([0.1, 0.1, 0.1, -0.1, 0.0])
    assert g["mean"] == pytest.approx(0.04)
    assert (g["wins"], g["ties"], g["losses"], g["of"]) == (3, 1, 1, 5)
    # The interval, draw by draw as its definition says: the same seeds (rows) and val images (columns) drawn
    # for both arms, the mean over drawn seeds of each seed's mean over drawn images, its 2.5 and 97.5 percentiles.
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 5, (2000, 5)), rng.integers(0, 10, (2000, 10))
    draws = [np.mean([(after[r] - before[r])[c].mean() for r in rs]) for rs, c in zip(rows, cols)]
    assert g["ci"] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])), abs=1e-12)
    assert g["ci"][0] <= g["mean"] <= g["ci"][1]
    same = gain.paired_gain(before, before)
    assert same["ci"] == [0.0, 0.0] and same["mean"] == 0.0 and same["ties"] == 5


def test_seeds_and_images_interval_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    steady = (rng.random((5, 200)) < 0.8).astype(float)
    spread = steady.copy()
    spread[:2] = (rng.random((2, 200)) < 0.4)               # two seeds far worse
    width = lambda m: np.diff(seeds_and_images_interval([m], lambda a: a))[0]
    assert width(spread) > 2 * width(steady)
    summary = gain.mean_with_interval(steady)
    assert summary["top1"] == pytest.approx(steady.mean()) and len(summary["per_seed"]) == 5
    assert summary["top1_ci"][0] <= summary["top1"] <= summary["top1_ci"][1]


#################################################################################
#                           The report's block                                  #
#################################################################################

@pytest.mark.slow
def test_report_block_has_the_documented_keys(tmp_path):
    from test_evaluation import run_evaluate
    from test_judge import write_two_users
    write_two_users(tmp_path, per_user=10, val_per_user=4, samples=4)
    report = run_evaluate(tmp_path / "data", tmp_path / "gen", tmp_path / "out", classifier_max_steps=10,
                          gain_seeds=3, low_data_per_user=5, min_confidence=0.0, min_margin=0.0)
    aug = report["augmentation"]
    assert set(aug["regimes"]) == {"all", "low_data"} and aug["seeds"] == [0, 1, 2]
    assert aug["regimes"]["low_data"]["real_images"] == 10 and aug["regimes"]["all"]["real_images"] == 20
    for regime in aug["regimes"].values():
        assert set(regime["arms"]) == set(gain.ARMS) and set(regime["comparisons"]) == set(gain.COMPARISONS)
        for arm in regime["arms"].values():
            assert len(arm["per_seed"]) == len(arm["best_step"]) == len(arm["seconds"]) == 3
            assert arm["top1_ci"][0] <= arm["top1"] <= arm["top1_ci"][1]
        for name, (a, b) in gain.COMPARISONS.items():
            g = regime["comparisons"][name]
            assert g["wins"] + g["ties"] + g["losses"] == g["of"] == 3
            assert g["mean"] == pytest.approx(regime["arms"][a]["top1"] - regime["arms"][b]["top1"])
    assert aug["gain"] == aug["regimes"]["all"]["comparisons"]["generated-classical"]["mean"]
    assert aug["generated_images"] == report["export"]["accepted"] > 0 and "generator" in aug
    # The judge's real-val top-1 over its own three seeds, the first of them the judge itself.
    over_seeds = report["classifier"]["real_val_top1_over_seeds"]
    assert over_seeds["seeds"] == [0, 1, 2] and over_seeds["per_seed"][0] == report["identity"]["real_val_top1"]
    assert over_seeds["top1_ci"][0] <= over_seeds["top1"] <= over_seeds["top1_ci"][1]
    assert aug["classifier_size"] == gain.SIZE
    tstr = report["tstr"]
    assert len(tstr["per_seed"]) == 3 and tstr["of_real"] == pytest.approx(
        tstr["top1"] / aug["regimes"]["all"]["arms"]["classical"]["top1"])
    assert {"gain_all", "gain_low_data", "tstr", "classifier", "total"} <= set(report["timing"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "generated - classical" in md and "low_data (10 real, 5 per user)" in md
