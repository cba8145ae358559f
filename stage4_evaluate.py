"""Stage 4: evaluate generated spectrograms (identity, fidelity, diversity, memorisation, TSTR, augmentation gain).
The flags are in evaluation/cli.py.

    python stage4_evaluate.py --data_dir data --generated_dir outputs/generated --output_dir outputs/eval
"""
from common.config import parse_args
from common.errors import cli_entry
from evaluation.cli import REQUIRED, EvaluateOptions, build_parser
from evaluation.compare import compare, load_report, render


@cli_entry
def main(argv=None) -> int:
    args = parse_args(build_parser(), argv, required=REQUIRED)
    other = load_report(args.compare_to) if args.compare_to else None   # a wrong path fails before the work
    from evaluation.evaluate import evaluate   # heavy (torchvision); keep --help and the orchestrator fast
    report = evaluate(EvaluateOptions.from_args(args))
    if other is not None:
        print(render(compare(other, report), args.compare_to, f"{args.output_dir} (this run)"))
    return 0


if __name__ == "__main__":
    main()
