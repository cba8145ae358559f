"""Stage 4: does a generated image look real, and does it look like the right person?

evaluate() is the whole stage: the CLI (stage4_evaluate.py) and the orchestrator both call it.
"""
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.device import resolve_device
from common.errors import PipelineError
from common.io import atomic_path
from data.images import User, scan_dataset
from evaluation import classifier as clf
from evaluation import metrics as M
from evaluation.imageset import ImageSet, load_set
from evaluation.report import write_outputs
from generation.generate import IMAGE_PATTERN, remove_stale_samples

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


def _memorization(gen: ImageSet, gen_feats: torch.Tensor, train: ImageSet, train_feats: torch.Tensor,
                  val: ImageSet, val_feats: torch.Tensor, percentile: float, factor: float,
                  users: list[User], show: int = 8) -> dict:
    """Nearest training image of every sample, in pixel and feature space, and the copy flags.

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
                        "copy": bool(flags[i]), "_gen_index": i, "_train_index": int(pix_i[i])})
    out["closest"] = closest
    out["flags"] = flags
    return out


def _export(gen: ImageSet, probs: torch.Tensor, copies: torch.Tensor, users: list[User], export_dir: Path,
            min_confidence: float, min_margin: float, log: Callable[[str], None]) -> dict:
    """Copy confident own-user samples into export_dir/train/<user folder>/ for augmentation.

    Samples flagged as copies of training images are left out: they would add nothing but
    duplicates. Old exported samples in those folders are removed so a rerun with other
    thresholds leaves exactly the new selection.
    """
    top2 = probs.topk(min(2, probs.shape[1]), dim=1)
    p1 = top2.values[:, 0]
    p2 = top2.values[:, 1] if probs.shape[1] > 1 else torch.zeros_like(p1)
    own = top2.indices[:, 0] == gen.labels
    confident = own & (p1 >= min_confidence) & (p1 - p2 >= min_margin)
    keep = confident & ~copies
    per_user = {}
    for c, user in enumerate(users):
        folder = export_dir / "train" / user.name
        if folder.is_dir():
            remove_stale_samples(folder)
        chosen = (keep & (gen.labels == c)).nonzero().flatten().tolist()
        for i in chosen:
            with atomic_path(folder / gen.paths[i].name) as tmp:
                shutil.copyfile(gen.paths[i], tmp)
        per_user[str(user.number)] = len(chosen)
    total = int(keep.sum())
    log(f"export: {total} of {len(gen)} generated images written to {export_dir / 'train'}")
    return {"enabled": True, "dir": str(export_dir), "min_confidence": min_confidence, "min_margin": min_margin,
            "total": total, "of": len(gen), "excluded_as_copies": int((confident & copies).sum()),
            "per_user": per_user}


#################################################################################
#                                   Evaluate                                    #
#################################################################################

def evaluate(data_dir: str | Path, generated_dir: str | Path, output_dir: str | Path, *,
             image_size: int = 256, batch_size: int = 64, device: str = "auto", classifier_epochs: int = 10,
             classifier_size: int = 128, seed: int = 0, inception_weights: str | Path | None = None,
             export_dir: str | Path | None = None, min_confidence: float = 0.5, min_margin: float = 0.1,
             num_workers: int = 0, nearest_k: int = 3, min_user_samples: int = 10,
             copy_percentile: float = 1.0, copy_factor: float = 0.5, tstr: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Score generated spectrograms against the real data; write report.json, report.md and plots.

    Returns the report (the dict written to output_dir/report.json).
    """
    timing: dict[str, float] = {}
    tick = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    users = scan_dataset(data_dir, log=log)
    generated = scan_generated(generated_dir, users)
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise PipelineError(f"--inception_weights not found: {inception_weights}. Give a local torchvision "
                            "Inception-v3 state dict, or leave the flag out to skip Inception FID/KID.")
    if classifier_size > image_size:
        log(f"note: --classifier_size {classifier_size} > --image_size {image_size}; using {image_size}")
        classifier_size = image_size
    output_dir.mkdir(parents=True, exist_ok=True)
    _set_seed(seed)
    dev = resolve_device(device)
    num_classes = len(users)
    index_of = {u.number: c for c, u in enumerate(users)}
    notes: list[str] = []

    # ---- Images ---------------------------------------------------------------------------------
    def split(name: str) -> tuple[list[Path], list[int]]:
        pairs = [(p, c) for c, u in enumerate(users) for p in u.files.get(name, [])]
        return [p for p, _ in pairs], [c for _, c in pairs]

    log(f"loading {sum(len(u.files['train']) for u in users)} train, {sum(len(u.files['val']) for u in users)} val "
        f"and {len(generated)} generated images ({num_classes} users)")
    train_files, train_labels = split("train")
    train = load_set(train_files, train_labels, image_size, classifier_size, batch_size, num_workers)
    val = load_set(*split("val"), image_size, classifier_size, batch_size, num_workers)
    gen = load_set([p for p, _ in generated], [index_of[n] for _, n in generated], image_size,
                   classifier_size, batch_size, num_workers)
    if len(gen) == 0:
        raise PipelineError(f"none of the {len(generated)} generated images in {generated_dir} could be read.")
    if len(val) == 0:
        notes.append("The data folder has no readable val images: the identity ceiling, the real-val baselines "
                     "and TSTR are unavailable, and the copy threshold is calibrated on train leave-one-out.")
    timing["load"] = time.perf_counter() - tick

    # ---- Classifier -----------------------------------------------------------------------------
    tick = time.perf_counter()
    cfg = clf.ClassifierConfig(image_size=image_size, size=classifier_size, epochs=classifier_epochs,
                               batch_size=batch_size, seed=seed)
    model, clf_info = clf.load_or_train(data_dir, output_dir, [u.name for u in users], train.paths,
                                        train.images, train.labels, cfg, dev, log)
    train_feats, train_logits = clf.extract(model, train.images, batch_size, dev)
    val_feats, val_logits = clf.extract(model, val.images, batch_size, dev)
    gen_feats, gen_logits = clf.extract(model, gen.images, batch_size, dev)
    timing["classifier"] = time.perf_counter() - tick

    # ---- Identity -------------------------------------------------------------------------------
    id_val = _identity(val_logits, val.labels, num_classes)
    id_gen = _identity(gen_logits, gen.labels, num_classes)
    id_train = M.topk_accuracy(train_logits, train.labels, 1)
    identity = {
        "real_val_top1": id_val["top1"], "real_val_top5": id_val["top5"],
        "generated_top1": id_gen["top1"], "generated_top5": id_gen["top5"],
        "relative_to_ceiling": (id_gen["top1"] / id_val["top1"]) if id_val["top1"] else None,
        "real_train_top1": id_train, "chance": 1.0 / num_classes,
        "real_val_mean_confidence": id_val["mean_confidence"], "generated_mean_confidence": id_gen["mean_confidence"],
        "per_user": {str(u.number): {"real_val_top1": id_val["per_class"][c], "generated_top1": id_gen["per_class"][c]}
                     for c, u in enumerate(users)},
        "confusion_labels": [u.number for u in users],
        "confusion_generated": id_gen["confusion"], "confusion_real_val": id_val["confusion"],
    }

    # ---- Distribution metrics (classifier features) ---------------------------------------------
    tick = time.perf_counter()
    kid_scale = float(train_feats.double().square().mean().sqrt().clamp(min=1e-12))
    overall_gen = _pair_metrics(train_feats, gen_feats, nearest_k, seed, kid_scale)
    overall_val = _pair_metrics(train_feats, val_feats, nearest_k, seed, kid_scale) if len(val) else {}
    per_user = {}
    skipped = []
    for c, user in enumerate(users):
        t, g, v = train_feats[train.labels == c], gen_feats[gen.labels == c], val_feats[val.labels == c]
        row = {"n_train": len(t), "n_val": len(v), "n_generated": len(g)}
        if min(len(t), len(g)) >= min_user_samples:
            row["generated"] = _pair_metrics(t, g, nearest_k, seed, kid_scale)
        else:
            row["generated"] = None
            skipped.append(user.number)
        row["real_val"] = _pair_metrics(t, v, nearest_k, seed, kid_scale) if min(len(t), len(v)) >= min_user_samples else None
        row["diversity"] = {"generated": M.mean_pairwise_distance(g), "real_train": M.mean_pairwise_distance(t),
                            "real_val": M.mean_pairwise_distance(v)}
        d = row["diversity"]
        d["ratio"] = d["generated"] / d["real_train"] if d["generated"] and d["real_train"] else None
        d["real_val_ratio"] = d["real_val"] / d["real_train"] if d["real_val"] and d["real_train"] else None
        per_user[str(user.number)] = row
    if skipped:
        notes.append(f"Per-user FD/KID/precision/recall skipped for user(s) {', '.join(map(str, skipped))}: fewer than "
                     f"{min_user_samples} generated or train images (--min_user_samples).")
    notes.append("Per-user FD in 512-d features from ~100 samples is biased upward (it grows as samples shrink); "
                 "compare it only with the real-val row or runs with the same counts. KID is unbiased for "
                 "independent draws; with few, exactly balanced samples per user it can dip slightly below 0.")
    ratios = [r["diversity"]["ratio"] for r in per_user.values() if r["diversity"]["ratio"] is not None]
    val_ratios = [r["diversity"]["real_val_ratio"] for r in per_user.values() if r["diversity"]["real_val_ratio"] is not None]
    timing["metrics"] = time.perf_counter() - tick

    fd = {"classifier": overall_gen["fd"], "classifier_real_val": overall_val.get("fd"),
          "per_user": {n: {"generated": r["generated"]["fd"] if r["generated"] else None,
                           "real_val": r["real_val"]["fd"] if r["real_val"] else None} for n, r in per_user.items()}}
    kid = {"classifier_feature_scale": kid_scale, "classifier": overall_gen["kid"], "classifier_std": overall_gen["kid_std"],
           "classifier_real_val": overall_val.get("kid"),
           "per_user": {n: {"generated": r["generated"]["kid"] if r["generated"] else None,
                            "real_val": r["real_val"]["kid"] if r["real_val"] else None} for n, r in per_user.items()}}
    manifold_keys = ("precision", "recall", "density", "coverage")
    manifold = {"k": nearest_k, "space": "classifier features (512-d)", "reference": "real train",
                "generated": {k: overall_gen[k] for k in manifold_keys},
                "real_val": {k: overall_val.get(k) for k in manifold_keys},
                "per_user": {n: {"generated": {k: r["generated"][k] for k in manifold_keys} if r["generated"] else None,
                                 "real_val": {k: r["real_val"][k] for k in manifold_keys} if r["real_val"] else None}
                             for n, r in per_user.items()}}
    is_gen = M.inception_score(gen_logits.softmax(1))
    is_val = M.inception_score(val_logits.softmax(1)) if len(val) else None
    inception_score = {"generated": is_gen[0] if is_gen else None, "real_val": is_val[0] if is_val else None,
                       "max": num_classes, "classifier": "user classifier (not Inception-v3)"}
    diversity = {"space": "classifier features (512-d)",
                 "mean_ratio": float(np.mean(ratios)) if ratios else None,
                 "real_val_mean_ratio": float(np.mean(val_ratios)) if val_ratios else None,
                 "per_user": {n: r["diversity"] for n, r in per_user.items()}}

    # ---- Memorisation ---------------------------------------------------------------------------
    memo = _memorization(gen, gen_feats, train, train_feats, val, val_feats, copy_percentile, copy_factor, users)
    copies = memo.pop("flags")

    # ---- Inception-v3 FID/KID (optional) --------------------------------------------------------
    inception = {"available": False, "weights": None,
                 "message": "Inception FID/KID not computed: no --inception_weights given (nothing is downloaded)."}
    if inception_weights is not None:
        from evaluation.inception import inception_features, load_inception
        tick = time.perf_counter()
        net = load_inception(inception_weights, dev)
        feats = {name: inception_features(net, s.paths, image_size, batch_size, num_workers, dev, name)
                 for name, s in (("train", train), ("val", val), ("generated", gen)) if len(s)}
        ikid = M.kernel_distance(feats["train"], feats["generated"], seed=seed)
        ikid_val = M.kernel_distance(feats["train"], feats["val"], seed=seed) if "val" in feats else None
        fd["inception"] = M.frechet_distance(feats["train"], feats["generated"])
        fd["inception_real_val"] = M.frechet_distance(feats["train"], feats["val"]) if "val" in feats else None
        kid["inception"] = ikid[0] if ikid else None
        kid["inception_real_val"] = ikid_val[0] if ikid_val else None
        inception = {"available": True, "weights": str(inception_weights),
                     "message": "Inception-v3 pool features (2048-d), 299x299 bilinear, reference = real train."}
        timing["inception"] = time.perf_counter() - tick
    else:
        fd["inception"] = fd["inception_real_val"] = kid["inception"] = kid["inception_real_val"] = None
        log(inception["message"])

    # ---- Train on synthetic, test on real -------------------------------------------------------
    tstr_block: dict = {"top1": None, "note": None}
    if not tstr:
        tstr_block["note"] = "skipped (tstr=False)"
    elif len(val) == 0 or len(gen) < 2:
        tstr_block["note"] = "skipped: needs val images and at least two generated images"
    else:
        tick = time.perf_counter()
        # Same number of optimizer steps as the real classifier, so the two differ only in the data.
        steps = clf.steps_for(len(train), cfg)
        synth = clf.train_classifier(gen.images, gen.labels, num_classes, cfg, dev, steps=steps, desc="TSTR")
        _, tstr_logits = clf.extract(synth, val.images, batch_size, dev)
        tstr_id = _identity(tstr_logits, val.labels, num_classes)
        tstr_block = {"top1": tstr_id["top1"], "top5": tstr_id["top5"], "steps": steps,
                      "real_classifier_top1": id_val["top1"],
                      "per_user": {str(u.number): tstr_id["per_class"][c] for c, u in enumerate(users)},
                      "note": "trained on generated images only, tested on real val"}
        timing["tstr"] = time.perf_counter() - tick

    # ---- Export ---------------------------------------------------------------------------------
    export = {"enabled": False}
    if export_dir is not None:
        export = _export(gen, gen_logits.softmax(1), copies, users, Path(export_dir), min_confidence, min_margin, log)

    report = {
        "version": REPORT_VERSION,
        "inputs": {"data_dir": str(data_dir), "generated_dir": str(generated_dir), "output_dir": str(output_dir),
                   "image_size": image_size, "classifier_size": classifier_size, "batch_size": batch_size,
                   "device": str(dev), "classifier_epochs": classifier_epochs, "seed": seed,
                   "nearest_k": nearest_k, "min_user_samples": min_user_samples},
        "dataset": {"num_users": num_classes, "chance": 1.0 / num_classes,
                    "users": [{"number": u.number, "name": u.name, "n_train": int((train.labels == c).sum()),
                               "n_val": int((val.labels == c).sum()), "n_generated": int((gen.labels == c).sum())}
                              for c, u in enumerate(users)]},
        "classifier": {"arch": "resnet18", "resolution": classifier_size, "epochs": classifier_epochs, **clf_info},
        "identity": identity, "fd": fd, "kid": kid, "inception_score": inception_score, "manifold": manifold,
        "diversity": diversity, "memorization": memo, "inception": inception,
        "tstr_top1": tstr_block["top1"], "tstr": tstr_block, "export": export, "notes": notes, "timing": timing,
    }
    write_outputs(report, output_dir, users, train, val, gen)
    log(f"report: {output_dir / 'report.md'}")
    return report
