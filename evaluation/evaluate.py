"""Stage 4: does a generated image look real, and does it look like the right person?

evaluate() is the whole stage: the CLI (stage4_evaluate.py) and the orchestrator both call it.
"""
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.device import bf16_supported, resolve_device
from common.errors import PipelineError
from common.io import atomic_path
from common.pixels import psnr_db, to_float, to_uint8
from data.images import User, load_bank, scan_dataset
from evaluation import classifier as clf
from evaluation import metrics as M
from evaluation.imageset import ImageSet, load_set, resize
from evaluation.report import write_outputs
from data.samples import IMAGE_PATTERN, remove_stale_samples

REPORT_VERSION = 1


#################################################################################
#                                   Inputs                                      #
#################################################################################

def scan_generated(generated_dir: str | Path, users: list[User]) -> list[tuple[Path, int]]:
    """(file, user number) of every micro_doppler_userNN_KKK.png, sorted by user then sample number."""
    root = Path(generated_dir)
    if not root.is_dir():
        raise PipelineError(f"--generated_dir not found: {root}. Point it at the folder stage 3 wrote "
                            "its micro_doppler_userNN_KKK.png files into.")
    found, others = [], []
    for path in root.iterdir():
        match = IMAGE_PATTERN.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), int(match.group(2)), path))
        elif path.is_file():
            others.append(path.name)
    if not found:
        seen = f" It holds {len(others)} other file(s), e.g. {', '.join(sorted(others)[:3])}." if others else " It is empty."
        raise PipelineError(f"no generated images named micro_doppler_userNN_KKK.png in {root}.{seen} "
                            "Run stage 3 (generation) first or point --generated_dir at its output.")
    valid = {u.number for u in users}
    unknown = sorted({n for n, _, _ in found if n not in valid})
    if unknown:
        raise PipelineError(f"{root} has generated images for user number(s) {', '.join(map(str, unknown))}, "
                            f"which are not in the data folder. Valid user numbers: "
                            f"{', '.join(str(n) for n in sorted(valid))}. Use the --data_dir the model was trained on.")
    found.sort()
    return [(path, number) for number, _, path in found]


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#################################################################################
#                                 Metric blocks                                 #
#################################################################################

def _identity(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    probs = logits.softmax(1)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(M.topk_accuracy(logits[mask], labels[mask], 1))
    return {
        "top1": M.topk_accuracy(logits, labels, 1),
        "top5": M.topk_accuracy(logits, labels, 5),
        "mean_confidence": float(probs.max(1).values.mean()) if len(labels) else None,
        "per_class": per_class,
        "confusion": M.confusion_matrix(labels, logits.argmax(1), num_classes).tolist(),
    }


def _pair_metrics(real: torch.Tensor, fake: torch.Tensor, k: int, seed: int, kid_scale: float) -> dict:
    """FD, KID, precision/recall and density/coverage of one (reference, candidate) pair.

    KID sees the features divided by `kid_scale` (the real train features' RMS coordinate): the
    cubic kernel (x.y/d + 1)^3 assumes x.y/d of order one, and the raw ReLU features of a
    from-scratch classifier are far larger, which makes KID explode and its sign meaningless.
    """
    kid = M.kernel_distance(real / kid_scale, fake / kid_scale, seed=seed)
    out = {"fd": M.frechet_distance(real, fake) if min(len(real), len(fake)) >= 2 else None,
           "kid": kid[0] if kid else None, "kid_std": kid[1] if kid else None}
    out.update(M.precision_recall(real, fake, k) or {"precision": None, "recall": None})
    out.update(M.density_coverage(real, fake, k) or {"density": None, "coverage": None})
    return out


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q))


