"""Stage 1: encode every image once with the frozen VA-VAE; write train/val latents and their stats.
The flags are in data/cli.py."""
from common.config import parse_args
from common.errors import cli_entry
from data.cli import REQUIRED, ExtractOptions, build_parser
from data.latents import extract_features


@cli_entry
def main(argv=None) -> None:
    args = parse_args(build_parser(), argv, required=REQUIRED)
    extract_features(ExtractOptions.from_args(args))


if __name__ == "__main__":
    main()
