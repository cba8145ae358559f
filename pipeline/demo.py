"""`run_complete_pipeline.py --demo`: simulate a few walking people, then run every stage on them with
the small tokenizer shipped in assets/. Nothing is downloaded; a 2-core CPU finishes in minutes."""
import argparse
import time
from pathlib import Path

from common.errors import PipelineError
from common.progress import print_line
from pipeline.orchestrate import ROOT, run_pipeline

DEMO_TOKENIZER = ROOT / "assets" / "demo_vavae.safetensors"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = dict(num_users=6, train_per_user=40, val_per_user=10, seed=0)


def simulate_once(data_dir: Path, log=print_line, **sizes) -> None:
    """Write the simulated dataset unless a finished one (marker present) is already there."""
    from common.io import write_text
    from data.simulate import write_dataset
    marker = data_dir / ".simulated.json"
    if marker.is_file() and marker.read_text() == repr(sizes):
        log(f"== simulated data: already in {data_dir}")
        return
    log(f"== simulating {sizes['num_users']} walking people into {data_dir}")
    write_dataset(data_dir, **sizes)
    write_text(marker, repr(sizes))


def run_demo(args: argparse.Namespace, extra: list[str], log=print_line) -> None:
    """Simulate (once), then stages 1-4 with configs/demo.yaml applied by the caller."""
    started = time.time()
    if not DEMO_TOKENIZER.is_file():
        raise PipelineError(f"the demo tokenizer {DEMO_TOKENIZER} is missing; restore it with git "
                            "(git checkout -- assets) or train one with train_tokenizer.py")
    out = Path(args.output_dir or "demo_outputs")
    data_dir = out / "data"
    simulate_once(data_dir, log, **DEMO_DATA)
    demo = argparse.Namespace(**{**vars(args), "data_dir": str(data_dir), "vavae_path": str(DEMO_TOKENIZER),
                                 "output_dir": str(out)})
    run_pipeline(demo, extra, log)
    log(f"\ndemo finished in {time.time() - started:.0f} s")
    log(f"  grid:   {out / 'generated_images' / 'micro_doppler_grid.png'}")
    log(f"  report: {out / 'evaluation' / 'report.md'}")
    log(f"  loss:   {out / 'trained_models' / 'loss_curve.png'}")
