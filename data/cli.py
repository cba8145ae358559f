"""Stage 1's command line (stage1_extract_features.py): encode every image once with the frozen VA-VAE."""
import argparse

from common.config import add_config_flag, new_parser, non_negative_int, options_class, positive_int
from common.device import DEVICE_WORDS, device_word
from data.repa_targets import REPA_ENCODERS

DESCRIPTION = "Stage 1: encode every image once with the frozen VA-VAE; write train/val latents and their stats."
REQUIRED = ["data_dir", "vavae_path", "output_path"]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    add_config_flag(p)
    p.add_argument("--data_dir", help="train/ and val/ with one folder per user (ID_1, ID_2, ...), or the user folders")
    p.add_argument("--vavae_path", help="vavae-imagenet256-f16d32-dinov2.pt or a project .safetensors tokenizer")
    p.add_argument("--output_path", help="folder for train.safetensors, val.safetensors, latent_stats.safetensors")
    p.add_argument("--batch_size", type=positive_int, default=32, help="images per encoder batch")
    p.add_argument("--image_size", type=positive_int, default=256, help="centre-crop size (ADM preprocessing; a non-square image keeps the centre of its long side)")
    p.add_argument("--num_workers", type=non_negative_int, default=2, help="image decoding processes")
    p.add_argument("--device", type=device_word, default="auto", help=DEVICE_WORDS)
    p.add_argument("--devices", type=positive_int, default=1, help="GPUs to split the images over (with --device auto or cuda)")
    p.add_argument("--tokenizer_check_images", type=non_negative_int, default=48,
                   help="train images (spread over users) reconstructed to check the tokenizer knows your data; 0: skip")
    p.add_argument("--repa_encoder", default="none", choices=REPA_ENCODERS,
                   help="also write REPA targets (repa_targets.safetensors) for stage 2's --repa_weight: the patch "
                        "features of each train image from the DINOv2 the published tokenizer carries (dinov2), a "
                        "small CNN trained here on your train images to tell the users apart (spectrogram), or the "
                        "first of these the tokenizer allows (auto)")
    return p


# Stage 1's flags by name (common.config.Options), handed to data.latents.extract_features whole.
ExtractOptions = options_class("ExtractOptions", build_parser, REQUIRED, __name__)
