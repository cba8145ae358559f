"""Run the whole pipeline: latents (stage 1), DiT training (2), generation (3), evaluation (4).

Any other flag of a stage (--model, --num_steps, --lr, ...) is passed to the stages that take it. Relative
paths are relative to the folder you run this from. A finished stage is skipped while its arguments and
the stages before it are unchanged.
`--check_memory GB` runs no stage: it prints stage 2's memory estimate for these flags (exit 0 if it fits).
"""
import argparse
import sys

from common.errors import PipelineError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None, help="YAML whose keys are flags of this script or of any stage")
    p.add_argument("--data_dir")
    p.add_argument("--vavae_path")
    p.add_argument("--output_dir", default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_epochs", type=int, default=50)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--generate_user_ids", type=int, nargs="+", default=None, help="default: every user")
    p.add_argument("--num_samples_per_user", type=int, default=4)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    p.add_argument("--force", action="store_true", help="redo the stages even if complete (stage 2 trains anew)")
    p.add_argument("--demo", action="store_true",
                   help="simulate a small dataset and run everything with the shipped demo tokenizer")
    return p


@cli_entry
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from pipeline.orchestrate import apply_config, run_pipeline
    if args.demo and not args.config:
        from pipeline.demo import DEMO_CONFIG
        args.config = str(DEMO_CONFIG)
    extra = apply_config(args, parser, argv, extra)
    if args.demo:
        from pipeline.demo import run_demo
        run_demo(args, extra)
        return
    if any(t.split("=", 1)[0] == "--check_memory" for t in extra):
        from pipeline.orchestrate import check_memory_only
        sys.exit(check_memory_only(args, extra))
    missing = [f"--{k}" for k in ("data_dir", "vavae_path", "output_dir") if not getattr(args, k)]
    if missing:
        raise PipelineError(f"missing {' '.join(missing)} (or run the demo: python run_complete_pipeline.py --demo)")
    run_pipeline(args, extra)


if __name__ == "__main__":
    main()