def memorization_report(gen: ImageSet, gen_feats: torch.Tensor, train: ImageSet, train_feats: torch.Tensor,
                        val: ImageSet, val_feats: torch.Tensor, percentile: float, factor: float,
                        users: list[User], show: int = 8) -> tuple[dict, torch.Tensor, list[tuple[int, int]]]:
    """Nearest training image of every sample, in pixel and feature space, and the copy flags.

    Returns (report block, copy flag per sample, (sample, nearest train image) index pairs to plot).

    Rule: a sample is a copy when, in either view, it is closer to a training image than
    `factor` times the `percentile`-th percentile of real-val -> train nearest-neighbour
    distances. Genuine unseen images of the same people set the scale, so the threshold adapts
    to how self-similar the data already is (consecutive windows of one recording are close);
    the percentile and the factor < 1 put it below practically every genuine image, so what
    is flagged is closer to a training image than real new data ever is.
    """
    have_val = len(val) > 0
    views = {"pixel": (gen.thumbs, train.thumbs, val.thumbs), "feature": (gen_feats, train_feats, val_feats)}
    out: dict = {"rule": (f"copy if the nearest-training-image distance (pixel view at 32px or classifier-feature "
                          f"view) is <= {factor} x percentile {percentile:g} of the real-val-to-train "
                          f"nearest-neighbour distances"),
                 "percentile": percentile, "factor": factor,
                 "reference": "real val -> train" if have_val else "real train -> train (leave-one-out; no val images)"}
    flags = torch.zeros(len(gen), dtype=torch.bool)
    ratios = []
    nearest = {}
    for view, (g, t, v) in views.items():
        if have_val:
            ref, _ = M.nearest_neighbours(v, t)
        else:
            ref, _ = M.nearest_neighbours(t, t, exclude_self=True)
        threshold = factor * _quantile(ref, percentile / 100)
        dist, index = M.nearest_neighbours(g, t)
        flagged = dist <= threshold
        flags |= flagged
        # Distance in units of the threshold: < 1 is a copy; used to rank the closest pairs.
        ratios.append(dist / max(threshold, 1e-12))
        nearest[view] = (dist, index)
        out[view] = {"threshold": threshold, "copy_rate": float(flagged.double().mean()),
                     "generated_median_nn": _quantile(dist, 0.5), "real_median_nn": _quantile(ref, 0.5),
                     "median_ratio": _quantile(dist, 0.5) / max(_quantile(ref, 0.5), 1e-12)}
    out["copy_rate"] = float(flags.double().mean())
    out["num_copies"] = int(flags.sum())
    out["per_user"] = {}
    for c, user in enumerate(users):
        mask = gen.labels == c
        out["per_user"][str(user.number)] = float(flags[mask].double().mean()) if mask.any() else None
    score = torch.minimum(*ratios)
    pix_d, pix_i = nearest["pixel"]
    feat_d, feat_i = nearest["feature"]
    closest = []
    for i in score.argsort()[:show].tolist():
        closest.append({"generated": str(gen.paths[i]), "train_pixel": str(train.paths[pix_i[i]]),
                        "train_feature": str(train.paths[feat_i[i]]),
                        "pixel_distance": float(pix_d[i]), "feature_distance": float(feat_d[i]),
                        "same_user": bool(train.labels[pix_i[i]] == gen.labels[i]),
                        "copy": bool(flags[i])})
    out["closest"] = closest
    pairs = [(i, int(pix_i[i])) for i in score.argsort()[:show].tolist()]
    return out, flags, pairs


