"""Stage 1's command line (stage1_extract_features.py): encode every image once with the frozen VA-VAE."""
import argparse

from common.config import add_config_flag, new_parser, non_negative_int, options_class
from common.device import add_device_flag, add_precision_flag
from common.flag_groups import (add_batch_size_flag, add_data_dir_flag, add_devices_flag, add_image_size_flag,
                                add_num_workers_flag, add_tokenizer_flag)
from data.repa_targets import REPA_ENCODERS

DESCRIPTION = "Stage 1: encode every image once with the frozen VA-VAE; write train/val latents and their stats."
REQUIRED = ["data_dir", "vavae_path", "output_path"]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    add_config_flag(p)
    data = p.add_argument_group("data")
    add_data_dir_flag(data, "train/ and val/ with one folder per user (ID_1, ID_2, ...), or the user folders")
    data.add_argument("--output_path", help="folder for train.safetensors, val.safetensors, latent_stats.safetensors")
    add_image_size_flag(data, "centre-crop size (ADM preprocessing; a non-square image keeps the centre of its long "
                              "side)")
    add_batch_size_flag(data, 32, "images per encoder batch")
    add_num_workers_flag(data, 2, "image decoding processes")
    tokenizer = p.add_argument_group("tokenizer")
    add_tokenizer_flag(tokenizer, "vavae-imagenet256-f16d32-dinov2.pt or a project .safetensors tokenizer")
    tokenizer.add_argument("--tokenizer_check_images", type=non_negative_int, default=48,
                           help="train images (spread over users) reconstructed to check the tokenizer knows your "
                                "data; 0: skip")
    tokenizer.add_argument("--repa_encoder", default="none", choices=REPA_ENCODERS,
                           help="also write REPA targets (repa_targets.safetensors) for stage 2's --repa_weight: the "
                                "patch features of each train image from the DINOv2 the published tokenizer carries "
                                "(dinov2), a small CNN trained here on your train images to tell the users apart "
                                "(spectrogram), or the first of these the tokenizer allows (auto)")
    devices = p.add_argument_group("devices")
    add_device_flag(devices)
    add_devices_flag(devices, "GPUs to split the images over (with --device auto or cuda)")
    add_precision_flag(devices, "32-true", "the encoder's: a mixed one encodes under bf16 autocast where the "
                       "device runs bf16 natively (1.4x faster on an AVX512-BF16 CPU, latents within 0.5%% of "
                       "fp32's), else in fp32 (a T4: no fp16 for the frozen encoder)")
    return p


# Stage 1's flags by name (common.config.Options), handed to data.latents.extract_features whole.
ExtractOptions = options_class("ExtractOptions", build_parser, REQUIRED, __name__)
