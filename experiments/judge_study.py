"""Stage 4's judge and classical recipe, measured on a data folder's images (docs/experiments.md, "A judge that has
learned, and the augmentation gain over seeds").

    python experiments/judge_study.py recipes --data_dir /tmp/demo/data --seeds 0 1
        each classical recipe (evaluation/augment.RECIPES), all train images and 20 per person: the held-out
        fifth's best top-1 and cross-entropy. Train images only: val is never read, so the choice cannot fit it.
    python experiments/judge_study.py judges --data_dir /tmp/demo/data --judges small_cnn:48 resnet18:64 --seeds 0
        the judge's recipe per architecture:size: steps, CPU seconds (process time, one thread) and real-val top-1.

One JSON line per run on stdout.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.device import bf16_supported  # noqa: E402
from data.images import scan_dataset  # noqa: E402
from evaluation import augment as A  # noqa: E402
from evaluation import classifier as clf  # noqa: E402
from evaluation.gain import SIZE, low_data_subset  # noqa: E402
from evaluation.imageset import ImageSet, load_set  # noqa: E402

CPU = torch.device("cpu")


def split(data_dir: Path, name: str, size: int) -> ImageSet:
    users = scan_dataset(data_dir, log=lambda *_: None)
    pairs = [(p, c) for c, u in enumerate(users) for p in u.files.get(name, [])]
    return load_set([p for p, _ in pairs], [c for _, c in pairs], 256, size, 64, 0, lambda *_: None)


def recipes(args: argparse.Namespace) -> None:
    train = split(Path(args.data_dir), "train", args.size)
    classes = int(train.labels.max()) + 1
    cfg = clf.ClassifierConfig(size=args.size, bf16=bf16_supported(CPU))
    for regime, per_user in (("all", None), ("low_data", args.low_data_per_user)):
        for seed in args.seeds:
            index = low_data_subset(train.labels, per_user, seed) if per_user else torch.arange(len(train))
            x, y = train.images[index], train.labels[index]
            fit_index, held = clf.held_out_split(y, cfg.held_out_fraction, seed)
            for name, recipe in A.RECIPES.items():
                tick = time.process_time()
                fit = clf.train_classifier(x[fit_index], y[fit_index], classes, replace(cfg, seed=seed, augment=recipe),
                                           CPU, held_out=(x[held], y[held]), progress=False)
                logits = clf.extract(fit.model, x[held], 64, CPU)[1]
                print(json.dumps({"regime": regime, "recipe": name, "seed": seed, "best_step": fit.best_step,
                                  "steps": fit.steps, "cpu_seconds": round(time.process_time() - tick, 1),
                                  "held_out_top1": fit.held_out_top1,
                                  "held_out_ce": float(F.cross_entropy(logits, y[held]))}), flush=True)


def judges(args: argparse.Namespace) -> None:
    for spec in args.judges:
        arch, size = spec.split(":")
        train, val = (split(Path(args.data_dir), name, int(size)) for name in ("train", "val"))
        cfg = clf.ClassifierConfig(size=int(size), arch=arch, bf16=bf16_supported(CPU))
        for seed in args.seeds:
            tick = time.process_time()
            fit = clf.train_judge(train.images, train.labels, int(train.labels.max()) + 1, replace(cfg, seed=seed), CPU,
                                  progress=False)
            logits = clf.extract(fit.model, val.images, 64, CPU)[1]
            print(json.dumps({"arch": arch, "size": int(size), "seed": seed, "best_step": fit.best_step,
                              "steps": fit.steps, "cpu_seconds": round(time.process_time() - tick, 1),
                              "held_out_top1": fit.held_out_top1,
                              "real_val_top1": float((logits.argmax(1) == val.labels).float().mean())}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("recipes", "judges"):
        command = commands.add_parser(name)
        command.add_argument("--data_dir", required=True, help="stage 1 layout: train/ID_n/ and val/ID_n/")
        command.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
        if name == "recipes":
            command.add_argument("--size", type=int, default=SIZE, help="px (the gain's classifiers')")
            command.add_argument("--low_data_per_user", type=int, default=20)
        else:
            command.add_argument("--judges", nargs="+", default=["small_cnn:48"], help="architecture:size ...")
    args = parser.parse_args()
    torch.set_num_threads(1)        # CPU seconds comparable between runs on a shared machine
    {"recipes": recipes, "judges": judges}[args.command](args)


if __name__ == "__main__":
    main()
