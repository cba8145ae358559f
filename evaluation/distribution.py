"""Does a sample look real? FD, KID, precision/recall, density/coverage, Inception Score and diversity, in the
user classifier's features (and, with local weights, standard Inception-v3 FID/KID)."""
from pathlib import Path

import numpy as np
import torch

from evaluation import metrics as M
from evaluation.inception import inception_features, load_inception
from evaluation.inputs import Inputs


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
    is_gen = M.inception_score(gen_logits)
    is_val = M.inception_score(val_logits) if len(val) else None
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
