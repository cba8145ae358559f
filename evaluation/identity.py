"""Does a sample look like its person? The user classifier's verdicts on real and generated images, and what
the samples teach a classifier: TSTR (trained on samples only) and the augmentation gain (real + samples).

Each top-1 comes with its 95 % interval (evaluation/intervals.py): Wilson over the images scored, a bootstrap
over images for the ratio to the ceiling and the gain.
"""
import torch

from evaluation import classifier as clf
from evaluation import metrics as M
from evaluation import intervals as ci
from evaluation.inputs import Inputs


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the classifier's top-1 is the image's (intended) user. logits (N, K), labels (N,) int64."""
    return logits.argmax(1) == labels if len(labels) else torch.zeros(0, dtype=torch.bool)


def identity_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1 (with its Wilson interval), top-5, mean confidence, per-class top-1 and the confusion matrix
    of one image set. logits (N, K) float, labels (N,) int64 class indices; accuracies are in [0, 1]."""
    probs = logits.softmax(1)
    per_class = [M.topk_accuracy(logits[labels == c], labels[labels == c], 1) for c in range(num_classes)]
    return {
        "top1": M.topk_accuracy(logits, labels, 1),
        "top1_ci": ci.as_list(ci.proportion_interval(correct(logits, labels).numpy())),
        "top5": M.topk_accuracy(logits, labels, 5),
        "mean_confidence": float(probs.max(1).values.mean()) if len(labels) else None,
        "per_class": per_class,
        "confusion": M.confusion_matrix(labels, logits.argmax(1), num_classes).tolist(),
    }


def identity_report(data: Inputs, train_logits: torch.Tensor, val_logits: torch.Tensor,
                    gen_logits: torch.Tensor, seed: int = 0) -> dict:
    """Is each sample recognised as its user, against real val images as the ceiling?

    relative_to_ceiling = generated top-1 / real-val top-1, its interval a bootstrap over both image sets.
    """
    num_classes = len(data.users)
    id_val = identity_scores(val_logits, data.val.labels, num_classes)
    id_gen = identity_scores(gen_logits, data.gen.labels, num_classes)
    relative_ci = ci.ratio_interval(correct(gen_logits, data.gen.labels).numpy(),
                                    correct(val_logits, data.val.labels).numpy(), seed)
    return {
        "real_val_top1": id_val["top1"], "real_val_top5": id_val["top5"],
        "generated_top1": id_gen["top1"], "generated_top5": id_gen["top5"],
        "relative_to_ceiling": (id_gen["top1"] / id_val["top1"]) if id_val["top1"] else None,
        "real_val_top1_ci": id_val["top1_ci"], "generated_top1_ci": id_gen["top1_ci"],
        "relative_to_ceiling_ci": ci.as_list(relative_ci),
        "n_real_val": len(data.val), "n_generated": len(data.gen),
        "real_train_top1": M.topk_accuracy(train_logits, data.train.labels, 1), "chance": 1.0 / num_classes,
        "real_val_mean_confidence": id_val["mean_confidence"], "generated_mean_confidence": id_gen["mean_confidence"],
        "per_user": {str(u.number): {"real_val_top1": id_val["per_class"][c], "generated_top1": id_gen["per_class"][c]}
                     for c, u in enumerate(data.users)},
        "confusion_labels": [u.number for u in data.users],
        "confusion_generated": id_gen["confusion"], "confusion_real_val": id_val["confusion"],
    }


def tstr_report(data: Inputs, cfg: clf.ClassifierConfig, dev: torch.device, batch_size: int,
                real_top1: float | None) -> dict:
    """Train on synthetic, test on real: the classifier trained on generated images only, tested on real val."""
    if len(data.val) == 0 or len(data.gen) < 2:
        return {"top1": None, "top1_ci": None, "note": "skipped: needs val images and at least two generated images"}
    # Same number of optimizer steps as the real classifier, so the two differ only in the data.
    steps = clf.steps_for(len(data.train), cfg)
    synth = clf.train_classifier(data.gen.images, data.gen.labels, len(data.users), cfg, dev, steps=steps, desc="TSTR")
    tstr_id = identity_scores(clf.extract(synth, data.val.images, batch_size, dev)[1], data.val.labels,
                              len(data.users))
    return {"top1": tstr_id["top1"], "top1_ci": tstr_id["top1_ci"], "top5": tstr_id["top5"], "steps": steps,
            "real_classifier_top1": real_top1,
            "per_user": {str(u.number): tstr_id["per_class"][c] for c, u in enumerate(data.users)},
            "note": "trained on generated images only, tested on real val"}


def augmentation_report(data: Inputs, accepted: torch.Tensor, cfg: clf.ClassifierConfig, dev: torch.device,
                        batch_size: int, real_only_logits: torch.Tensor, seed: int = 0) -> dict:
    """What users want most: does adding the accepted samples to the real train images help a classifier?

    The real-only classifier is the judge itself (real_only_logits: its (N_val, K) logits on real val); the
    augmented one is the same architecture, seed and number of optimizer steps on real train + accepted
    samples, so the two differ only in the data. gain_ci: paired bootstrap over the real val images.
    """
    if len(data.val) == 0:
        return {"real_only_top1": None, "with_generated_top1": None, "gain": None, "gain_ci": None,
                "note": "skipped: no val images"}
    real_only_top1 = M.topk_accuracy(real_only_logits, data.val.labels, 1)
    extra = data.gen.select(accepted)
    if len(extra) == 0:
        return {"real_only_top1": real_only_top1, "with_generated_top1": real_only_top1, "gain": 0.0,
                "gain_ci": [0.0, 0.0], "generated_images": 0,
                "note": "no generated image passed the filter: nothing to add"}
    steps = clf.steps_for(len(data.train), cfg)
    model = clf.train_classifier(torch.cat([data.train.images, extra.images]),
                                 torch.cat([data.train.labels, extra.labels]), len(data.users), cfg, dev,
                                 steps=steps, desc="real + generated")
    logits = clf.extract(model, data.val.images, batch_size, dev)[1]
    gain_ci = ci.paired_difference_interval(correct(logits, data.val.labels).numpy(),
                                            correct(real_only_logits, data.val.labels).numpy(), seed)
    top1 = M.topk_accuracy(logits, data.val.labels, 1)
    return {"real_only_top1": real_only_top1, "with_generated_top1": top1, "gain": top1 - real_only_top1,
            "gain_ci": ci.as_list(gain_ci), "generated_images": len(extra), "real_images": len(data.train),
            "steps": steps,
            "note": "same classifier, seed and steps; real train alone vs real train + accepted samples, tested on real val"}
