"""Run the whole pipeline: latents (stage 1), DiT training (2), generation (3), evaluation (4).

Any other flag of a stage (--model, --num_steps, --lr, ...) is passed to the stages that take it. Relative
paths are relative to the folder you run this from. A finished stage is skipped while its arguments and
the stages before it are unchanged.
`--check_memory GB` runs no stage: it prints stage 2's memory estimate for these flags (exit 0 if it fits).
The flags are in pipeline/cli.py.
"""
import sys

from common.errors import PipelineError, cli_entry
from pipeline.cli import build_parser


@cli_entry
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # after parsing: --help and a flag error stay torch-free (pipeline.orchestrate imports torch, ~2 s)
    from pipeline.demo import DEMO_CONFIG, run_demo
    from pipeline.orchestrate import apply_config, check_memory_only, run_pipeline
    if args.demo and not args.config:
        args.config = str(DEMO_CONFIG)
    extra = apply_config(args, parser, argv, extra)
    if args.demo:
        run_demo(args, extra)
        return
    if any(t.split("=", 1)[0] == "--check_memory" for t in extra):
        sys.exit(check_memory_only(args, extra))
    missing = [f"--{k}" for k in ("data_dir", "vavae_path", "output_dir") if not getattr(args, k)]
    if missing:
        raise PipelineError(f"missing {' '.join(missing)} (or run the demo: python run_complete_pipeline.py --demo)")
    run_pipeline(args, extra)


if __name__ == "__main__":
    main()
