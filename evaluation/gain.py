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
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from common.progress import progress_bar
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


@dataclass
class Job:
    """One classifier of the protocol: part ("all", "low_data" or "tstr"), arm, seed, recipe and images."""
    part: str
    arm: str
    seed: int
    cfg: clf.ClassifierConfig
    train: tuple[torch.Tensor, torch.Tensor]                   # uint8 images (N, 3, S, S), labels (N,)
    held_out: tuple[torch.Tensor, torch.Tensor]
    extra: tuple[torch.Tensor, torch.Tensor] | None = None


def regime_jobs(train: ImageSet, extra: ImageSet, cfg: clf.ClassifierConfig, seeds: list[int],
                per_user: int | None, part: str, skip: set[tuple[str, str, int]] = frozenset()) -> list[Job]:
    """The three arms of every seed in one regime (per_user: the low-data regime's images per user, None: all),
    each seed with its own held-out split (and low-data subset), shared by its arms. (part, arm, seed) in `skip`
    are left out (the judge, already trained), and so is the generated arm when there is no extra image."""
    jobs = []
    for seed in seeds:
        index = low_data_subset(train.labels, per_user, seed) if per_user else torch.arange(len(train))
        images, labels = train.images[index], train.labels[index]
        fit, held = clf.held_out_split(labels, cfg.held_out_fraction, seed)
        for arm in ARMS:
            if (part, arm, seed) in skip or (arm == "generated" and len(extra) == 0):
                continue
            jobs.append(Job(part, arm, seed, arm_config(cfg, arm, seed), (images[fit], labels[fit]),
                            (images[held], labels[held]), (extra.images, extra.labels) if arm == "generated" else None))
    return jobs


def tstr_jobs(gen: ImageSet, cfg: clf.ClassifierConfig, seeds: list[int]) -> list[Job]:
    """Train on synthetic: the classical recipe on the generated images alone, early stopping on a held-out part
    of them, so that no real image takes part in its training."""
    jobs = []
    for seed in seeds:
        fit, held = clf.held_out_split(gen.labels, cfg.held_out_fraction, seed)
        jobs.append(Job("tstr", "classical", seed, replace(cfg, seed=seed), (gen.images[fit], gen.labels[fit]),
                        (gen.images[held], gen.labels[held])))
    return jobs


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_jobs(jobs: list[Job], val: ImageSet, num_classes: int, dev: torch.device, workers: int,
             log: Callable[[str], None] = print) -> list[tuple[np.ndarray, dict]]:
    """Train every job and score it on real val: per job (val outcomes (N_val,) bool, info: best_step, steps,
    seconds), in job order.

    workers > 1 trains that many classifiers at once on threads, each op on one core: small convolutions use a
    second core poorly, two classifiers use it fully. The results do not depend on it (every draw is seeded).
    """
    def one(job: Job) -> tuple[np.ndarray, dict]:
        fit = clf.train_classifier(*job.train, num_classes, job.cfg, dev, held_out=job.held_out, extra=job.extra,
                                   desc=f"{job.part} {job.arm} seed {job.seed}", progress=workers <= 1)
        return _val_correct(fit, val, job.cfg.batch_size, dev), {"best_step": fit.best_step, "steps": fit.steps,
                                                                  "seconds": fit.seconds}
    log(f"augmentation gain and TSTR: {len(jobs)} classifiers, {max(1, workers)} at a time")
    with progress_bar(total=len(jobs), desc="gain and TSTR classifiers", unit="classifier") as bar:
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(one(job))
                bar.update(1)
            return results
        with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(one, job) for job in jobs]
            for _ in as_completed(futures):
                bar.update(1)
            return [f.result() for f in futures]


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

def _arms_of(part: str, seeds: list[int], done: dict) -> tuple[dict[str, np.ndarray], dict[str, list[dict]]]:
    """(K, N_val) outcomes and per-seed info of each arm of a part; a generated arm never trained (no sample to
    add) is the classical one."""
    get = lambda arm, seed: done.get((part, arm, seed)) or done[(part, "classical", seed)]
    return ({arm: np.stack([get(arm, seed)[0] for seed in seeds]) for arm in ARMS},
            {arm: [get(arm, seed)[1] for seed in seeds] for arm in ARMS})


