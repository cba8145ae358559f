"""Train a VA-VAE tokenizer on a folder of spectrogram images, or fine-tune one on your own images.
The flags are in tokenizer/cli.py.

    python train_tokenizer.py --data_dir D --output_path tok.safetensors --steps 6000
    python train_tokenizer.py --data_dir D --output_path tok.safetensors \\
        --init_from assets/demo_vavae.safetensors --max_minutes 10
"""
from common.config import parse_args
from common.errors import cli_entry
from tokenizer.cli import REQUIRED, TokenizerOptions, build_parser
from tokenizer.train import train_tokenizer


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, required=REQUIRED)
    train_tokenizer(TokenizerOptions.from_args(args))


if __name__ == "__main__":
    main()
