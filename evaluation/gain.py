"""What the samples teach a classifier: the augmentation gain as a paired comparison over seeds, and TSTR.

Three arms, each a classifier of the judge's recipe (evaluation/classifier.py: early stopping on held-out train
images) tested on real val images:
  real        real train images only, no augmentation
  classical   real train images with classical augmentation (evaluation/augment.py: what a radar user does by
              hand); this is the judge's own recipe
  generated   real train images plus the accepted samples, both with classical augmentation
Within a seed the three arms share the held-out split, the initial weights and the order of the real batches
(and their augmentation draws, between classical and generated): they differ only in their data. Each
comparison (classical - real, generated - classical, generated - real) reports the mean paired difference of
real-val top-1 over the seeds, its 95 % bootstrap interval over seeds and val images, and wins out of K.

Two regimes: all train images, and a low-data one (N real images per user, drawn per seed; the rest unused by the
classifiers), where users need augmentation most. TSTR trains the same recipe on the generated images only.
"""
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from evaluation import augment as A
from evaluation import classifier as clf
from evaluation import intervals as ci
from evaluation.identity import correct
from evaluation.imageset import ImageSet
from evaluation.inputs import Inputs

ARMS = ("real", "classical", "generated")
COMPARISONS = {"classical-real": ("classical", "real"), "generated-classical": ("generated", "classical"),
               "generated-real": ("generated", "real")}
HEADLINE = "generated-classical"      # the question users ask: do samples add to what augmentation gives?
GENERATOR_NOTE = ("the generator was trained on all train images (stages 1-2 by default), also in the low-data "
                  "regime: a low-data generator needs its own stages 1-2 run on the subset")


#################################################################################
#                                  Statistics                                   #
#################################################################################

def mean_with_interval(correct_matrix: np.ndarray, seed: int = 0) -> dict:
    """Mean top-1 over seeds of a (K, N) outcome matrix (K seeds, N val images), its interval
    (intervals.seeds_and_images_interval) and the per-seed top-1s."""
    m = np.asarray(correct_matrix, dtype=float)
    return {"top1": float(m.mean()) if m.size else None,
            "top1_ci": ci.as_list(ci.seeds_and_images_interval([m], lambda a: a, seed)),
            "per_seed": [float(v) for v in m.mean(1)] if m.size else []}


def paired_gain(after: np.ndarray, before: np.ndarray, seed: int = 0) -> dict:
    """Paired comparison of two (K, N) outcome matrices whose row k comes from the same seed: mean difference of
    top-1, its 95 % interval over seeds and images, per-seed differences, and wins / ties / losses out of K."""
    after, before = np.asarray(after, dtype=float), np.asarray(before, dtype=float)
    diffs = after.mean(1) - before.mean(1)
    return {"mean": float(diffs.mean()), "ci": ci.as_list(ci.seeds_and_images_interval(
                [after, before], lambda a, b: a - b, seed)),
            "wins": int((diffs > 0).sum()), "ties": int((diffs == 0).sum()), "losses": int((diffs < 0).sum()),
            "of": len(diffs), "per_seed": [float(d) for d in diffs]}


#################################################################################
#                                    Arms                                       #
#################################################################################

