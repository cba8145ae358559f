"""What the samples teach a classifier: the augmentation gain as a paired comparison over seeds, and TSTR.

Three arms, each a classifier of the judge's recipe (evaluation/classifier.py: early stopping on held-out train
images) at SIZE px, tested on real val images:
  real        real train images only, no augmentation
  classical   real train images with classical augmentation (evaluation/augment.py: what a radar user does by
              hand), the judge's augmentation
  generated   real train images plus the accepted samples, both with classical augmentation: mixed into every
              batch (cfg.generated_use "mixed"), or trained on first, to their plateau on the held-out real
              images, the real images then fine-tuning from those weights ("first")
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
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from common.progress import progress_bar
from evaluation import augment as A
from evaluation import classifier as clf
from evaluation import intervals as ci
from evaluation.identity import correct
from evaluation.imageset import THUMB_SIZE, ImageSet
from evaluation.inputs import Inputs

# px: at 32 the gain's classifiers learn (demo real val 0.96 over 5 seeds, the judge 0.99 at 48) at half the cost
SIZE = THUMB_SIZE
ARMS = ("real", "classical", "generated")
COMPARISONS = {"classical-real": ("classical", "real"), "generated-classical": ("generated", "classical"),
               "generated-real": ("generated", "real")}
T = TypeVar("T")
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
    extra: tuple[torch.Tensor, torch.Tensor] | None = None      # mixed into the batches of `train`
    pretrain: tuple[torch.Tensor, torch.Tensor] | None = None   # trained on first, `train` fine-tuning after


def regime_jobs(train: ImageSet, extra: ImageSet, cfg: clf.ClassifierConfig, seeds: list[int],
                per_user: int | None, part: str) -> list[Job]:
    """The three arms of every seed in one regime (per_user: the low-data regime's images per user, None: all),
    each seed with its own held-out split (and low-data subset), shared by its arms. The generated arm is left out
    when there is no extra image (it would be the classical one)."""
    jobs = []
    for seed in seeds:
        index = low_data_subset(train.labels, per_user, seed) if per_user else torch.arange(len(train))
        images, labels = train.images[index], train.labels[index]
        fit, held = clf.held_out_split(labels, cfg.held_out_fraction, seed)
        for arm in ARMS:
            if arm == "generated" and len(extra) == 0:
                continue
            samples = (extra.images, extra.labels) if arm == "generated" else None
            first = cfg.generated_use == "first"
            jobs.append(Job(part, arm, seed, arm_config(cfg, arm, seed), (images[fit], labels[fit]),
                            (images[held], labels[held]), None if first else samples, samples if first else None))
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


def train_and_score(job: Job, val: ImageSet, num_classes: int, dev: torch.device,
                    progress: bool = True) -> tuple[np.ndarray, dict]:
    """Train one job's classifier and score it on real val: (val outcomes (N_val,) bool, info: best_step, steps,
    seconds; with job.pretrain, those of the fine-tuning and pretrain_steps). The pretraining stops on the same
    held-out real images as the fine-tuning."""
    desc, pretrained, info = f"{job.part} {job.arm} seed {job.seed}", None, {}
    if job.pretrain is not None:
        first = clf.train_classifier(*job.pretrain, num_classes, job.cfg, dev, held_out=job.held_out,
                                     desc=f"{desc}, samples first", progress=progress)
        pretrained, info = first.model, {"pretrain_steps": first.steps, "pretrain_seconds": first.seconds}
    fit = clf.train_classifier(*job.train, num_classes, job.cfg, dev, held_out=job.held_out, extra=job.extra,
                               desc=desc, progress=progress, init=pretrained)
    return _val_correct(fit, val, job.cfg.batch_size, dev), {
        "best_step": fit.best_step, "steps": fit.steps, "seconds": fit.seconds + info.pop("pretrain_seconds", 0.0),
        **info}


def run_tasks(tasks: list[Callable[[], T]], workers: int, desc: str) -> list[T]:
    """Every task's result, in task order, `workers` tasks at a time on threads (each op on one core: small
    convolutions use a second core poorly, two classifiers use it fully). Tasks that seed every draw they make
    return the same results whatever `workers` is."""
    with progress_bar(total=len(tasks), desc=desc, unit="classifier") as bar:
        if workers <= 1:
            results = []
            for task in tasks:
                results.append(task())
                bar.update(1)
            return results
        with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(task) for task in tasks]
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
                      seeds: list[int], low_data_per_user: int, augmentation: bool, tstr: bool, workers: int,
                      timing: dict[str, float], side_tasks: list[Callable[[], T]] = (),
                      log: Callable[[str], None] = print) -> tuple[dict, dict, list[T]]:
    """report.json's augmentation and TSTR blocks, every classifier of both trained in one pool (run_tasks) at
    SIZE px with the judge's recipe `cfg` (its size replaced), and the results of `side_tasks` run in the same pool
    (stage 4 runs the judge's other seeds there).

    accepted: (N_gen,) bool, the samples the generated arm adds. augmentation / tstr False leave a block out.
    Adds to `timing`: gain_all, gain_low_data and tstr (summed seconds of their classifiers, `workers` of which
    ran at once) and gain_and_tstr (wall clock of the pool, side tasks included).
    """
    small = Inputs(data.users, data.train.thumbnails(), data.val.thumbnails(), data.gen.thumbnails(), data.notes)
    cfg = replace(cfg, size=SIZE)
    extra = small.gen.select(accepted)
    most = int(torch.bincount(small.train.labels).max())
    regimes = {"all": None, "low_data": low_data_per_user if 0 < low_data_per_user < most else None}
    jobs = []
    have_val, tstr_possible = len(small.val) > 0, len(small.gen) >= 2
    if augmentation and have_val:
        jobs += regime_jobs(small.train, extra, cfg, seeds, None, "all")
        if regimes["low_data"]:
            jobs += regime_jobs(small.train, extra, cfg, seeds, low_data_per_user, "low_data")
    if tstr and have_val and tstr_possible:
        jobs += tstr_jobs(small.gen, cfg, seeds)
    quiet = workers > 1
    tasks = list(side_tasks) + [lambda job=job: train_and_score(job, small.val, len(small.users), dev, not quiet)
                                for job in jobs]
    log(f"augmentation gain and TSTR: {len(tasks)} classifiers, {max(1, workers)} at a time")
    tick = time.perf_counter()
    results = run_tasks(tasks, workers, "gain and TSTR classifiers")
    timing["gain_and_tstr"] = time.perf_counter() - tick
    side, results = results[:len(side_tasks)], results[len(side_tasks):]
    done = {(job.part, job.arm, job.seed): result for job, result in zip(jobs, results)}
    for part in ("all", "low_data", "tstr"):
        timing[part if part == "tstr" else f"gain_{part}"] = sum(r[1]["seconds"] for j, r in zip(jobs, results)
                                                                 if j.part == part)
    no_val = "skipped: no val images"
    aug_block = _skipped("skipped (augmentation=False)" if not augmentation else no_val)
    if augmentation and have_val:
        blocks = {}
        for part, per_user in regimes.items():
            if part == "low_data" and per_user is None:
                blocks[part] = {"note": f"off: --low_data_per_user {low_data_per_user} (0 turns it off; at or above "
                                        f"the {most} train images of the largest user it would repeat the first regime)"}
                continue
            outcomes, info = _arms_of(part, seeds, done)
            n_real = int(sum(min(per_user or most, int(n)) for n in torch.bincount(small.train.labels)))
            blocks[part] = regime_block(outcomes, info, cfg.seed, real_images_per_user=per_user, real_images=n_real)
            log(f"augmentation gain, {part} train images, real-val top-1 over {len(seeds)} seeds: "
                + ", ".join(f"{arm} {blocks[part]['arms'][arm]['top1']:.3f}" for arm in ARMS))
        headline = blocks["all"]["comparisons"][HEADLINE]
        aug_block = {"gain": headline["mean"], "gain_ci": headline["ci"], "headline": HEADLINE, "seeds": seeds,
                     "classifier_size": SIZE, "generated_images": len(extra), "recipe": vars(cfg.augment),
                     "generated_use": cfg.generated_use, "generated_share": cfg.generated_share,
                     "regimes": blocks, "generator": GENERATOR_NOTE,
                     "note": ("no generated image passed the filter: the generated arm is the classical one"
                              if len(extra) == 0 else
                              "paired arms per seed (same init, batch order, held-out split); tested on real val")}
    if not tstr:
        tstr_block = _tstr_skipped("skipped (tstr=False)")
    elif not have_val or not tstr_possible:
        tstr_block = _tstr_skipped(no_val if not have_val else "skipped: needs at least two generated images")
    else:
        tstr_block = _tstr_block(done, seeds, cfg.seed, outcomes_classical(done, seeds), log)
    return aug_block, tstr_block, side


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