def accepted_samples(gen: ImageSet, probs: torch.Tensor, copies: torch.Tensor, min_confidence: float,
                     min_margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted, confident) masks: samples the classifier confidently gives their own user, minus copies.

    Copies of training images are left out: they would add nothing but duplicates.
    """
    top2 = probs.topk(min(2, probs.shape[1]), dim=1)
    p1 = top2.values[:, 0]
    p2 = top2.values[:, 1] if probs.shape[1] > 1 else torch.zeros_like(p1)
    confident = (top2.indices[:, 0] == gen.labels) & (p1 >= min_confidence) & (p1 - p2 >= min_margin)
    return confident & ~copies, confident


def _copy_into(files: list[Path], folder: Path) -> None:
    for path in files:
        with atomic_path(folder / path.name) as tmp:
            shutil.copyfile(path, tmp)


def export_dataset(users: list[User], gen: ImageSet, accepted: torch.Tensor, export_dir: Path,
                   log: Callable[[str], None]) -> dict:
    """export_dir/train/<user>/ = real train images + accepted samples, export_dir/val/<user>/ = real val.

    The result is a ready dataset for a user's own classifier and for stage 1. Samples keep their
    micro_doppler_userNN_KKK.png names, so they stay recognisable; the previous export's samples are
    removed first, so a rerun with other thresholds leaves exactly the new selection.
    """
    per_user = {}
    for c, user in enumerate(users):
        train_folder, val_folder = export_dir / "train" / user.name, export_dir / "val" / user.name
        if train_folder.is_dir():
            remove_stale_samples(train_folder)
        chosen = (accepted & (gen.labels == c)).nonzero().flatten().tolist()
        _copy_into(list(user.files["train"]) + [gen.paths[i] for i in chosen], train_folder)
        if user.files.get("val"):
            _copy_into(list(user.files["val"]), val_folder)
        per_user[str(user.number)] = len(chosen)
    total = int(accepted.sum())
    log(f"export: real train + {total} of {len(gen)} generated images in {export_dir / 'train'}, real val in "
        f"{export_dir / 'val'}")
    return {"total": total, "per_user": per_user}


#################################################################################
#                                 Report steps                                  #
#################################################################################

@dataclass
class Inputs:
    """The three image sets of an evaluation and the users they belong to."""
    users: list[User]
    train: ImageSet
    val: ImageSet
    gen: ImageSet
    notes: list[str]


def load_inputs(data_dir: Path, generated_dir: str | Path, image_size: int, classifier_size: int, batch_size: int,
                num_workers: int, log: Callable[[str], None]) -> Inputs:
    """Real train/val images of every user and the generated samples, decoded once."""
    users = scan_dataset(data_dir, log=log)
    generated = scan_generated(generated_dir, users)
    index_of = {u.number: c for c, u in enumerate(users)}

    def split(name: str) -> tuple[list[Path], list[int]]:
        pairs = [(p, c) for c, u in enumerate(users) for p in u.files.get(name, [])]
        return [p for p, _ in pairs], [c for _, c in pairs]

    log(f"loading {sum(len(u.files['train']) for u in users)} train, {sum(len(u.files['val']) for u in users)} val "
        f"and {len(generated)} generated images ({len(users)} users)")
    train = load_set(*split("train"), image_size, classifier_size, batch_size, num_workers)
    val = load_set(*split("val"), image_size, classifier_size, batch_size, num_workers)
    gen = load_set([p for p, _ in generated], [index_of[n] for _, n in generated], image_size,
                   classifier_size, batch_size, num_workers)
    if len(gen) == 0:
        raise PipelineError(f"none of the {len(generated)} generated images in {generated_dir} could be read.")
    notes = []
    if len(val) == 0:
        notes.append("The data folder has no readable val images: the identity ceiling, the real-val baselines, "
                     "TSTR and the augmentation gain are unavailable, and the copy threshold is calibrated on train "
                     "leave-one-out.")
    return Inputs(users, train, val, gen, notes)


def identity_report(data: Inputs, train_logits: torch.Tensor, val_logits: torch.Tensor,
                    gen_logits: torch.Tensor) -> dict:
    """Is each sample recognised as its user, against real val images as the ceiling?"""
    num_classes = len(data.users)
    id_val = _identity(val_logits, data.val.labels, num_classes)
    id_gen = _identity(gen_logits, data.gen.labels, num_classes)
    return {
        "real_val_top1": id_val["top1"], "real_val_top5": id_val["top5"],
        "generated_top1": id_gen["top1"], "generated_top5": id_gen["top5"],
        "relative_to_ceiling": (id_gen["top1"] / id_val["top1"]) if id_val["top1"] else None,
        "real_train_top1": M.topk_accuracy(train_logits, data.train.labels, 1), "chance": 1.0 / num_classes,
        "real_val_mean_confidence": id_val["mean_confidence"], "generated_mean_confidence": id_gen["mean_confidence"],
        "per_user": {str(u.number): {"real_val_top1": id_val["per_class"][c], "generated_top1": id_gen["per_class"][c]}
                     for c, u in enumerate(data.users)},
        "confusion_labels": [u.number for u in data.users],
        "confusion_generated": id_gen["confusion"], "confusion_real_val": id_val["confusion"],
    }


def distribution_report(data: Inputs, train_feats: torch.Tensor, val_feats: torch.Tensor, gen_feats: torch.Tensor,
                        gen_logits: torch.Tensor, val_logits: torch.Tensor, nearest_k: int, seed: int,
                        min_user_samples: int) -> dict:
    """FD, KID, precision/recall, density/coverage, Inception Score and diversity in classifier features."""
    users, train, val, gen = data.users, data.train, data.val, data.gen
    kid_scale = float(train_feats.double().square().mean().sqrt().clamp(min=1e-12))
    overall_gen = _pair_metrics(train_feats, gen_feats, nearest_k, seed, kid_scale)
    overall_val = _pair_metrics(train_feats, val_feats, nearest_k, seed, kid_scale) if len(val) else {}
    per_user, skipped = {}, []
    for c, user in enumerate(users):
        t, g, v = train_feats[train.labels == c], gen_feats[gen.labels == c], val_feats[val.labels == c]
        row = {"n_train": len(t), "n_val": len(v), "n_generated": len(g)}
        if min(len(t), len(g)) >= min_user_samples:
            row["generated"] = _pair_metrics(t, g, nearest_k, seed, kid_scale)
        else:
            row["generated"] = None
            skipped.append(user.number)
        row["real_val"] = _pair_metrics(t, v, nearest_k, seed, kid_scale) if min(len(t), len(v)) >= min_user_samples else None
        d = {"generated": M.mean_pairwise_distance(g), "real_train": M.mean_pairwise_distance(t),
             "real_val": M.mean_pairwise_distance(v)}
        d["ratio"] = d["generated"] / d["real_train"] if d["generated"] and d["real_train"] else None
        d["real_val_ratio"] = d["real_val"] / d["real_train"] if d["real_val"] and d["real_train"] else None
        row["diversity"] = d
        per_user[str(user.number)] = row
    notes = []
    if skipped:
        notes.append(f"Per-user FD/KID/precision/recall skipped for user(s) {', '.join(map(str, skipped))}: fewer than "
                     f"{min_user_samples} generated or train images (--min_user_samples).")
    notes.append("Per-user FD in 512-d features from ~100 samples is biased upward (it grows as samples shrink); "
                 "compare it only with the real-val row or runs with the same counts. KID is unbiased for "
                 "independent draws; with few, exactly balanced samples per user it can dip slightly below 0.")
    ratios = [r["diversity"]["ratio"] for r in per_user.values() if r["diversity"]["ratio"] is not None]
    val_ratios = [r["diversity"]["real_val_ratio"] for r in per_user.values() if r["diversity"]["real_val_ratio"] is not None]

    def per(key: str) -> dict:
        return {n: {"generated": r["generated"][key] if r["generated"] else None,
                    "real_val": r["real_val"][key] if r["real_val"] else None} for n, r in per_user.items()}

    manifold_keys = ("precision", "recall", "density", "coverage")
    is_gen = M.inception_score(gen_logits.softmax(1))
    is_val = M.inception_score(val_logits.softmax(1)) if len(val) else None
    return {
        "fd": {"classifier": overall_gen["fd"], "classifier_real_val": overall_val.get("fd"), "per_user": per("fd")},
        "kid": {"classifier_feature_scale": kid_scale, "classifier": overall_gen["kid"],
                "classifier_std": overall_gen["kid_std"], "classifier_real_val": overall_val.get("kid"),
                "per_user": per("kid")},
        "manifold": {"k": nearest_k, "space": "classifier features (512-d)", "reference": "real train",
                     "generated": {k: overall_gen[k] for k in manifold_keys},
                     "real_val": {k: overall_val.get(k) for k in manifold_keys},
                     "per_user": {n: {"generated": {k: r["generated"][k] for k in manifold_keys} if r["generated"] else None,
                                      "real_val": {k: r["real_val"][k] for k in manifold_keys} if r["real_val"] else None}
                                  for n, r in per_user.items()}},
        "inception_score": {"generated": is_gen[0] if is_gen else None, "real_val": is_val[0] if is_val else None,
                            "max": len(users), "classifier": "user classifier (not Inception-v3)"},
        "diversity": {"space": "classifier features (512-d)", "mean_ratio": float(np.mean(ratios)) if ratios else None,
                      "real_val_mean_ratio": float(np.mean(val_ratios)) if val_ratios else None,
                      "per_user": {n: r["diversity"] for n, r in per_user.items()}},
        "notes": notes,
    }


def inception_report(data: Inputs, inception_weights: str | Path | None, image_size: int, batch_size: int,
                     num_workers: int, dev: torch.device, seed: int) -> dict:
    """Standard Inception-v3 FID/KID when a local weights file is given (nothing is downloaded)."""
    if inception_weights is None:
        return {"available": False, "weights": None, "fd": None, "fd_real_val": None, "kid": None, "kid_real_val": None,
                "message": "Inception FID/KID not computed: no --inception_weights given (nothing is downloaded)."}
    from evaluation.inception import inception_features, load_inception
    net = load_inception(inception_weights, dev)
    feats = {name: inception_features(net, s.paths, image_size, batch_size, num_workers, dev, name)
             for name, s in (("train", data.train), ("val", data.val), ("generated", data.gen)) if len(s)}
    kid = M.kernel_distance(feats["train"], feats["generated"], seed=seed)
    kid_val = M.kernel_distance(feats["train"], feats["val"], seed=seed) if "val" in feats else None
    return {"available": True, "weights": str(inception_weights),
            "fd": M.frechet_distance(feats["train"], feats["generated"]),
            "fd_real_val": M.frechet_distance(feats["train"], feats["val"]) if "val" in feats else None,
            "kid": kid[0] if kid else None, "kid_real_val": kid_val[0] if kid_val else None,
            "message": "Inception-v3 pool features (2048-d), 299x299 bilinear, reference = real train."}


def tstr_report(data: Inputs, cfg: clf.ClassifierConfig, dev: torch.device, batch_size: int,
                real_top1: float | None) -> dict:
    """Train on synthetic, test on real: the classifier trained on generated images only, tested on real val."""
    if len(data.val) == 0 or len(data.gen) < 2:
        return {"top1": None, "note": "skipped: needs val images and at least two generated images"}
    # Same number of optimizer steps as the real classifier, so the two differ only in the data.
    steps = clf.steps_for(len(data.train), cfg)
    synth = clf.train_classifier(data.gen.images, data.gen.labels, len(data.users), cfg, dev, steps=steps, desc="TSTR")
    tstr_id = _identity(clf.extract(synth, data.val.images, batch_size, dev)[1], data.val.labels, len(data.users))
    return {"top1": tstr_id["top1"], "top5": tstr_id["top5"], "steps": steps, "real_classifier_top1": real_top1,
            "per_user": {str(u.number): tstr_id["per_class"][c] for c, u in enumerate(data.users)},
            "note": "trained on generated images only, tested on real val"}


def augmentation_report(data: Inputs, accepted: torch.Tensor, cfg: clf.ClassifierConfig, dev: torch.device,
                        batch_size: int, real_only_top1: float | None) -> dict:
    """What users want most: does adding the accepted samples to the real train images help a classifier?

    The real-only classifier is the judge itself; the augmented one is the same architecture, seed and
    number of optimizer steps on real train + accepted samples, so the two differ only in the data.
    """
    if len(data.val) == 0:
        return {"real_only_top1": None, "with_generated_top1": None, "gain": None, "note": "skipped: no val images"}
    extra = data.gen.select(accepted)
    if len(extra) == 0:
        return {"real_only_top1": real_only_top1, "with_generated_top1": real_only_top1, "gain": 0.0,
                "generated_images": 0, "note": "no generated image passed the filter: nothing to add"}
    steps = clf.steps_for(len(data.train), cfg)
    model = clf.train_classifier(torch.cat([data.train.images, extra.images]),
                                 torch.cat([data.train.labels, extra.labels]), len(data.users), cfg, dev,
                                 steps=steps, desc="real + generated")
    top1 = M.topk_accuracy(clf.extract(model, data.val.images, batch_size, dev)[1], data.val.labels, 1)
    return {"real_only_top1": real_only_top1, "with_generated_top1": top1,
            "gain": top1 - real_only_top1 if real_only_top1 is not None else None,
            "generated_images": len(extra), "real_images": len(data.train), "steps": steps,
            "note": "same classifier, seed and steps; real train alone vs real train + accepted samples, tested on real val"}


#################################################################################
#                                   Evaluate                                    #
#################################################################################

def tokenizer_report(data: Inputs, vavae_path: str | Path, image_size: int, classifier_size: int,
                     model: torch.nn.Module, batch_size: int, dev: torch.device) -> dict:
    """Identity of the tokenizer's reconstructions of the real val images: a generator's samples are decoded by
    the same tokenizer, so this, not the real-val top-1, is the most they can reach."""
    from models.vavae import load_vavae, reconstruct
    if len(data.val) == 0:
        return {"top1": None, "psnr_db": None, "note": "no readable val images"}
    bank = load_bank(data.val.paths, image_size, log=lambda *_: None)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16_supported(dev) else nullcontext
    recon = reconstruct(load_vavae(vavae_path, device=dev), bank, autocast=autocast)
    logits = clf.extract(model, to_uint8(resize(to_float(recon), classifier_size)), batch_size, dev)[1]
    return {"top1": _identity(logits, data.val.labels, len(data.users))["top1"],
            "psnr_db": psnr_db(recon, bank).mean().item(), "tokenizer": str(vavae_path)}


def evaluate(data_dir: str | Path, generated_dir: str | Path, output_dir: str | Path, *,
             image_size: int = 256, batch_size: int = 64, device: str = "auto", classifier_epochs: int = 10,
             classifier_size: int = 128, seed: int = 0, inception_weights: str | Path | None = None,
             export_dir: str | Path | None = None, min_confidence: float = 0.5, min_margin: float = 0.1,
             num_workers: int = 0, nearest_k: int = 3, min_user_samples: int = 10,
             copy_percentile: float = 1.0, copy_factor: float = 0.5, tstr: bool = True, augmentation: bool = True,
             vavae_path: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Score generated spectrograms against the real data; write report.json, report.md and plots.

    Returns the report (the dict written to output_dir/report.json).
    """
    timing: dict[str, float] = {}
    tick = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise PipelineError(f"--inception_weights not found: {inception_weights}. Give a local torchvision "
                            "Inception-v3 state dict, or leave the flag out to skip Inception FID/KID.")
    if vavae_path is not None and not Path(vavae_path).is_file():
        raise PipelineError(f"--vavae_path not found: {vavae_path}. Give the tokenizer stage 1 used, or leave the "
                            "flag out to skip the tokenizer ceiling.")
    if classifier_size > image_size:
        log(f"note: --classifier_size {classifier_size} > --image_size {image_size}; using {image_size}")
        classifier_size = image_size
    data = load_inputs(data_dir, generated_dir, image_size, classifier_size, batch_size, num_workers, log)
    output_dir.mkdir(parents=True, exist_ok=True)
    _set_seed(seed)
    dev = resolve_device(device)
    timing["load"] = time.perf_counter() - tick

    tick = time.perf_counter()
    cfg = clf.ClassifierConfig(image_size=image_size, size=classifier_size, epochs=classifier_epochs,
                               batch_size=batch_size, seed=seed)
    model, clf_info = clf.load_or_train(data_dir, output_dir, [u.name for u in data.users], data.train.paths,
                                        data.train.images, data.train.labels, cfg, dev, log)
    train_feats, train_logits = clf.extract(model, data.train.images, batch_size, dev)
    val_feats, val_logits = clf.extract(model, data.val.images, batch_size, dev)
    gen_feats, gen_logits = clf.extract(model, data.gen.images, batch_size, dev)
    timing["classifier"] = time.perf_counter() - tick

    identity = identity_report(data, train_logits, val_logits, gen_logits)
    if vavae_path is not None:
        tick = time.perf_counter()
        identity["tokenizer_reconstructions"] = tokenizer_report(data, vavae_path, image_size, classifier_size,
                                                                 model, batch_size, dev)
        timing["tokenizer"] = time.perf_counter() - tick
    tick = time.perf_counter()
    dist = distribution_report(data, train_feats, val_feats, gen_feats, gen_logits, val_logits, nearest_k, seed,
                               min_user_samples)
    timing["metrics"] = time.perf_counter() - tick
    memo, copies, nearest_pairs = memorization_report(data.gen, gen_feats, data.train, train_feats, data.val,
                                                      val_feats, copy_percentile, copy_factor, data.users)
    tick = time.perf_counter()
    inception = inception_report(data, inception_weights, image_size, batch_size, num_workers, dev, seed)
    if not inception["available"]:
        log(inception["message"])
    timing["inception"] = time.perf_counter() - tick

    tick = time.perf_counter()
    tstr_block = tstr_report(data, cfg, dev, batch_size, identity["real_val_top1"]) if tstr else \
        {"top1": None, "note": "skipped (tstr=False)"}
    timing["tstr"] = time.perf_counter() - tick

    accepted, confident = accepted_samples(data.gen, gen_logits.softmax(1), copies, min_confidence, min_margin)
    tick = time.perf_counter()
    augment = augmentation_report(data, accepted, cfg, dev, batch_size, identity["real_val_top1"]) if augmentation \
        else {"real_only_top1": None, "with_generated_top1": None, "gain": None, "note": "skipped (augmentation=False)"}
    timing["augmentation"] = time.perf_counter() - tick

    export = {"enabled": export_dir is not None, "dir": str(export_dir) if export_dir else None,
              "min_confidence": min_confidence, "min_margin": min_margin, "of": len(data.gen),
              "accepted": int(accepted.sum()), "excluded_as_copies": int((confident & copies).sum())}
    if export_dir is not None:
        export.update(export_dataset(data.users, data.gen, accepted, Path(export_dir), log))

    num_classes = len(data.users)
    report = {
        "version": REPORT_VERSION,
        "inputs": {"data_dir": str(data_dir), "generated_dir": str(generated_dir), "output_dir": str(output_dir),
                   "image_size": image_size, "classifier_size": classifier_size, "batch_size": batch_size,
                   "device": str(dev), "classifier_epochs": classifier_epochs, "seed": seed,
                   "nearest_k": nearest_k, "min_user_samples": min_user_samples},
        "dataset": {"num_users": num_classes, "chance": 1.0 / num_classes,
                    "users": [{"number": u.number, "name": u.name, "n_train": int((data.train.labels == c).sum()),
                               "n_val": int((data.val.labels == c).sum()), "n_generated": int((data.gen.labels == c).sum())}
                              for c, u in enumerate(data.users)]},
        "classifier": {"arch": "resnet18", "resolution": classifier_size, "epochs": classifier_epochs, **clf_info},
        "identity": identity,
        "fd": {**dist["fd"], "inception": inception["fd"], "inception_real_val": inception["fd_real_val"]},
        "kid": {**dist["kid"], "inception": inception["kid"], "inception_real_val": inception["kid_real_val"]},
        "inception_score": dist["inception_score"], "manifold": dist["manifold"], "diversity": dist["diversity"],
        "memorization": memo,
        "inception": {k: inception[k] for k in ("available", "weights", "message")},
        "tstr_top1": tstr_block["top1"], "tstr": tstr_block, "augmentation": augment, "export": export,
        "notes": data.notes + dist["notes"], "timing": timing,
    }
    report = write_outputs(report, output_dir, data.users, data.train, data.gen, nearest_pairs)
    log(f"report: {output_dir / 'report.md'}")
    return report
