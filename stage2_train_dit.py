"""Stage 2: train a user-conditioned LightningDiT on the stage 1 latents (PyTorch Lightning, DDP).
The flags are in training/cli.py."""
import sys

from common.config import parse_args, require_flags
from common.errors import cli_entry
from training.cli import REQUIRED, TrainOptions, build_parser
from training.memory import GB
from training.memory_check import memory_report


@cli_entry
def main(argv=None) -> None:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.check_memory is not None:   # a question about the flags: no data or output folder needed
        fits, text, _ = memory_report(TrainOptions.from_args(args), args.check_memory * GB)
        print(text)
        sys.exit(0 if fits else 1)
    require_flags(parser, args, REQUIRED)
    from training.train_dit import train   # Lightning (~7 s): not for --help, a flag error or --check_memory
    train(TrainOptions.from_args(args))


if __name__ == "__main__":
    main()
