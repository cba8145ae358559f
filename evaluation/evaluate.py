"""Stage 4: does a generated image look real, and does it look like the right person?

evaluate() is the whole stage: stage4_evaluate.py calls it (the orchestrator runs that script). It runs the
report families in turn, each in its own module:
  inputs.py             the flags' files, the real and generated images
  classifier.py         the user classifier (trained on real train images until it has learned, cached), the judge
  identity.py           identity against the real-val ceiling (with intervals)
  gain.py               the augmentation gain (paired arms over seeds, two regimes) and TSTR
  tokenizer_ceiling.py  identity of the tokenizer's own reconstructions (--vavae_path)
  distribution.py       FD, KID, precision/recall, density/coverage, Inception Score, diversity
  memorization.py       copies of training images
  export.py             the accepted samples and the ready dataset (--export_dir)
  report.py             report.json, report.md and the plots
"""
import random
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from common.device import bf16_supported, resolve_device
from common.lock import run_lock
from evaluation import classifier as clf
from evaluation import intervals
from evaluation.cli import EvaluateOptions
from evaluation.distribution import distribution_report, inception_report
from evaluation.export import accepted_samples, export_report
from evaluation.gain import mean_with_interval, usefulness_report
from evaluation.identity import correct, identity_report
from evaluation.inputs import Inputs, check_files, load_inputs
from evaluation.memorization import memorization_report
from evaluation.report import write_outputs
from evaluation.tokenizer_ceiling import tokenizer_report

REPORT_VERSION = 1
JUDGE_SEEDS = 3     # the judge trained with --seed and the next two: its real-val top-1's spread over seeds
INTERVALS = {"level": intervals.LEVEL, "proportions": "Wilson score interval over the images scored",
             "ratio": f"percentile bootstrap over the images ({intervals.RESAMPLES} resamples, seed --seed)",
             "over_seeds": "augmentation gains, TSTR and the judge's mean real-val top-1: percentile bootstrap over "
                           "the --gain_seeds classifier seeds and the real val images together (paired: a draw takes "
                           "the same seeds and images for every arm)",
             "covers": "single-classifier intervals: which samples were drawn and which real val images exist, not "
                       "the classifier's training seed; over-seeds intervals cover the seed too"}


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    tick = time.perf_counter()
    yield
    timing[key] = time.perf_counter() - tick


