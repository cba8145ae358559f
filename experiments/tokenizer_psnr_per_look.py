"""Reconstruction PSNR of tokenizers on the demo's look, the broad family and a look none was trained on.

Writes (once, into --work_dir) the demo's own val images (6 people, seed 0, as `--demo` makes them), broad-look
images of people no tokenizer trained on, and the unseen look of data/unseen_look.py; then prints and saves
the mean per-image PSNR of each tokenizer on each set.

    python experiments/tokenizer_psnr_per_look.py --work_dir /tmp/looks assets/demo_vavae.safetensors other.safetensors
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.device import bf16_supported  # noqa: E402
from data.simulate import write_dataset  # noqa: E402
from data.unseen_look import write_unseen_dataset  # noqa: E402
from models.vavae import load_vavae, reconstruction_psnr  # noqa: E402
from pipeline.demo import DEMO_DATA  # noqa: E402
from data.images import load_bank  # noqa: E402

SETS = {
    "demo look (the demo's val images)": lambda d: write_dataset(d, **{**DEMO_DATA, "train_per_user": 0}),
    "broad looks (unseen people)": lambda d: write_dataset(d, 12, 0, 5, seed=909, looks="broad"),
    "unseen look (data/unseen_look.py)": lambda d: write_unseen_dataset(d, 6, 0, 10, seed=7),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizers", nargs="+")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16_supported("cpu") else contextlib.nullcontext
    results = {}
    for name, make in SETS.items():
        folder = Path(args.work_dir) / name.split(" (")[0].replace(" ", "_")
        if not folder.is_dir():
            make(folder)
        files = sorted(p for p in (folder / "val").rglob("*") if p.suffix in (".png", ".jpg"))
        bank = load_bank(files, 256, log=lambda *a: None)
        for path in args.tokenizers:
            model = load_vavae(path)
            psnr = reconstruction_psnr(model, bank, autocast=autocast)
            results.setdefault(path, {"file_mib": round(Path(path).stat().st_size / 2 ** 20, 2)})[name] = \
                round(psnr.mean().item(), 2)
            print(f"{path}: {name}: {psnr.mean():.2f} dB over {len(bank)} images", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
