"""Stage 4 evaluation: the metrics must tell good samples from bad ones, copies from new images."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import PipelineError  # noqa: E402
from data.images import scan_dataset  # noqa: E402
from evaluation import augment as A  # noqa: E402
from evaluation import classifier as clf  # noqa: E402
from evaluation import metrics as M  # noqa: E402
from evaluation.cli import EvaluateOptions  # noqa: E402
from evaluation.evaluate import evaluate  # noqa: E402
from evaluation.export import accepted_samples, export_dataset  # noqa: E402
from evaluation.imageset import load_set  # noqa: E402
from evaluation.intervals import wilson_interval  # noqa: E402
from helpers import make_dataset  # noqa: E402

SIZE = 32
USERS = [1, 2, 5, 7]            # not 1..N on purpose: user numbers are not class indices
N_TRAIN, N_VAL, N_HELD_OUT = 16, 6, 6
FAST = dict(image_size=SIZE, classifier_size=SIZE, batch_size=16, classifier_max_steps=30, gain_seeds=2,
            low_data_per_user=6, seed=0,
            min_user_samples=4)
# The module-scoped fixtures train too (one thread), and run stage 4 three times: one xdist worker builds them once.
pytestmark = [pytest.mark.usefixtures("one_thread_per_module"), pytest.mark.xdist_group("evaluation_runs")]


def run_evaluate(data_dir: Path, generated_dir: Path, output_dir: Path, *, tstr: bool = True,
                 augmentation: bool = True, **flags) -> dict:
    """Stage 4 in this process: FAST's flags, then `flags`, in place of the parser's defaults."""
    options = EvaluateOptions.defaults(data_dir=data_dir, generated_dir=generated_dir, output_dir=output_dir,
                                       **{**FAST, **flags})
    return evaluate(options, tstr=tstr, augmentation=augmentation, log=lambda *_: None)


#################################################################################
#                                  Tiny data                                    #
#################################################################################

def _spectrogram(user_index: int, rng: np.random.Generator) -> Image.Image:
    """Each user: its own stripe frequency and tint, random phase, plus noise."""
    y = np.mgrid[0:SIZE, 0:SIZE][0] / SIZE
    freq = [2, 4, 7, 11][user_index]
    stripes = 0.5 + 0.4 * np.sin(2 * np.pi * (freq * y + rng.uniform()))
    tint = np.array([[1, .3, .3], [.3, 1, .3], [.3, .3, 1], [1, 1, .3]])[user_index]
    pixels = stripes[..., None] * tint + rng.normal(0, 0.08, (SIZE, SIZE, 3))
    return Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8))


def _generated_name(user: int, k: int) -> str:
    return f"micro_doppler_user{user:02d}_{k:03d}.png"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    dirs = {name: root / name for name in ("held_out", "noise", "copies", "unknown")}
    for d in dirs.values():
        d.mkdir()
    for c, user in enumerate(USERS):
        make_dataset(root / "data", users=(f"ID_{user}",), per_user=N_TRAIN, val_per_user=N_VAL, seed=rng,
                     draw=lambda rng, _user, _index, c=c: (_spectrogram(c, rng), ".png"))
        for k in range(N_HELD_OUT):
            _spectrogram(c, rng).save(dirs["held_out"] / _generated_name(user, k))
            noise = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(noise).save(dirs["noise"] / _generated_name(user, k))
            shutil.copyfile(root / "data" / "train" / f"ID_{user}" / f"img_{k:03d}.png",
                            dirs["copies"] / _generated_name(user, k))
    _spectrogram(0, rng).save(dirs["unknown"] / _generated_name(1, 0))
    _spectrogram(0, rng).save(dirs["unknown"] / _generated_name(9, 0))
    return root, dirs


@pytest.fixture(scope="module")
def runs(dataset):
    """Three evaluations sharing one cached classifier; trainer calls are recorded."""
    root, dirs = dataset
    calls = []
    real_train = clf.train_classifier

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        extra = kwargs.get("extra")
        sizes.append((len(args[0]), len(kwargs["held_out"][0]), 0 if extra is None else len(extra[0])))
        return real_train(*args, **kwargs)

    sizes = []

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clf, "train_classifier", counting)
        good = run_evaluate(root / "data", dirs["held_out"], root / "out_good", export_dir=root / "export")
        cache = Path(good["classifier"]["path"])
        mtime = cache.stat().st_mtime_ns
        calls_after_first = list(calls)
        sizes_first = list(sizes)
        noise = run_evaluate(root / "data", dirs["noise"], root / "out_noise", tstr=False, augmentation=False)
        copies = run_evaluate(root / "data", dirs["copies"], root / "out_copies", tstr=False, augmentation=False)
    return {"good": good, "noise": noise, "copies": copies, "calls_first": calls_after_first, "calls": calls,
            "sizes_first": sizes_first, "cache": cache, "mtime": mtime, "root": root}


#################################################################################
#                        Good vs bad generated images                           #
#################################################################################

@pytest.mark.slow
def test_held_out_real_scores_near_ceiling(runs):
    ident = runs["good"]["identity"]
    assert ident["real_val_top1"] >= 0.9
    assert ident["generated_top1"] >= ident["real_val_top1"] - 0.15
    assert runs["good"]["tstr_top1"] > 1 / len(USERS) + 0.2


@pytest.mark.slow
def test_noise_scores_near_chance_with_larger_fd(runs):
    good, noise = runs["good"], runs["noise"]
    assert noise["identity"]["generated_top1"] <= 0.5
    assert noise["fd"]["classifier"] > 5 * good["fd"]["classifier"]
    assert noise["kid"]["classifier"] > good["kid"]["classifier"]
    assert noise["manifold"]["generated"]["precision"] < good["manifold"]["generated"]["precision"]


@pytest.mark.slow
def test_copies_flagged_held_out_not(runs):
    assert runs["copies"]["memorization"]["copy_rate"] >= 0.9
    assert runs["good"]["memorization"]["copy_rate"] <= 0.1
    assert all(p["same_user"] for p in runs["copies"]["memorization"]["closest"])


@pytest.mark.slow
def test_classifier_cached_not_retrained(runs):
    # The judge, then in one pool its two sibling seeds, per seed the 3 arms of each regime, and TSTR per seed.
    assert runs["calls_first"][:3] == ["user classifier"] * 3
    assert runs["calls_first"][3:6] == ["all real seed 0", "all classical seed 0", "all generated seed 0"]
    assert runs["calls_first"][-2:] == ["tstr classical seed 0", "tstr classical seed 1"]
    assert len(runs["calls_first"]) == 3 + 6 + 6 + 2
    assert runs["calls"] == runs["calls_first"]            # later runs trained nothing
    assert runs["noise"]["classifier"]["cached"] and runs["copies"]["classifier"]["cached"]
    assert runs["cache"].stat().st_mtime_ns == runs["mtime"]
    assert runs["cache"].parent == runs["root"] / "data" / ".eval_cache"


@pytest.mark.slow
def test_report_files_and_keys(runs):
    out = runs["root"] / "out_good"
    report = json.loads((out / "report.json").read_text())
    for section, key in (("identity", "real_val_top1"), ("identity", "generated_top1"), ("fd", "classifier"),
                         ("memorization", "copy_rate")):
        assert isinstance(report[section][key], float)
    assert "tstr_top1" in report and report["inception"]["available"] is False
    assert set(report["identity"]["per_user"]) == {str(u) for u in USERS}
    md = (out / "report.md").read_text()
    assert "chance level" in md and "Inception FID/KID not computed" in md
    for name in report["plots"].values():
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_augmentation_adds_accepted_samples_to_real_train(runs):
    """The generated arm trains on the real train images (less the held-out fifth) + exactly the accepted
    samples."""
    good = runs["good"]
    aug = good["augmentation"]
    all_images = aug["regimes"]["all"]
    assert good["classifier"]["real_val_top1_over_seeds"]["per_seed"][0] == good["identity"]["real_val_top1"]
    assert aug["generated_images"] == good["export"]["accepted"] > 0
    # (fit, held-out, extra) images: a fifth of each user's real images held out (all of them, or 6 at low data).
    n = len(USERS)
    expected = {"all": (N_TRAIN * n - 3 * n, 3 * n), "low_data": (6 * n - 1 * n, 1 * n)}
    for desc, (n_fit, n_held, n_extra) in zip(runs["calls_first"], runs["sizes_first"]):
        if not desc.startswith("tstr"):
            assert (n_fit, n_held) == expected["low_data" if desc.startswith("low_data") else "all"], desc
            assert n_extra == (aug["generated_images"] if "generated" in desc else 0), desc
    # Held-out real images of the right users as "samples": adding them must not hurt a classifier.
    assert all_images["arms"]["generated"]["top1"] >= all_images["arms"]["classical"]["top1"] - 0.1
    assert aug["gain"] == pytest.approx(all_images["arms"]["generated"]["top1"] - all_images["arms"]["classical"]["top1"])
    md = (runs["root"] / "out_good" / "report.md").read_text()
    assert "augmentation gain" in md and runs["noise"]["augmentation"]["gain"] is None


@pytest.mark.slow
def test_headline_numbers_carry_intervals_that_contain_them(runs):
    good = runs["good"]
    ident, tstr, aug = good["identity"], good["tstr"], good["augmentation"]
    n_gen, n_val = len(USERS) * N_HELD_OUT, len(USERS) * N_VAL
    assert (ident["n_generated"], ident["n_real_val"]) == (n_gen, n_val)
    for value, interval in ((ident["generated_top1"], ident["generated_top1_ci"]),
                            (ident["real_val_top1"], ident["real_val_top1_ci"]),
                            (tstr["top1"], tstr["top1_ci"]), (aug["gain"], aug["gain_ci"])):
        assert interval[0] <= value <= interval[1]
    # The Wilson interval of exactly the counts the report scored.
    assert ident["generated_top1_ci"] == pytest.approx(
        wilson_interval(round(ident["generated_top1"] * n_gen), n_gen), abs=1e-12)
    lo, hi = ident["relative_to_ceiling_ci"]
    assert 0 <= lo <= hi and good["intervals"]["level"] == 0.95
    md = (runs["root"] / "out_good" / "report.md").read_text()
    assert f"[{ident['generated_top1_ci'][0]:.3f}, {ident['generated_top1_ci'][1]:.3f}]" in md


@pytest.mark.slow
def test_report_md_shows_no_empty_columns_no_top5_of_few_users_no_repeated_captions(runs):
    from evaluation.report import render_markdown
    good_md = (runs["root"] / "out_good" / "report.md").read_text()
    assert "| top-5 |" not in good_md                    # 4 users: top-5 is near 1 for any image
    # The table's caption says what TSTR and augmentation are; their notes are not repeated under it.
    assert "\n" + runs["good"]["tstr"]["note"] + "\n" not in good_md
    assert runs["good"]["augmentation"]["note"] not in good_md
    noise_md = (runs["root"] / "out_noise" / "report.md").read_text()
    assert "exported |" not in noise_md and "Not shown, no value for any user: exported" in noise_md
    assert "skipped (tstr=False)" in noise_md          # a missing number still says why
    # Too few samples per user for per-user FD/KID/PR: one line instead of columns of n/a.
    report = json.loads((runs["root"] / "out_good" / "report.json").read_text())
    for n in report["fd"]["per_user"]:
        report["fd"]["per_user"][n] = {"generated": None, "real_val": None}
        report["kid"]["per_user"][n] = {"generated": None, "real_val": None}
        report["manifold"]["per_user"][n] = {"generated": None, "real_val": None}
    md = render_markdown(report)
    per_user = md.split("## Per user")[1]
    assert "n/a" not in per_user.split("\n\n")[1]
    assert "Not shown, no value for any user: FD val, FD gen, KID gen, precision, recall" in per_user
    report["dataset"]["num_users"] = 12
    assert "| top-5 |" in render_markdown(report)


@pytest.mark.slow
def test_export_is_a_ready_dataset(runs):
    """export/train/<user> = real train + accepted samples; export/val/<user> = real val; stage 1 can read it."""
    export, root = runs["good"]["export"], runs["root"]
    generated = sorted((root / "export" / "train").glob("*/micro_doppler_user*.png"))
    assert len(generated) == export["total"] == export["accepted"] > 0
    for path in generated:
        user = int(path.name.split("_user")[1].split("_")[0])
        assert path.parent.name == f"ID_{user}"
    assert sum(export["per_user"].values()) == export["total"]
    users = scan_dataset(root / "export", log=lambda *_: None)
    assert [u.name for u in users] == [f"ID_{u}" for u in USERS]
    for user in users:
        real = sorted(p.name for p in (root / "data" / "train" / user.name).iterdir())
        assert set(real) <= {p.name for p in user.files["train"]}
        assert len(user.files["val"]) == N_VAL


def test_export_keeps_only_confident_own_user_and_clears_the_old_selection(tmp_path):
    users = []
    for n in (1, 2):
        (tmp_path / "real" / f"ID_{n}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "real" / f"ID_{n}" / "real.png")
        users.append(type("U", (), {"name": f"ID_{n}", "number": n,
                                    "files": {"train": [tmp_path / "real" / f"ID_{n}" / "real.png"], "val": []}})())
    files = []
    for k in range(4):
        files.append(tmp_path / _generated_name(1, k))
        Image.new("RGB", (8, 8)).save(files[-1])
    gen = load_set(files, [0, 0, 0, 0], 8, 8)
    probs = torch.tensor([[0.9, 0.1],      # confident, own user            -> kept
                          [0.1, 0.9],      # confident, other user          -> dropped
                          [0.52, 0.48],    # own user, margin 0.04 < 0.1    -> dropped
                          [0.95, 0.05]])   # confident but a training copy  -> dropped
    copies = torch.tensor([False, False, False, True])
    accepted, confident = accepted_samples(gen, probs, copies, 0.5, 0.1)
    assert accepted.tolist() == [True, False, False, False] and (confident & copies).sum() == 1
    # a band: the sample the judge is surest of (0.9) falls above 0.85; the copy stays out either way
    banded, _ = accepted_samples(gen, probs, copies, 0.5, 0.1, max_confidence=0.85)
    assert not banded.any()
    assert accepted_samples(gen, probs, copies, 0.5, 0.1, max_confidence=0.9)[0].tolist() == accepted.tolist()
    stale = tmp_path / "exp" / "train" / "ID_1" / _generated_name(1, 99)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    out = export_dataset(users, gen, accepted, tmp_path / "exp", log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "exp" / "train" / "ID_1").iterdir()) == [files[0].name, "real.png"]
    assert out["per_user"] == {"1": 1, "2": 0}


#################################################################################
#                                    Errors                                     #
#################################################################################

@pytest.mark.slow
def test_unknown_user_number_lists_valid_ones(dataset):
    root, dirs = dataset
    with pytest.raises(PipelineError, match=r"user number\(s\) 9.*Valid user numbers: 1, 2, 5, 7"):
        run_evaluate(root / "data", dirs["unknown"], root / "out_unknown")


@pytest.mark.slow
def test_no_generated_images_and_missing_folders(dataset, tmp_path):
    root, _ = dataset
    (tmp_path / "other.png").write_bytes(b"")
    with pytest.raises(PipelineError, match="no generated images named"):
        run_evaluate(root / "data", tmp_path, tmp_path / "out")
    with pytest.raises(PipelineError, match="--generated_dir not found"):
        run_evaluate(root / "data", tmp_path / "missing", tmp_path / "out")
    with pytest.raises(PipelineError, match="--data_dir not found"):
        run_evaluate(tmp_path / "missing", tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_cli_forwards_every_flag_and_exits_2_on_user_error(dataset, monkeypatch, capsys):
    import stage4_evaluate
    root, dirs = dataset
    seen = {}
    import evaluation.evaluate
    monkeypatch.setattr(evaluation.evaluate, "evaluate", lambda *a, **kw: seen.update(args=a, kwargs=kw))
    stage4_evaluate.main(["--data_dir", "d", "--generated_dir", "g", "--output_dir", "o", "--min_margin", "0.2"])
    options, = seen["args"]                     # the flags, whole
    assert isinstance(options, EvaluateOptions) and options.min_margin == 0.2 and options.data_dir == "d"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_info:
        stage4_evaluate.main(["--data_dir", str(root / "data"), "--generated_dir", str(dirs["unknown"]),
                              "--output_dir", str(root / "out_cli")])
    assert exit_info.value.code == 2 and "Valid user numbers" in capsys.readouterr().err


#################################################################################
#                            Classifier and cache                               #
#################################################################################

@pytest.mark.slow
def test_read_only_data_dir_caches_in_output_dir(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    users = scan_dataset(root / "data", log=lambda *_: None)
    files = [p for u in users for p in u.files["train"]][:4]
    real_save = clf.save_safetensors

    def refuse_data_dir(tensors, path, metadata=None):
        if str(path).startswith(str(root / "data")):
            raise PermissionError(13, "Read-only file system")
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(clf, "save_safetensors", refuse_data_dir)
    monkeypatch.setattr(clf, "train_judge", lambda *a, **kw: clf.Fit(clf.build_classifier(len(users)), 0, 0, None,
                                                                      False, 0.0))
    cfg = clf.ClassifierConfig(image_size=SIZE, size=SIZE, max_steps=1, seed=123)
    images, labels = torch.zeros(4, 3, SIZE, SIZE, dtype=torch.uint8), torch.arange(4)
    args = (root / "data", tmp_path, [u.name for u in users], files, images, labels, cfg, torch.device("cpu"))
    _, first = clf.load_or_train(*args, log=lambda *_: None)
    _, second = clf.load_or_train(*args, log=lambda *_: None)
    assert Path(first["path"]).parent == tmp_path / clf.CACHE_DIR
    assert not first["cached"] and second["cached"] and second["path"] == first["path"]


def test_cache_key_follows_file_content_not_size_or_mtime(tmp_path):
    data = tmp_path / "data"
    files = []
    for name, value in (("a.png", 10), ("b.png", 20)):
        (data / "train" / "ID_1").mkdir(parents=True, exist_ok=True)
        path = data / "train" / "ID_1" / name
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
        files.append(path)
    cfg = clf.ClassifierConfig(image_size=SIZE, size=SIZE, max_steps=1)
    key = lambda: clf.fingerprint(data, ["ID_1"], files, cfg)
    before, stat = key(), files[0].stat()
    # Another image of the same size, its mtime put back (rsync -t, an archive, a coarse clock).
    Image.fromarray(np.full((8, 8), 30, np.uint8)).save(files[0])
    assert files[0].stat().st_size == stat.st_size
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = key()
    assert changed != before
    os.utime(files[1], ns=(1, 1))                  # touched or copied, same content: the cache still fits
    assert key() == changed


@pytest.mark.slow
def test_training_is_deterministic_and_never_flips(dataset):
    root, _ = dataset
    users = scan_dataset(root / "data", log=lambda *_: None)
    files = [u.files["train"][0] for u in users] * 2
    images = load_set(files, [0, 1, 2, 3] * 2, SIZE, SIZE)
    cfg = clf.ClassifierConfig(image_size=SIZE, size=SIZE, batch_size=4, max_steps=2, seed=3)
    a = clf.train_classifier(images.images, images.labels, 4, cfg, torch.device("cpu"), desc="t").model
    b = clf.train_classifier(images.images, images.labels, 4, cfg, torch.device("cpu"), desc="t").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # Rolls only: each augmented row is a rotated copy, so the order along time is kept, never reversed.
    ramp = torch.arange(SIZE, dtype=torch.uint8).expand(4, 3, SIZE, SIZE).contiguous()
    rolled = A.augment(ramp, A.Classical(time_roll=0.5), torch.Generator().manual_seed(0))
    for row in rolled[:, 0, 0]:
        assert any(torch.equal(row, ramp[0, 0, 0].roll(k)) for k in range(SIZE))


@pytest.mark.slow
def test_inception_features_from_local_weights(dataset, tmp_path):
    import torchvision
    from evaluation.inception import inception_features, load_inception
    root, dirs = dataset
    weights = tmp_path / "inception.pt"
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), weights)
    model = load_inception(weights, torch.device("cpu"))
    feats = inception_features(model, sorted(dirs["held_out"].iterdir())[:2], SIZE, 2, 0, torch.device("cpu"), "t")
    assert feats.shape == (2, 2048)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(PipelineError, match="not a torchvision Inception-v3 state dict"):
        load_inception(tmp_path / "wrong.pt", torch.device("cpu"))


#################################################################################
#                         Metric functions on Gaussians                         #
#################################################################################

def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_frechet_distance():
    x = _gaussian(2000, 8, 0)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert M.frechet_distance(x, _gaussian(2000, 8, 1)) < 0.1
    delta = torch.arange(8, dtype=torch.float64) / 4
    assert M.frechet_distance(x, x + delta) == pytest.approx(float(delta.square().sum()), rel=1e-6)
    # Closed form: N(0, I) vs N(0, 4I) in d dims is d * (1 + 4 - 2 * 2) = d.
    eye = torch.eye(8, dtype=torch.float64)
    assert M.frechet_distance_stats(torch.zeros(8), eye, torch.zeros(8), 4 * eye) == pytest.approx(8.0)


def test_kid_and_inception_score():
    same = M.kernel_distance(_gaussian(300, 8, 0), _gaussian(300, 8, 1))[0]
    shifted = M.kernel_distance(_gaussian(300, 8, 0), _gaussian(300, 8, 1, shift=1.0))[0]
    assert abs(same) < 0.05 < shifted
    assert M.inception_score(50 * torch.eye(5).repeat(4, 1))[0] == pytest.approx(5.0, rel=1e-6)
    assert M.inception_score(torch.zeros(10, 5))[0] == pytest.approx(1.0)


def test_frechet_distance_is_exact_when_covariances_are_rank_deficient():
    # Per-user sets have fewer images than feature dims. Tr((C1 C2)^1/2) is then exactly the sum of the
    # singular values of A B^T / sqrt((n-1)(m-1)) (A, B the centred sets): a small, well-conditioned SVD.
    x, y = _gaussian(20, 256, 0).relu() * 30, _gaussian(23, 256, 1, shift=1.0).relu() * 30
    a, b = x - x.mean(0), y - y.mean(0)
    tr_root = torch.linalg.svdvals(a @ b.T).sum() / (19 * 22) ** 0.5
    exact = (x.mean(0) - y.mean(0)).square().sum() + a.square().sum() / 19 + b.square().sum() / 22 - 2 * tr_root
    assert M.frechet_distance(x, y) == pytest.approx(float(exact), rel=1e-7)   # float64 eigh round-off


def test_library_metrics_match_direct_computations():
    """KID, Inception Score, top-k and the confusion matrix come from torchmetrics: check them against the
    definitions written out in float64 (KID of equal-size sets uses all of them: no random subsets)."""
    x, y = _gaussian(50, 8, 0), _gaussian(50, 8, 1, shift=0.5)
    kxx, kyy, kxy = ((p @ q.T / 8 + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    mmd = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (50 * 49) - 2 * kxy.mean()
    assert M.kernel_distance(x, y) == pytest.approx((float(mmd), 0.0), rel=1e-12)
    # Subsets are seeded: the same seed gives the same number, and the std is the sample std over subsets.
    mean, std = M.kernel_distance(x, _gaussian(70, 8, 2), num_subsets=10, seed=3)
    assert M.kernel_distance(x, _gaussian(70, 8, 2), num_subsets=10, seed=3) == (mean, std) and std > 0
    logits = _gaussian(30, 6, 3) * 3
    p = logits.softmax(1)
    assert M.inception_score(logits)[0] == pytest.approx(
        float((p * (p.log() - p.mean(0).log())).sum(1).mean().exp()), rel=1e-12)
    labels = torch.tensor([0, 1, 2, 2, 1])
    scores = torch.tensor([[.9, .1, 0], [.5, .3, .2], [.1, .2, .7], [.4, .5, .1], [.1, .8, .1]])
    assert M.topk_accuracy(scores, labels, 1) == 3 / 5 and M.topk_accuracy(scores, labels, 2) == 4 / 5
    assert M.topk_accuracy(scores, labels, 9) == 1.0 and M.topk_accuracy(scores[:0], labels[:0], 1) is None
    assert M.confusion_matrix(labels, scores.argmax(1), 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert M.topk_accuracy(scores[:, :1], labels * 0, 1) == 1.0                 # one user
    assert M.confusion_matrix(labels * 0, labels * 0, 1).tolist() == [[5]]


def test_precision_recall_density_coverage():
    real, same, far = _gaussian(500, 4, 0), _gaussian(500, 4, 1), _gaussian(500, 4, 2, shift=20.0)
    pr, dc = M.precision_recall(real, same, 3), M.density_coverage(real, same, 3)
    assert pr["precision"] > 0.8 and pr["recall"] > 0.8
    assert 0.7 < dc["density"] < 1.3 and dc["coverage"] > 0.8
    pr, dc = M.precision_recall(real, far, 3), M.density_coverage(real, far, 3)
    assert pr["precision"] < 0.05 and pr["recall"] < 0.05 and dc["density"] < 0.05 and dc["coverage"] < 0.05
    assert M.precision_recall(real[:3], same, 3) is None


def test_diversity_and_nearest_neighbours():
    x = _gaussian(200, 4, 0)
    assert M.mean_pairwise_distance(x * 0.1) == pytest.approx(0.1 * M.mean_pairwise_distance(x))
    d, i = M.nearest_neighbours(x[:5] + 1e-9, x)
    assert torch.equal(i, torch.arange(5)) and (d < 1e-6).all()
    d, i = M.nearest_neighbours(x, x, exclude_self=True)
    assert not torch.equal(i, torch.arange(200)) and (d > 0).all()


#################################################################################
#                 The tokenizer's ceiling (--vavae_path)                        #
#################################################################################

@pytest.mark.slow
def test_tokenizer_reconstructions_are_scored_like_real_val(dataset, tmp_path, monkeypatch):
    from helpers import make_tokenizer
    import models.vavae
    root, dirs = dataset
    tokenizer = make_tokenizer(tmp_path / "tok.safetensors")
    fast = dict(tstr=False, augmentation=False)
    real = run_evaluate(root / "data", dirs["held_out"], tmp_path / "real", vavae_path=tokenizer, **fast)
    recon = real["identity"]["tokenizer_reconstructions"]
    assert 0.0 <= recon["top1"] <= 1.0 and 0.0 < recon["psnr_db"] < 40.0        # an untrained tokenizer
    assert "tokenizer's own reconstructions" in (tmp_path / "real" / "report.md").read_text()
    # A perfect tokenizer gives back the val images themselves: exactly the real-val ceiling.
    monkeypatch.setattr(models.vavae, "reconstruct", lambda model, images, *a, **k: images.clone())
    perfect = run_evaluate(root / "data", dirs["held_out"], tmp_path / "perfect", vavae_path=tokenizer, **fast)
    assert perfect["identity"]["tokenizer_reconstructions"]["top1"] == perfect["identity"]["real_val_top1"]
    assert perfect["identity"]["tokenizer_reconstructions"]["psnr_db"] > 100
    with pytest.raises(PipelineError, match="--vavae_path not found"):
        run_evaluate(root / "data", dirs["held_out"], tmp_path / "x", vavae_path=tmp_path / "missing.pt", **fast)


#################################################################################
#                      Intervals and comparing two runs                         #
#################################################################################

def test_wilson_interval_known_values_and_narrows_with_n():
    # Wilson score intervals at 95 % as scipy.stats.binomtest(k, n).proportion_ci(method="wilson") gives them, to 4 digits.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) is None
    widths = [hi - lo for lo, hi in (wilson_interval(3 * n // 10, n) for n in (10, 40, 160, 640))]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    # At large n the width is the normal one, 2 z sqrt(p (1 - p) / n): 4x the images, half the width.
    assert widths[-2] / widths[-1] == pytest.approx(2.0, rel=0.02)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_intervals_are_seeded_and_centred():
    from evaluation.intervals import paired_difference_interval, ratio_interval
    rng = np.random.default_rng(0)
    before = rng.random(200) < 0.5
    assert paired_difference_interval(before, before) == (0.0, 0.0)         # the same verdicts: no gain at all
    after = before | (rng.random(200) < 0.3)                                 # only ever fixes mistakes
    lo, hi = paired_difference_interval(after, before, seed=1)
    assert 0 < lo <= (after.mean() - before.mean()) <= hi
    assert paired_difference_interval(after, before, seed=1) == (lo, hi)    # fixed seed, same interval
    gen, val = rng.random(120) < 0.3, rng.random(60) < 0.9
    lo, hi = ratio_interval(gen, val)
    assert lo < gen.mean() / val.mean() < hi and hi - lo < 0.4


def _report(generated: float, interval: list[float]) -> dict:
    return {"identity": {"generated_top1": generated, "generated_top1_ci": interval}}


def test_compare_says_within_noise_for_overlap_and_differs_for_separated(tmp_path, capsys):
    from evaluation.compare import compare, main
    base = _report(0.30, [0.22, 0.39])
    assert compare(base, _report(0.36, [0.28, 0.45]))[0]["verdict"] == "within noise"
    assert compare(base, _report(0.55, [0.46, 0.64]))[0]["verdict"] == "differs"
    assert compare(base, {"identity": {"generated_top1": 0.5}})[0]["verdict"] == "no interval"   # an older report
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "report.json").write_text(json.dumps(_report(0.55, [0.46, 0.64])))
    main([str(tmp_path / "a.json"), str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "0.300 [0.220, 0.390]" in out and "0.550 [0.460, 0.640]" in out and "differs" in out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "missing.json not found" in capsys.readouterr().err


@pytest.mark.slow
def test_stage4_compare_to_prints_both_runs(runs, monkeypatch, tmp_path, capsys):
    import evaluation.evaluate
    import stage4_evaluate
    root = runs["root"]
    monkeypatch.setattr(evaluation.evaluate, "evaluate", lambda *a, **kw: runs["noise"])   # the run itself is tested above
    stage4_evaluate.main(["--data_dir", "d", "--generated_dir", "g", "--output_dir", "o",
                          "--compare_to", str(root / "out_good")])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("identity: generated top-1"))
    assert line.endswith("differs")          # held-out real images vs noise: far beyond the noise of 24 samples
    with pytest.raises(SystemExit) as exit_info:     # a wrong path fails before any work
        stage4_evaluate.main(["--data_dir", "d", "--generated_dir", "g", "--output_dir", "o",
                              "--compare_to", str(tmp_path / "none.json")])
    assert exit_info.value.code == 2
