"""The orchestrator's command line (run_complete_pipeline.py)."""
import argparse

from common.config import DistinctValues, new_parser, non_negative_int, positive_int

DESCRIPTION = """Run the whole pipeline: latents (stage 1), DiT training (2), generation (3), evaluation (4).

Any other flag of a stage (--model, --num_steps, --lr, ...) is passed to the stages that take it. Relative
paths are relative to the folder you run this from. A finished stage is skipped while its arguments and
the stages before it are unchanged.
`--check_memory GB` runs no stage: it prints stage 2's memory estimate for these flags (exit 0 if it fits).
"""


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    p.add_argument("--config", default=None, help="YAML whose keys are flags of this script or of any stage")
    p.add_argument("--data_dir", help="stage 1 and 4: train/ and val/ with a folder per user")
    p.add_argument("--vavae_path", help="stages 1-4: the tokenizer (stage 2 decodes its validation grids with it)")
    p.add_argument("--output_dir", default=None, help="each stage writes a folder here")
    p.add_argument("--batch_size", type=positive_int, default=32, help="stage 1 and 2 (per device)")
    p.add_argument("--max_epochs", type=positive_int, default=50, help="stage 2 (its own default is 100)")
    p.add_argument("--devices", type=positive_int, default=1, help="stages 1, 2 and 3: GPUs")
    p.add_argument("--generate_user_ids", type=non_negative_int, nargs="+", action=DistinctValues, default=None, help="stage 3 (default: every user)")
    p.add_argument("--num_samples_per_user", type=positive_int, default=4, help="stage 3")
    p.add_argument("--stages", type=int, nargs="+", action=DistinctValues, default=[1, 2, 3, 4], choices=[1, 2, 3, 4], help="which stages to run")
    p.add_argument("--force", action="store_true", help="redo the stages even if complete (stage 2 trains anew)")
    p.add_argument("--demo", action="store_true",
                   help="simulate a small dataset and run everything with the shipped demo tokenizer")
    return p
