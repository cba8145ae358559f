"""Stage 3: generate micro-Doppler images for chosen users from a stage 2 checkpoint.
The flags are in generation/cli.py."""
from common.config import parse_args
from common.errors import cli_entry
from generation.cli import REQUIRED, GenerateOptions, build_parser
from generation.generate import generate


@cli_entry
def main(argv=None) -> None:
    args = parse_args(build_parser(), argv, required=REQUIRED)
    generate(GenerateOptions.from_args(args))


if __name__ == "__main__":
    main()
