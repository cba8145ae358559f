"""Is a sample a copy? The nearest training image of every sample, in pixel and in feature space, against the
distances real unseen images have."""
import torch

from data.images import User
from evaluation import metrics as M
from evaluation.imageset import ImageSet


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
