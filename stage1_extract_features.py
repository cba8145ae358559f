"""Stage 1: encode every image once with the frozen VA-VAE; write train/val latents and their stats."""
import argparse

from common.config import add_config_flag, parse_args
from common.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    add_config_flag(p)
    p.add_argument("--data_dir", help="train/ and val/ with one folder per user (ID_1, ID_2, ...), or the user folders")
    p.add_argument("--vavae_path", help="vavae-imagenet256-f16d32-dinov2.pt or a project .safetensors tokenizer")
    p.add_argument("--output_path", help="folder for train.safetensors, val.safetensors, latent_stats.safetensors")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--devices", type=int, default=1, help="GPUs to split the images over")
    p.add_argument("--tokenizer_check_images", type=int, default=48,
                   help="train images (spread over users) reconstructed to check the tokenizer knows your data; 0: skip")
    return p


@cli_entry
def main(argv=None) -> None:
    args = parse_args(build_parser(), argv, required=["data_dir", "vavae_path", "output_path"])
    from data.latents import extract_features
    extract_features(args.data_dir, args.vavae_path, args.output_path, batch_size=args.batch_size,
                     image_size=args.image_size, num_workers=args.num_workers, devices=args.devices,
                     tokenizer_check_images=args.tokenizer_check_images)


if __name__ == "__main__":
    main()
