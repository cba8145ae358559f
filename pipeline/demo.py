"""`run_complete_pipeline.py --demo`: simulate a few walking people, then run every stage on them with
the small tokenizer shipped in assets/. Nothing is downloaded; a 2-core CPU finishes in minutes."""
import argparse
import json
import time
from pathlib import Path
from typing import Any

from common.errors import PipelineError
from common.io import write_text
from common.progress import print_line
from data.simulate import write_dataset
from pipeline.orchestrate import ROOT, absolute, pipeline_lock, run_pipeline

DEMO_TOKENIZER = ROOT / "assets" / "demo_vavae.safetensors"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = dict(num_users=6, train_per_user=40, val_per_user=10, seed=0)


def simulate_once(data_dir: Path, log=print_line, **sizes) -> None:
    """Write the simulated dataset unless a finished one (marker present) is already there."""
    marker = data_dir / ".simulated.json"
    if marker.is_file() and marker.read_text() == repr(sizes):
        log(f"== simulated data: already in {data_dir}")
        return
    log(f"== simulating {sizes['num_users']} walking people into {data_dir}")
    write_dataset(data_dir, **sizes)
    write_text(marker, repr(sizes))


def run_demo(args: argparse.Namespace, extra: list[str], log=print_line) -> None:
    """Simulate (once), then stages 1-4 with configs/demo.yaml applied by the caller; end with the results."""
    started = time.time()
    if not DEMO_TOKENIZER.is_file():
        raise PipelineError(f"the demo tokenizer {DEMO_TOKENIZER} is missing; restore it with git "
                            "(git checkout -- assets) or train one with train_tokenizer.py")
    out = Path(args.output_dir or "demo_outputs")
    data_dir = out / "data"
    with pipeline_lock(Path(absolute(str(out))), log):   # run_pipeline passes through its own process's lock
        simulate_once(data_dir, log, **DEMO_DATA)
        demo = argparse.Namespace(**{**vars(args), "data_dir": str(data_dir), "vavae_path": str(DEMO_TOKENIZER),
                                     "output_dir": str(out)})
        # The shipped tokenizer is kept small (a few MB, trained in minutes on a CPU), so stage 1's check of it
        # warns; said here, before the warning, so that a first run does not read as broken.
        log(f"note: the demo tokenizer ({DEMO_TOKENIZER.name}) is small (a few MB, trained in minutes on a CPU), so "
            "stage 1's tokenizer check WARNS that it reconstructs these images under the 24 dB asked of a tokenizer "
            "for real data. That is expected in the demo; stage 4 reports what it costs (the tokenizer's ceiling).")
        run_pipeline(demo, extra, log)
        log(f"\ndemo finished in {time.time() - started:.0f} s")
        report_path = out / "evaluation" / "report.json"
        if report_path.is_file():
            for line in result_lines(json.loads(report_path.read_text()), out):
                log(line)
        log(f"  report: {out / 'evaluation' / 'report.md'}")
        log(f"  loss:   {out / 'trained_models' / 'loss_curve.png'}")


def result_lines(report: dict[str, Any], out: Path) -> list[str]:
    """The headline numbers of stage 4's report.json, one line each, and where the grid of samples is."""
    def num(value, fmt=".2f"):
        return "n/a" if value is None else format(value, fmt)

    identity = report.get("identity", {})
    ceiling = identity.get("tokenizer_reconstructions") or {}
    tokenizer = (f"; the tokenizer's reconstructions {num(ceiling.get('top1'))} ({num(ceiling.get('psnr_db'), '.1f')} dB), "
                 "the most samples decoded by it can reach") if ceiling else ""
    fd = report.get("fd", {})
    copy_rate = report.get("memorization", {}).get("copy_rate")
    return [
        f"  identity: {num(identity.get('generated_top1'))} of generated samples recognised as their user "
        f"(chance {num(identity.get('chance'))})",
        f"  ceiling:  real val images {num(identity.get('real_val_top1'))}{tokenizer}",
        f"  classifier FD {num(fd.get('classifier'), '.1f')} (real val {num(fd.get('classifier_real_val'), '.1f')}; "
        "lower is closer to the real images)",
        f"  copies: {num(None if copy_rate is None else 100 * copy_rate, '.1f')}% of samples flagged as near-copies "
        "of a training image",
        f"  augmentation: {num(report.get('augmentation', {}).get('gain'), '+.3f')} top-1 for a classifier trained "
        "on real + generated images",
        f"  grid:   {out / 'generated_images' / 'micro_doppler_grid.png'}",
    ]
