"""The flags that `run_complete_pipeline.py --config CONFIG` gives each stage from CONFIG, one line per stage.

For the study scripts that run a stage themselves (experiments/lib.sh reads this): a key can mean another thing
in each stage, and the orchestrator says which stage gets it. `batch_size` is the DiT's batch for stages 1 and 2
only, so `stage4_evaluate.py --config configs/demo.yaml` would train stage 4's classifiers at 32 images a batch
where the demo trains them at stage 4's own 64. Through this, a study's stage sees what the demo's stage sees.

    python experiments/stage_flags.py configs/demo.yaml
    --batch_size 32                                         (stage 1)
    --batch_size 32 --max_epochs 200 --val_every_n_epochs 5 ...   (stage 2)
    --num_samples_per_user 20 --guidance_scale 6.0 ...      (stage 3)
    (no line for stage 4: configs/demo.yaml leaves its flags at their defaults)

Exit code 2 with the config's error (an unknown key, a value the flag refuses, a missing file).
"""
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.config import load_project_config  # noqa: E402
from common.errors import PipelineError, cli_entry  # noqa: E402
from pipeline.cli import build_parser  # noqa: E402
from pipeline.orchestrate import (STAGE_SCRIPTS, apply_config, flag_groups, split_extra_flags,  # noqa: E402
                                  stage_arguments, stage_parsers)


def stage_flags(config: str) -> dict[int, list[str]]:
    """stage (1-4) -> the flags the orchestrator passes it from `config`'s keys: the stage's own keys (routed as
    run_pipeline routes them) and the orchestrator's keys it hands on (--batch_size to stages 1 and 2, ...).
    Paths and the orchestrator's defaults for keys the config does not set are left out. Raises PipelineError
    for a config the orchestrator would refuse."""
    parser = build_parser()
    argv = ["--config", config]
    args, extra = parser.parse_known_args(argv)
    routed = split_extra_flags(apply_config(args, parser, argv, extra), stage_parsers())
    handed_on = {f"--{key}" for key in load_project_config(config)}
    flags = {}
    for stage in STAGE_SCRIPTS:
        derived = [group for group in flag_groups([str(t) for t in stage_arguments(args, Path("."))[stage]]) if group[0] in handed_on]
        flags[stage] = [word for group in derived for word in group] + routed[stage]
    return flags


@cli_entry
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise PipelineError("usage: python experiments/stage_flags.py CONFIG")
    for stage, flags in stage_flags(argv[0]).items():
        print(shlex.join(flags))


if __name__ == "__main__":
    main()
