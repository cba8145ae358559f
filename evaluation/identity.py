"""Does a sample look like its person? The user classifier's verdicts on real and generated images.

Each top-1 comes with its 95 % interval (evaluation/intervals.py): Wilson over the images scored, a bootstrap
over images for the ratio to the ceiling. What the samples teach a classifier (TSTR, the augmentation gain) is
evaluation/gain.py's.
"""
import torch

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
