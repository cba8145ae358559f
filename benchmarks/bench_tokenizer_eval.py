"""What a held-out PSNR evaluation costs against a fine-tuning step of the tokenizer (train_tokenizer.py): the
numbers behind its early-stopping cadence (tokenizer/train.py, EVAL_IMAGES and EARLY_STOP_EVAL_EVERY).

A fine-tune step of the shipped demo tokenizer (full model, batch 8 at 256 px, the fine-tune recipe) against one
evaluation over banks of several sizes, each timed in process CPU seconds on one torch thread (on a shared CPU
that is the work done, not the wait for other jobs). Random images: only speed is measured.

Example:
    python benchmarks/bench_tokenizer_eval.py --steps 4 --eval_sizes 64 256 --json_out tok_eval.json
"""
import argparse
import time

import torch

from harness import ROOT, environment, median, print_table, setup_device, write_json
from tokenizer.recipe import build_tokenizer, resolve_recipe, set_trainable
from tokenizer.train import mean_reconstruction_psnr, run_training


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(ROOT / "assets" / "demo_vavae.safetensors"))
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="training steps timed (after one warm-up step)")
    p.add_argument("--eval_sizes", type=int, nargs="+", default=[64, 256], help="eval bank sizes timed")
    p.add_argument("--repeats", type=int, default=2, help="evaluations timed per bank size (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json_out", default=None)
    args = p.parse_args()
    setup_device("cpu", args.threads)
    recipe = resolve_recipe(args.tokenizer, args.image_size, None, None, None, None, "cpu", None, False)
    model = build_tokenizer(args.tokenizer, 0, 0, args.image_size, log=lambda *a: None).train()
    set_trainable(model, False, args.image_size, recipe.crop_size, log=lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (max(args.eval_sizes), 3, args.image_size, args.image_size), dtype=torch.uint8,
                         generator=gen)

    def train(steps: int) -> None:
        run_training(model, None, None, bank, bank[:1], recipe, steps=steps, l1_weight=0.1, align_weight=0.0,
                     eval_every=0, max_minutes=None, compile_model=False, seed=0, log_every=10**9, progress=False,
                     log=lambda *a: None)

    train(1)                                                        # warm-up: allocator, oneDNN kernels
    step_s = cpu_seconds(lambda: train(args.steps)) / args.steps
    rows = []
    for n in args.eval_sizes:
        eval_s = median([cpu_seconds(lambda: mean_reconstruction_psnr(model, bank[:n], autocast=recipe.autocast))
                         for _ in range(args.repeats)])
        rows.append({"eval_images": n, "eval_cpu_s": round(eval_s, 2), "step_cpu_s": round(step_s, 2),
                     "eval_in_steps": round(eval_s / step_s, 2),
                     # evaluations cost at most 10% of the run when eval_every >= 9 x this many steps
                     "eval_every_for_10pct": int(-(-9 * eval_s // step_s))})
    print(f"one fine-tune step of {recipe.batch_size} at {args.image_size} px ({recipe.precision}): "
          f"{step_s:.2f} CPU s")
    print_table(rows, list(rows[0]))
    write_json(args.json_out, {"environment": environment(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