def low_data_subset(labels: torch.Tensor, per_user: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of `per_user` images of each class of labels (N,), drawn with `seed` (all of a class
    that has fewer)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = [members[torch.randperm(len(members), generator=gen)[:per_user]]
              for members in ((labels == c).nonzero().flatten() for c in labels.unique().tolist())]
    return torch.cat(chosen).sort().values


def arm_config(cfg: clf.ClassifierConfig, arm: str, seed: int) -> clf.ClassifierConfig:
    """The judge's recipe for one arm and seed: the real arm has no augmentation, the others the judge's."""
    return replace(cfg, seed=seed, augment=A.Classical() if arm == "real" else cfg.augment)


def _val_correct(fit: clf.Fit, val: ImageSet, batch_size: int, dev: torch.device) -> np.ndarray:
    return correct(clf.extract(fit.model, val.images, batch_size, dev)[1], val.labels).numpy()


def _fit_info(fit: clf.Fit) -> dict:
    return {"best_step": fit.best_step, "steps": fit.steps, "seconds": fit.seconds}


def run_arms(train: ImageSet, val: ImageSet, extra: ImageSet, num_classes: int, cfg: clf.ClassifierConfig,
             seeds: list[int], dev: torch.device, per_user: int | None = None,
             reuse: dict[tuple[str, int], tuple[np.ndarray, dict]] | None = None,
             log: Callable[[str], None] = print, name: str = "all") -> tuple[dict[str, np.ndarray], dict]:
    """Train the three arms for every seed; returns ({arm: (K, N_val) bool outcomes}, {arm: per-seed info}).

    per_user: the low-data regime's images per user (None: all). reuse[(arm, seed)] = (val outcomes, info) of a
    classifier already trained with exactly that arm's recipe (the judge), used instead of training it again.
    With no extra images the generated arm is the classical one (nothing to add).
    """
    outcomes = {arm: [] for arm in ARMS}
    info = {arm: [] for arm in ARMS}
    for k, seed in enumerate(seeds):
        tick = time.perf_counter()
        index = low_data_subset(train.labels, per_user, seed) if per_user else torch.arange(len(train))
        images, labels = train.images[index], train.labels[index]
        fit_index, held = clf.held_out_split(labels, cfg.held_out_fraction, seed)
        for arm in ARMS:
            if reuse and (arm, seed) in reuse:
                got, details = reuse[(arm, seed)]
            elif arm == "generated" and len(extra) == 0:
                got, details = outcomes["classical"][-1], info["classical"][-1]
            else:
                fit = clf.train_classifier(images[fit_index], labels[fit_index], num_classes,
                                           arm_config(cfg, arm, seed), dev, held_out=(images[held], labels[held]),
                                           extra=(extra.images, extra.labels) if arm == "generated" else None,
                                           desc=f"{name} {arm} seed {seed}")
                got, details = _val_correct(fit, val, cfg.batch_size, dev), _fit_info(fit)
            outcomes[arm].append(got)
            info[arm].append(details)
        log(f"augmentation gain, {name} train images, seed {k + 1}/{len(seeds)}: real-val top-1 "
            + ", ".join(f"{arm} {outcomes[arm][-1].mean():.3f}" for arm in ARMS)
            + f" ({time.perf_counter() - tick:.0f} s)")
    return {arm: np.stack(rows) for arm, rows in outcomes.items()}, info


def regime_block(outcomes: dict[str, np.ndarray], info: dict, seed: int, **facts) -> dict:
    """The report's block of one regime: per arm its mean top-1 with interval, per-seed top-1s, steps and
    seconds; per comparison its paired gain."""
    arms = {arm: {**mean_with_interval(outcomes[arm], seed),
                  **{key: [d[key] for d in info[arm]] for key in ("best_step", "steps", "seconds")}}
            for arm in ARMS}
    return {**facts, "arms": arms,
            "comparisons": {name: paired_gain(outcomes[a], outcomes[b], seed) for name, (a, b) in COMPARISONS.items()}}


#################################################################################
#                                   Reports                                     #
#################################################################################

def _skipped(note: str) -> dict:
    return {"gain": None, "gain_ci": None, "regimes": {}, "note": note}


def augmentation_report(data: Inputs, accepted: torch.Tensor, cfg: clf.ClassifierConfig, dev: torch.device,
                        seeds: list[int], low_data_per_user: int, judge: tuple[np.ndarray, dict] | None,
                        timing: dict[str, float], log: Callable[[str], None] = print
                        ) -> tuple[dict, np.ndarray | None]:
    """The augmentation block of report.json and the (K, N_val) outcomes of the classical arm on all images (the
    judge's recipe over the seeds; None when skipped).

    judge: the judge's val outcomes and info; it is the classical arm of seed cfg.seed on all images. Adds the
    seconds of each regime to `timing` (gain_all, gain_low_data).
    """
    if len(data.val) == 0:
        return _skipped("skipped: no val images"), None
    extra = data.gen.select(accepted)
    num_classes, most = len(data.users), int(torch.bincount(data.train.labels).max())
    reuse = {("classical", cfg.seed): judge} if judge is not None else None
    regimes, classical_all = {}, None
    for name, per_user in (("all", None), ("low_data", low_data_per_user)):
        if name == "low_data" and not 0 < per_user < most:
            regimes[name] = {"note": f"off: --low_data_per_user {per_user} (0 turns it off; at or above the "
                                     f"{most} train images of the largest user it would repeat the first regime)"}
            continue
        tick = time.perf_counter()
        outcomes, info = run_arms(data.train, data.val, extra, num_classes, cfg, seeds, dev, per_user,
                                  reuse if name == "all" else None, log, name)
        timing[f"gain_{name}"] = time.perf_counter() - tick
        regimes[name] = regime_block(outcomes, info, cfg.seed, real_images_per_user=per_user,
                                     real_images=int(sum(min(per_user or most, int(n))
                                                         for n in torch.bincount(data.train.labels))))
        if name == "all":
            classical_all = outcomes["classical"]
    headline = regimes["all"]["comparisons"][HEADLINE]
    return {"gain": headline["mean"], "gain_ci": headline["ci"], "headline": HEADLINE, "seeds": seeds,
            "generated_images": len(extra), "recipe": vars(cfg.augment), "regimes": regimes,
            "generator": GENERATOR_NOTE,
            "note": ("no generated image passed the filter: the generated arm is the classical one" if len(extra) == 0
                     else "paired arms per seed (same init, batch order, held-out split); tested on real val")
            }, classical_all


def tstr_report(data: Inputs, cfg: clf.ClassifierConfig, dev: torch.device, seeds: list[int],
                classical: np.ndarray | None, log: Callable[[str], None] = print) -> dict:
    """Train on synthetic, test on real: the judge's recipe trained on the generated images only (its early
    stopping on a held-out part of them: no real image takes part in its training), tested on real val, over the
    seeds. of_real: its mean top-1 as a fraction of the classical arm's on all real train images (`classical`, the
    same seeds' (K, N_val) outcomes), with the seeds-and-images interval of the ratio."""
    if len(data.val) == 0 or len(data.gen) < 2:
        return {"top1": None, "top1_ci": None, "note": "skipped: needs val images and at least two generated images"}
    rows, info = [], []
    for seed in seeds:
        fit_index, held = clf.held_out_split(data.gen.labels, cfg.held_out_fraction, seed)
        fit = clf.train_classifier(data.gen.images[fit_index], data.gen.labels[fit_index], len(data.users),
                                   replace(cfg, seed=seed), dev,
                                   held_out=(data.gen.images[held], data.gen.labels[held]), desc=f"TSTR seed {seed}")
        rows.append(_val_correct(fit, data.val, cfg.batch_size, dev))
        info.append(_fit_info(fit))
    outcomes = np.stack(rows)
    summary = mean_with_interval(outcomes, cfg.seed)
    log(f"TSTR: real-val top-1 {summary['top1']:.3f} over {len(seeds)} seeds")
    of_real, of_real_ci = None, None
    if classical is not None and classical.mean() > 0:
        of_real = float(outcomes.mean() / classical.mean())
        of_real_ci = ci.as_list(ci.seeds_and_images_interval(
            [outcomes, classical], lambda t, r: np.where(r > 0, t / np.where(r > 0, r, 1), np.nan), cfg.seed))
    return {**summary, "of_real": of_real, "of_real_ci": of_real_ci, "seeds": seeds,
            **{key: [d[key] for d in info] for key in ("best_step", "steps", "seconds")},
            "note": "the classical arm's recipe trained on generated images only, tested on real val"}