def _classify(data: Inputs, data_dir: Path, output_dir: Path, cfg: clf.ClassifierConfig, dev: torch.device,
              log: Callable[[str], None]) -> tuple[torch.nn.Module, dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The user classifier (cached or trained), its info, and (features, logits) of train, val and generated."""
    model, info = clf.load_or_train(data_dir, output_dir, [u.name for u in data.users], data.train.paths,
                                    data.train.images, data.train.labels, cfg, dev, log)
    outputs = {name: clf.extract(model, s.images, cfg.batch_size, dev)
               for name, s in (("train", data.train), ("val", data.val), ("gen", data.gen))}
    return model, info, outputs


def _sibling_judges(data: Inputs, data_dir: Path, output_dir: Path, cfg: clf.ClassifierConfig, dev: torch.device,
                    seeds: list[int]) -> list[Callable[[], np.ndarray]]:
    """Tasks that train (or load from the cache) the judge again with each of `seeds` and return its real-val
    outcomes (N_val,) bool: the spread the judge's real-val top-1 has over training seeds."""
    def task(seed: int) -> np.ndarray:
        model, _ = clf.load_or_train(data_dir, output_dir, [u.name for u in data.users], data.train.paths,
                                     data.train.images, data.train.labels, replace(cfg, seed=seed), dev,
                                     log=lambda *_: None, progress=False)
        return correct(clf.extract(model, data.val.images, cfg.batch_size, dev)[1], data.val.labels).numpy()
    return [lambda seed=seed: task(seed) for seed in seeds]


def _header(data: Inputs, inputs: dict, cfg: clf.ClassifierConfig, classifier_info: dict) -> dict:
    """The report's version, inputs, dataset and classifier blocks."""
    num_classes = len(data.users)
    return {
        "version": REPORT_VERSION, "inputs": inputs,
        "dataset": {"num_users": num_classes, "chance": 1.0 / num_classes,
                    "users": [{"number": u.number, "name": u.name, "n_train": int((data.train.labels == c).sum()),
                               "n_val": int((data.val.labels == c).sum()), "n_generated": int((data.gen.labels == c).sum())}
                              for c, u in enumerate(data.users)]},
        "classifier": {"arch": cfg.arch, "resolution": cfg.size, "max_steps": cfg.max_steps,
                       "held_out_fraction": cfg.held_out_fraction, "patience": cfg.patience,
                       "eval_every": cfg.eval_every, "augment": vars(cfg.augment), **classifier_info},
    }


LOCK_NAME = "stage4.lock"   # one stage 4 run per --output_dir (common/lock.py)


def _classifier_size(o: EvaluateOptions, log: Callable[[str], None]) -> int:
    """The judge's input size in px: --classifier_size, at most --image_size (said when it is cut)."""
    if o.classifier_size > o.image_size:
        log(f"note: --classifier_size {o.classifier_size} > --image_size {o.image_size}; using {o.image_size}")
    return min(o.classifier_size, o.image_size)


def _inputs(o: EvaluateOptions, classifier_size: int, dev: torch.device) -> dict:
    """The report's record of what was scored and how (folders as given, sizes in px, seeds)."""
    return {"data_dir": str(Path(o.data_dir)), "generated_dir": str(o.generated_dir),
            "output_dir": str(Path(o.output_dir)),
            "image_size": o.image_size, "classifier_size": classifier_size, "batch_size": o.batch_size,
            "device": str(dev), "classifier_max_steps": o.classifier_max_steps, "seed": o.seed,
            "gain_seeds": o.gain_seeds, "low_data_per_user": o.low_data_per_user, "generated_use": o.generated_use,
            "generated_share": o.generated_share, "max_confidence": o.max_confidence,
            "nearest_k": o.nearest_k, "min_user_samples": o.min_user_samples}


def evaluate(options: EvaluateOptions, *, tstr: bool = True, augmentation: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Stage 4 with its flags (evaluation/cli.py; --compare_to is the script's): score generated spectrograms
    against the real data; write report.json, report.md and plots into options.output_dir. tstr / augmentation
    False skip those two blocks (they train --gain_seeds classifiers each, three per regime for the gain; the
    report says they were skipped).

    data_dir: stage 1 layout (train/ID_n/, val/ID_n/); generated_dir: stage 3's micro_doppler_userNN_KKK.png.
    Returns the report (the dict written to output_dir/report.json); accuracies are in [0, 1], each headline
    one with a 95 % interval (*_ci: [low, high]). Raises PipelineError for a missing folder or file, no
    generated images, generated images of users the data folder lacks, or another stage 4 run writing to
    output_dir (output_dir/stage4.lock).
    """
    o = options
    timing: dict[str, float] = {}
    started = time.perf_counter()
    data_dir, output_dir = Path(o.data_dir), Path(o.output_dir)
    image_size, batch_size, seed = o.image_size, o.batch_size, o.seed
    with run_lock(output_dir / LOCK_NAME, "stage 4", "another --output_dir", log=log):
        check_files(o.inception_weights, o.vavae_path)
        classifier_size = _classifier_size(o, log)
        with _timed(timing, "load"):
            data = load_inputs(data_dir, o.generated_dir, image_size, classifier_size, batch_size, o.num_workers,
                               log)
            output_dir.mkdir(parents=True, exist_ok=True)
            _set_seed(seed)
            dev = resolve_device(o.device)
        cfg = clf.ClassifierConfig(image_size=image_size, size=classifier_size, max_steps=o.classifier_max_steps,
                                   batch_size=batch_size, bf16=bf16_supported(dev), seed=seed)
        seeds = list(range(seed, seed + o.gain_seeds))
        with _timed(timing, "classifier"):
            model, clf_info, out = _classify(data, data_dir, output_dir, cfg, dev, log)
        (train_feats, train_logits), (val_feats, val_logits), (gen_feats, gen_logits) = out["train"], out["val"], out["gen"]

        identity = identity_report(data, train_logits, val_logits, gen_logits, seed)
        if o.vavae_path is not None:
            with _timed(timing, "tokenizer"):
                identity["tokenizer_reconstructions"] = tokenizer_report(data, o.vavae_path, image_size,
                                                                         classifier_size, model, batch_size, dev)
        with _timed(timing, "metrics"):
            dist = distribution_report(data, train_feats, val_feats, gen_feats, gen_logits, val_logits, o.nearest_k,
                                       seed, o.min_user_samples)
        with _timed(timing, "memorization"):
            memo, copies, nearest_pairs = memorization_report(data.gen, gen_feats, data.train, train_feats, data.val,
                                                              val_feats, o.copy_percentile, o.copy_factor, data.users)
        with _timed(timing, "inception"):
            inception = inception_report(data, o.inception_weights, image_size, batch_size, o.num_workers, dev, seed)
        if not inception["available"]:
            log(inception["message"])
        accepted, confident = accepted_samples(data.gen, gen_logits.softmax(1), copies, o.min_confidence,
                                               o.min_margin, o.max_confidence)
        # Classifiers at once on the CPU: one per core (gain.run_tasks); a GPU takes them one by one.
        workers = torch.get_num_threads() if dev.type == "cpu" else 1
        judge_seeds = list(range(seed, seed + JUDGE_SEEDS)) if len(data.val) else []
        # the judge's recipe for every classifier of the gain; how the samples are used matters only where they join
        gain_cfg = replace(cfg, generated_share=o.generated_share, generated_use=o.generated_use)
        augment, tstr_block, siblings = usefulness_report(
            data, accepted, gain_cfg, dev, seeds, o.low_data_per_user, augmentation, tstr, workers, timing,
            _sibling_judges(data, data_dir, output_dir, cfg, dev, judge_seeds[1:]), log)
        if judge_seeds:
            outcomes = np.stack([correct(val_logits, data.val.labels).numpy(), *siblings])
            clf_info["real_val_top1_over_seeds"] = {**mean_with_interval(outcomes, seed), "seeds": judge_seeds}
        export = export_report(data.users, data.gen, accepted, confident, copies, o.export_dir, o.min_confidence,
                               o.min_margin, o.max_confidence, log)

        report = {
            **_header(data, _inputs(o, classifier_size, dev), cfg, clf_info), "identity": identity,
            "intervals": INTERVALS,
            "fd": {**dist["fd"], "inception": inception["fd"], "inception_real_val": inception["fd_real_val"]},
            "kid": {**dist["kid"], "inception": inception["kid"], "inception_real_val": inception["kid_real_val"]},
            "inception_score": dist["inception_score"], "manifold": dist["manifold"], "diversity": dist["diversity"],
            "memorization": memo, "inception": {k: inception[k] for k in ("available", "weights", "message")},
            "tstr_top1": tstr_block["top1"], "tstr": tstr_block, "augmentation": augment, "export": export,
            "notes": data.notes + dist["notes"], "timing": timing,
        }
        timing["total"] = time.perf_counter() - started      # all but the plots and report files below
        report = write_outputs(report, output_dir, data.users, data.train, data.gen, nearest_pairs)
        log(f"report: {output_dir / 'report.md'}")
        return report
