"""Stage 4: evaluate generated spectrograms (identity, fidelity, diversity, memorisation, TSTR, augmentation gain).
The flags are in evaluation/cli.py.

    python stage4_evaluate.py --data_dir data --generated_dir outputs/generated --output_dir outputs/eval
"""
from common.config import parse_args
from common.errors import cli_entry
from evaluation.cli import REQUIRED, build_parser, options


@cli_entry
def main(argv=None) -> int:
    args = parse_args(build_parser(), argv, required=REQUIRED)
    from evaluation.evaluate import evaluate   # heavy (torchvision); keep --help and the orchestrator fast
    evaluate(args.data_dir, args.generated_dir, args.output_dir, **options(args))
    return 0


if __name__ == "__main__":
    main()
