"""The orchestrator's command line (run_complete_pipeline.py)."""
import argparse

from common.config import DistinctValues, add_config_flag, new_parser, non_negative_int
from common.flag_groups import (add_batch_size_flag, add_data_dir_flag, add_devices_flag, add_max_epochs_flag,
                                add_output_dir_flag, add_samples_per_user_flag, add_tokenizer_flag)

DESCRIPTION = """Run the whole pipeline: latents (stage 1), DiT training (2), generation (3), evaluation (4).

Any other flag of a stage (--model, --num_steps, --lr, ...) is passed to the stages that take it. Relative
paths are relative to the folder you run this from. A finished stage is skipped while its arguments and
the stages before it are unchanged.
`--check_memory GB` runs no stage: it prints stage 2's memory estimate for these flags (exit 0 if it fits).
"""


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    add_config_flag(p, "YAML whose keys are flags of this script or of any stage")
    files = p.add_argument_group("data and outputs")
    add_data_dir_flag(files, "stage 1 and 4: train/ and val/ with a folder per user")
    add_tokenizer_flag(files, "stages 1-4: the tokenizer (stage 2 decodes its validation grids with it)")
    add_output_dir_flag(files, "each stage writes a folder here")
    handed = p.add_argument_group("handed to the stages")
    add_batch_size_flag(handed, 32, "stage 1 and 2 (per device)")
    add_max_epochs_flag(handed, 50, "stage 2 (its own default is 100)")
    add_devices_flag(handed, "stages 1, 2 and 3: GPUs")
    handed.add_argument("--generate_user_ids", type=non_negative_int, nargs="+", action=DistinctValues, default=None,
                        help="stage 3 (default: every user)")
    add_samples_per_user_flag(handed, "stage 3")
    stages = p.add_argument_group("stages")
    stages.add_argument("--stages", type=int, nargs="+", action=DistinctValues, default=[1, 2, 3, 4],
                        choices=[1, 2, 3, 4], help="which stages to run")
    stages.add_argument("--force", action="store_true", help="redo the stages even if complete (stage 2 trains anew)")
    stages.add_argument("--demo", action="store_true",
                        help="simulate a small dataset and run everything with the shipped demo tokenizer")
    return p
