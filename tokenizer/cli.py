"""The command line of train_tokenizer.py: flags, --config (YAML keys are flag names), and the options it hands
to tokenizer/train.py."""
import argparse

from common.config import (add_config_flag, finite_float, new_parser, non_negative_float, non_negative_int, open_fraction,
                           options_class, positive_float, positive_int)
from common.device import add_device_flag, precision_word
from common.flag_groups import add_batch_size_flag, add_data_dir_flag, add_image_size_flag, add_seed_flag
from data.latents import TOKENIZER_WARN_DB
from tokenizer.recipe import EARLY_STOP_EVAL_EVERY, EVAL_EVERY, EVAL_IMAGES

REQUIRED = ["data_dir", "output_path"]
DESCRIPTION = """Train a VA-VAE tokenizer on a folder of spectrogram images, or fine-tune one on your own images.

    python train_tokenizer.py --data_dir D --output_path tok.safetensors --steps 6000
    python train_tokenizer.py --data_dir D --output_path tok.safetensors \\
        --init_from assets/demo_vavae.safetensors --max_minutes 10
"""


def tokenizer_precision(text: str) -> str:
    """The tokenizer's --precision type: 32-true or bf16-mixed (common.device.precision_word's names); its loop
    has no loss scaling, so 16-mixed would underflow gradients."""
    name = precision_word(text)
    if name == "16-mixed":
        raise argparse.ArgumentTypeError(f"{text} is not supported by the tokenizer (no loss scaling); choose "
                                         "bf16-mixed or 32-true")
    return name


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    add_config_flag(p)
    data = p.add_argument_group("data")
    add_data_dir_flag(data, "stage-1 layout: D/train/<user>/*.png and D/val/<user>/*.png")
    data.add_argument("--output_path", help="the .safetensors file to write")
    add_image_size_flag(data, "centre-crop size of the images")
    data.add_argument("--crop_size", type=positive_int, default=None,
                      help="train on random crops of this size (multiple of 16; default: the full image). Crops are "
                           "cheaper but teach another regime (GroupNorm statistics): 64-px crops cost the demo "
                           "tokenizer 7 dB on full images; PSNR is always measured on full images")
    data.add_argument("--val_fraction", type=open_fraction, default=0.1,
                      help="fraction of train images held out for PSNR when the folder has no val images")
    model = p.add_argument_group("model")
    model.add_argument("--init_from", default=None,
                       help="start from this tokenizer (project .safetensors or the published VA-VAE .pt) and "
                            "fine-tune it on --data_dir; --width and --num_res_blocks then come from the file")
    model.add_argument("--decoder_only", action="store_true",
                       help="with --init_from: train the decoder only, "
                            "so latents (and any DiT trained on them) stay valid")
    model.add_argument("--width", type=positive_int, default=48, help="base channels (the official tokenizer has 128)")
    model.add_argument("--num_res_blocks", type=positive_int, default=2, help="residual blocks per resolution")
    optimisation = p.add_argument_group("optimisation")
    optimisation.add_argument("--steps", type=positive_int, default=6000,
                              help="optimizer steps (unless --max_minutes ends first)")
    add_batch_size_flag(optimisation, None, "images (or crops) per step (default: 32 from scratch, 8 with --init_from: "
                                            "more steps in a short fine-tune)")
    optimisation.add_argument("--lr", type=positive_float, default=None,
                              help="AdamW lr (default: 6e-4 from scratch, 5e-4 with --init_from)")
    optimisation.add_argument("--warmup", type=non_negative_int, default=None,
                              help="linear warmup steps before the cosine decay "
                                   "(default: 200 from scratch, 20 with --init_from)")
    optimisation.add_argument("--max_minutes", type=positive_float, default=None,
                              help="stop after this many minutes (a cap with early stopping); the cosine schedule "
                                   "then follows the clock")
    optimisation.add_argument("--eval_every", type=non_negative_int, default=None,
                              help=f"held-out PSNR over {EVAL_IMAGES} val images every this many steps (0: only at "
                                   f"the end; default: {EVAL_EVERY}, {EARLY_STOP_EVAL_EVERY} with early stopping)")
    optimisation.add_argument("--early_stop_patience", type=non_negative_int, default=0,
                              help="early stopping (0: off): stop once the held-out PSNR has not risen by more than "
                                   "--early_stop_min_delta_db for this many evaluations, if it is at or above "
                                   "--early_stop_floor_db; --steps and --max_minutes stay caps, and the file gets "
                                   "the weights of the best evaluation")
    optimisation.add_argument("--early_stop_min_delta_db", type=non_negative_float, default=0.1,
                              help="the rise in held-out PSNR (dB) that counts as progress for early stopping")
    optimisation.add_argument("--early_stop_floor_db", type=finite_float, default=TOKENIZER_WARN_DB,
                              help="early stopping never stops while the best held-out PSNR (dB) is below "
                                   "this, by default the PSNR stage 1 asks of a tokenizer")
    add_seed_flag(optimisation, "initial weights, split and batches")
    loss = p.add_argument_group("loss")
    loss.add_argument("--align_weights", default=None,
                      help="local torchvision ResNet/ViT state dict for the VA-VAE alignment term (off if absent)")
    loss.add_argument("--align_weight", type=non_negative_float, default=0.1, help="weight of the alignment term")
    loss.add_argument("--l1_weight", type=non_negative_float, default=0.1, help="weight of the L1 term (beside MSE)")
    loss.add_argument("--perceptual_weight", type=non_negative_float, default=0.0,
                      help="weight of the LPIPS term (0: off); its VGG-16 comes from --lpips_vgg or from the published "
                           "VA-VAE given as --init_from (its loss.perceptual_loss.*); nothing is downloaded")
    loss.add_argument("--lpips_vgg", default=None,
                      help="local VGG-16 weights for LPIPS: a torchvision vgg16 state dict, an LPIPS state dict, or "
                           "the published VA-VAE .pt")
    loss.add_argument("--disc_weight", type=non_negative_float, default=0.0,
                      help="weight of the PatchGAN term on top of LDM's adaptive weight (0: off; LDM uses 0.5). Reuses "
                           "the discriminator of the published VA-VAE given as --init_from, else starts a fresh one")
    loss.add_argument("--disc_start", type=non_negative_int, default=100,
                      help="steps before the GAN term reaches the tokenizer; the discriminator trains from step 1")
    loss.add_argument("--disc_lr", type=positive_float, default=None,
                      help="discriminator Adam lr, constant (default: --lr)")
    devices = p.add_argument_group("precision and devices")
    add_device_flag(devices)
    devices.add_argument("--precision", default=None, type=tokenizer_precision, metavar="{32-true,bf16-mixed}",
                         help="default bf16-mixed where bf16 is native (GPUs of compute capability >= 8.0, CPUs with "
                              "AVX512-BF16/AMX), else 32-true (aliases 32, fp32, bf16)")
    devices.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    return p


# The trainer's flags by name (common.config.Options), handed to tokenizer.train.train_tokenizer whole.
TokenizerOptions = options_class("TokenizerOptions", build_parser, REQUIRED, __name__)