def usefulness_report(data: Inputs, accepted: torch.Tensor, cfg: clf.ClassifierConfig, dev: torch.device,
                      seeds: list[int], low_data_per_user: int, judge: tuple[np.ndarray, dict],
                      augmentation: bool, tstr: bool, workers: int, timing: dict[str, float],
                      log: Callable[[str], None] = print) -> tuple[dict, dict, dict | None]:
    """report.json's augmentation and TSTR blocks, and the judge's real-val top-1 over the seeds (None without
    the augmentation block): every classifier of both trained in one pool (run_jobs).

    judge: the judge's val outcomes and info; it is the classical arm of seed cfg.seed on all images and is not
    trained again. augmentation / tstr False leave a block out. Adds to `timing`: gain_all, gain_low_data and
    tstr (summed seconds of their classifiers, `workers` of which ran at once) and gain_and_tstr (wall clock).
    """
    if len(data.val) == 0:
        return _skipped("skipped: no val images"), _tstr_skipped("skipped: no val images"), None
    extra = data.gen.select(accepted)
    most = int(torch.bincount(data.train.labels).max())
    regimes = {"all": None, "low_data": low_data_per_user if 0 < low_data_per_user < most else None}
    jobs = []
    if augmentation:
        jobs += regime_jobs(data.train, extra, cfg, seeds, None, "all", skip={("all", "classical", cfg.seed)})
        if regimes["low_data"]:
            jobs += regime_jobs(data.train, extra, cfg, seeds, low_data_per_user, "low_data")
    tstr_possible = len(data.gen) >= 2
    if tstr and tstr_possible:
        jobs += tstr_jobs(data.gen, cfg, seeds)
    tick = time.perf_counter()
    results = run_jobs(jobs, data.val, len(data.users), dev, workers, log)
    timing["gain_and_tstr"] = time.perf_counter() - tick
    done = {(job.part, job.arm, job.seed): result for job, result in zip(jobs, results)}
    done[("all", "classical", cfg.seed)] = judge
    for part in ("all", "low_data", "tstr"):
        timing[part if part == "tstr" else f"gain_{part}"] = sum(r[1]["seconds"] for j, r in zip(jobs, results)
                                                                 if j.part == part)
    aug_block, over_seeds = _skipped("skipped (augmentation=False)"), None
    if augmentation:
        blocks = {}
        for part, per_user in regimes.items():
            if part == "low_data" and per_user is None:
                blocks[part] = {"note": f"off: --low_data_per_user {low_data_per_user} (0 turns it off; at or above "
                                        f"the {most} train images of the largest user it would repeat the first regime)"}
                continue
            outcomes, info = _arms_of(part, seeds, done)
            n_real = int(sum(min(per_user or most, int(n)) for n in torch.bincount(data.train.labels)))
            blocks[part] = regime_block(outcomes, info, cfg.seed, real_images_per_user=per_user, real_images=n_real)
            log(f"augmentation gain, {part} train images, real-val top-1 over {len(seeds)} seeds: "
                + ", ".join(f"{arm} {blocks[part]['arms'][arm]['top1']:.3f}" for arm in ARMS))
            if part == "all":
                over_seeds = {**mean_with_interval(outcomes["classical"], cfg.seed), "seeds": seeds}
        headline = blocks["all"]["comparisons"][HEADLINE]
        aug_block = {"gain": headline["mean"], "gain_ci": headline["ci"], "headline": HEADLINE, "seeds": seeds,
                     "generated_images": len(extra), "recipe": vars(cfg.augment), "regimes": blocks,
                     "generator": GENERATOR_NOTE,
                     "note": ("no generated image passed the filter: the generated arm is the classical one"
                              if len(extra) == 0 else
                              "paired arms per seed (same init, batch order, held-out split); tested on real val")}
    if not tstr:
        return aug_block, _tstr_skipped("skipped (tstr=False)"), over_seeds
    if not tstr_possible:
        return aug_block, _tstr_skipped("skipped: needs at least two generated images"), over_seeds
    return aug_block, _tstr_block(done, seeds, cfg.seed, outcomes_classical(done, seeds), log), over_seeds


def outcomes_classical(done: dict, seeds: list[int]) -> np.ndarray | None:
    """The classical arm's (K, N_val) outcomes on all images, when every seed of it was trained."""
    rows = [done.get(("all", "classical", seed)) for seed in seeds]
    return None if any(r is None for r in rows) else np.stack([r[0] for r in rows])


def _skipped(note: str) -> dict:
    return {"gain": None, "gain_ci": None, "regimes": {}, "note": note}


def _tstr_skipped(note: str) -> dict:
    return {"top1": None, "top1_ci": None, "note": note}


def _tstr_block(done: dict, seeds: list[int], seed: int, classical: np.ndarray | None,
                log: Callable[[str], None]) -> dict:
    """TSTR over the seeds; of_real: its mean top-1 as a fraction of the classical arm's on all real train images
    (the same seeds), with the seeds-and-images interval of the ratio (None without the augmentation block)."""
    outcomes = np.stack([done[("tstr", "classical", s)][0] for s in seeds])
    info = [done[("tstr", "classical", s)][1] for s in seeds]
    summary = mean_with_interval(outcomes, seed)
    log(f"TSTR: real-val top-1 {summary['top1']:.3f} over {len(seeds)} seeds")
    of_real, of_real_ci = None, None
    if classical is not None and classical.mean() > 0:
        of_real = float(outcomes.mean() / classical.mean())
        of_real_ci = ci.as_list(ci.seeds_and_images_interval(
            [outcomes, classical], lambda t, r: np.where(r > 0, t / np.where(r > 0, r, 1), np.nan), seed))
    return {**summary, "of_real": of_real, "of_real_ci": of_real_ci, "seeds": seeds,
            **{key: [d[key] for d in info] for key in ("best_step", "steps", "seconds")},
            "note": "the classical arm's recipe trained on generated images only, tested on real val"}
