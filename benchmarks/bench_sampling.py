"""Sampling quality vs cost: Frechet distance (user-classifier features) of each sampler and step count,
against the 250-step Euler result, on a trained model. Picks the sampler defaults.

    python benchmarks/bench_sampling.py --dit_checkpoint demo_outputs/trained_models/checkpoints/best.ckpt \
        --vavae_path assets/demo_vavae.safetensors --data_dir demo_outputs/data --json_out sampling.json

Every configuration decodes the same noise for the same users, so differences are the solver's alone.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import print_table, write_json  # noqa: E402
from common.device import resolve_device  # noqa: E402
from common.pixels import to_float, to_uint8  # noqa: E402
from data.images import scan_dataset  # noqa: E402
from evaluation import classifier as clf  # noqa: E402
from evaluation.imageset import load_set, resize  # noqa: E402
from evaluation.metrics import frechet_distance  # noqa: E402
from generation.generate import load_generator  # noqa: E402
from models.sampling import sample_images  # noqa: E402
from models.vavae import load_vavae  # noqa: E402

DEFAULT_CONFIGS = ("euler:250 euler:8 euler:16 euler:32 heun:4 heun:8 heun:16 ab2:8 ab2:16 ab2:32 "
                   "euler:16:0.3 heun:8:0.3 ab2:16:0.3 dopri5:0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit_checkpoint", required=True)
    p.add_argument("--vavae_path", required=True)
    p.add_argument("--data_dir", required=True, help="the real images (stage 1 layout) the classifier knows")
    p.add_argument("--samples_per_user", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="sampler:steps[:shift] ...; the first is the reference")
    p.add_argument("--classifier_size", type=int, default=clf.ClassifierConfig.size)
    p.add_argument("--classifier_max_steps", type=int, default=clf.ClassifierConfig.max_steps)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--json_out", default=None)
    args = p.parse_args()

    device = resolve_device(args.device)
    model, info = load_generator(args.dit_checkpoint, str(device))
    vae = load_vavae(args.vavae_path, device=device)
    users = scan_dataset(args.data_dir)
    train_files = [f for u in users for f in u.files["train"]]
    train_labels = [c for c, u in enumerate(users) for _ in u.files["train"]]
    size = info.get("image_size", 256)
    train = load_set(train_files, train_labels, size, args.classifier_size)
    cfg = clf.ClassifierConfig(image_size=size, size=args.classifier_size, max_steps=args.classifier_max_steps)
    judge, _ = clf.load_or_train(Path(args.data_dir), Path(args.data_dir), [u.name for u in users], train.paths,
                                 train.images, train.labels, cfg, device)
    real_feats, _ = clf.extract(judge, train.images, 64, device)

    jobs = [(u, k) for u in info.user_numbers for k in range(args.samples_per_user)]
    rows, reference_feats, reference_fd = [], None, None
    for spec in args.configs.split():
        sampler, steps, *rest = spec.split(":")
        shift = float(rest[0]) if rest else 1.0
        start = time.perf_counter()
        pixels, nfe = sample_images(model, vae, info, jobs, guidance_scale=args.guidance_scale,
                                    num_steps=int(steps), sampler=sampler, shift=shift,
                                    batch_size=args.batch_size, device=str(device), progress=False)
        seconds = time.perf_counter() - start
        images = to_uint8(resize(to_float(torch.from_numpy(pixels).permute(0, 3, 1, 2)), args.classifier_size))
        feats, _ = clf.extract(judge, images, 64, device)
        fd = frechet_distance(real_feats, feats)
        if reference_feats is None:
            reference_feats, reference_fd = feats, fd
        rows.append({"sampler": sampler, "steps": int(steps), "shift": shift, "nfe": nfe,
                     "fd_to_real": round(fd, 3), "fd_vs_reference": round(fd / reference_fd, 4),
                     "fd_to_reference_samples": round(frechet_distance(reference_feats, feats), 3),
                     "seconds": round(seconds, 1)})
        print_table([rows[-1]], list(rows[-1]))
    ok = [r for r in rows[1:] if r["nfe"] <= 32 and r["fd_vs_reference"] <= 1.05]
    best = min(ok, key=lambda r: (r["nfe"], r["fd_vs_reference"])) if ok else None
    print_table(rows, list(rows[0]), "sampling quality vs model evaluations")
    print("cheapest within 5% of the reference at <= 32 NFE:", best)
    if args.json_out:
        write_json(args.json_out, {"reference": args.configs.split()[0], "rows": rows, "choice": best,
                                   "samples": len(jobs), "guidance_scale": args.guidance_scale})


if __name__ == "__main__":
    main()
