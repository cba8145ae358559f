"""Stage 4's judge: it trains until its top-1 on held-out train images stops rising, keeps its best weights, never
looks at val images, and its cache key holds every setting."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import augment as A  # noqa: E402
from evaluation import classifier as clf  # noqa: E402

SIZE, CLASSES = 16, 3
CPU = torch.device("cpu")
TINY = clf.ClassifierConfig(size=SIZE, arch="small_cnn", batch_size=16, lr=3e-3, warmup_steps=2,
                            max_steps=150, eval_every=5, patience=3, augment=A.Classical())
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, 3, SIZE, SIZE) whose class is which third of the rows is bright, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    images = torch.randint(0, 60, (len(labels), 3, SIZE, SIZE), generator=gen)
    band = SIZE // CLASSES
    for i, c in enumerate(labels.tolist()):
        images[i, :, c * band:(c + 1) * band] += 150
    return images.to(torch.uint8), labels


def write_two_users(root: Path, per_user: int, val_per_user: int, samples: int) -> None:
    """root/data (stage 1 layout, users ID_1 and ID_2) and root/gen: `samples` stage 3-named images per user
    drawn like the real ones but apart from them (helpers.make_dataset)."""
    from helpers import make_dataset
    make_dataset(root / "data", users=("ID_1", "ID_2"), per_user=per_user, val_per_user=val_per_user, seed=0)
    make_dataset(root / "drawn", users=("ID_1", "ID_2"), per_user=samples, seed=1)
    (root / "gen").mkdir()
    for user in (1, 2):
        for k, path in enumerate(sorted((root / "drawn" / f"ID_{user}").iterdir())):
            Image.open(path).save(root / "gen" / f"micro_doppler_user{user:02d}_{k:03d}.png")


def held_out_top1(fit: clf.Fit, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = clf.extract(fit.model, images, 16, CPU)[1]
    return float((logits.argmax(1) == labels).float().mean())


#################################################################################
#                                Early stopping                                 #
#################################################################################

@pytest.mark.slow
def test_learns_a_separable_task_and_keeps_the_best_weights():
    images, labels = separable(24, 0)
    held_images, held_labels = separable(8, 1)
    fit = clf.train_classifier(images, labels, CLASSES, TINY, CPU, held_out=(held_images, held_labels))
    assert fit.held_out_top1 == 1.0
    # The weights returned are the ones scored at best_step: re-scoring them gives the same held-out top-1.
    assert held_out_top1(fit, held_images, held_labels) == fit.held_out_top1
    assert fit.best_step % TINY.eval_every == 0 and fit.best_step <= fit.steps


@pytest.mark.slow
def test_stops_before_the_cap_when_held_out_top1_stops_rising():
    images, _ = separable(24, 0)
    noise_labels = torch.randint(0, CLASSES, (len(images),), generator=torch.Generator().manual_seed(2))
    held_images, _ = separable(8, 1)
    held_labels = torch.randint(0, CLASSES, (len(held_images),), generator=torch.Generator().manual_seed(3))
    cfg = replace(TINY, max_steps=400)
    fit = clf.train_classifier(images, noise_labels, CLASSES, cfg, CPU, held_out=(held_images, held_labels))
    # Labels it cannot learn: after `patience` scores without a higher top-1 it stops, far before the cap, and
    # hands back the weights of its best score (at or after the last rise), not the last ones.
    assert fit.stopped_early and fit.steps < cfg.max_steps // 2
    assert fit.steps - cfg.patience * cfg.eval_every <= fit.best_step <= fit.steps
    assert held_out_top1(fit, held_images, held_labels) == fit.held_out_top1


def test_without_held_out_images_it_runs_to_the_cap():
    images, labels = separable(4, 0)
    fit = clf.train_classifier(images, labels, CLASSES, replace(TINY, max_steps=3), CPU)
    assert (fit.steps, fit.best_step, fit.held_out_top1, fit.stopped_early) == (3, 3, None, False)


#################################################################################
#                          The held-out split (not val)                         #
#################################################################################

def test_held_out_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = clf.held_out_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]     # a lone image is never held out
    assert torch.equal(clf.held_out_split(labels, 0.2, seed=0)[1], held)
    assert not torch.equal(clf.held_out_split(labels, 0.2, seed=1)[1], held)


@pytest.mark.slow
def test_the_judge_holds_out_train_images_never_val_images(tmp_path, monkeypatch):
    """Stage 4 end to end: every image the classifiers are scored on while they train is a train image."""
    from test_evaluation import run_evaluate
    write_two_users(tmp_path, per_user=8, val_per_user=3, samples=3)
    seen = []
    real_train = clf.train_classifier

    def recording(images, labels, num_classes, cfg, device, held_out=None, **kwargs):
        seen.append((images, held_out[0]))
        return real_train(images, labels, num_classes, replace(cfg, max_steps=2), device, held_out=held_out, **kwargs)

    monkeypatch.setattr(clf, "train_classifier", recording)
    report = run_evaluate(tmp_path / "data", tmp_path / "gen", tmp_path / "out", image_size=SIZE,
                          classifier_size=SIZE, gain_seeds=2, low_data_per_user=4, tstr=False)
    from evaluation.inputs import load_inputs
    data = load_inputs(tmp_path / "data", tmp_path / "gen", SIZE, SIZE, 16, 0, log=lambda *_: None)
    rows = lambda x: {bytes(image.numpy()) for image in x}
    # The judge works at the decoded size, the gain's classifiers on the thumbnails.
    train = rows(data.train.images) | rows(data.train.thumbnails().images)
    val = rows(data.val.images) | rows(data.val.thumbnails().images)
    assert len(seen) >= 1 + 2 + 2 * 2      # the judge, the real arm of 2 seeds, both real-image arms at low data
    for fit_images, held_images in seen:
        assert rows(held_images) <= train and not rows(held_images) & val
        assert not rows(held_images) & rows(fit_images)
    assert report["classifier"]["held_out_top1"] is not None


#################################################################################
#                                    Cache                                      #
#################################################################################

def test_cache_key_holds_every_training_setting(tmp_path):
    (tmp_path / "train" / "ID_1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "ID_1" / "a.png")
    files = [tmp_path / "train" / "ID_1" / "a.png"]
    key = lambda cfg: clf.fingerprint(tmp_path, ["ID_1"], files, cfg)
    changes = [dict(arch="resnet18"), dict(size=32), dict(max_steps=9), dict(patience=9), dict(eval_every=9),
               dict(held_out_fraction=0.3), dict(lr=1.0), dict(augment=A.Classical(time_roll=0.1)), dict(seed=9)]
    keys = {key(TINY)} | {key(replace(TINY, **change)) for change in changes}
    assert len(keys) == len(changes) + 1


def test_report_advises_a_tokenizer_fine_tune_only_below_the_ceiling_beyond_both_intervals():
    from evaluation.report import _tokenizer_lines
    recon = {"top1": 0.95, "top1_ci": [0.86, 0.98], "psnr_db": 22.7}
    assert "fine-tune" not in " ".join(_tokenizer_lines(recon, [0.91, 1.0]))       # within the noise of both
    assert "fine-tune" in " ".join(_tokenizer_lines({**recon, "top1_ci": [0.5, 0.6]}, [0.91, 1.0]))
