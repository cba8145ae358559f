"""The recipe of a tokenizer run, everything decided before the loop starts: the narrow f16d32 architecture
(tokenizer_config), the defaults of a run from scratch and of a fine-tune (FROM_SCRATCH, FINETUNE)
and the options they resolve into (Recipe, resolve_recipe), the model to train and what of it trains
(build_tokenizer, set_trainable), the optional LPIPS and GAN terms (TextureTerms, texture_terms), the
held-out evaluations (EVAL_IMAGES, eval_cadence), the learning-rate schedule (learning_rate) and the
train/held-out split of the image files (split_files). The loop
that uses them is tokenizer/train.py."""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from common.device import resolve_device, resolve_precision
from common.errors import PipelineError
from data.images import scan_dataset
from models.vavae import VAVAE, load_vavae
from tokenizer.losses import LPIPS, Adversary, build_discriminator, build_lpips, training_loss_weights


# Defaults of a run from scratch and of a fine-tune (--init_from). Full frames for both: GroupNorm statistics
# and the attention at 16x16 depend on the image extent, so a tokenizer trained on crops learns another regime.
# Measured on the demo look from the demo tokenizer (22.69 dB), 4 CPU minutes each: 64-px crops 15.72 dB on full
# frames (24.4 on crops), 128-px 19.33, full frames 22.82. A fine-tune is minutes on a CPU, so it takes small
# batches (more steps), a short warm-up and a lower lr that keeps what the start already knows; 6e-4 from
# scratch beat 2e-4 by 1 dB in a 90 s H200 run.
FROM_SCRATCH = dict(lr=6e-4, warmup=200, batch_size=32)
FINETUNE = dict(lr=5e-4, warmup=20, batch_size=8)

# Held-out PSNR while training: a fixed bank of EVAL_IMAGES val images spread evenly over the held-out set (every
# user's share), scored every --eval_every steps; the PSNR written into the file is over every val image.
# Measured with benchmarks/bench_tokenizer_eval.py (demo tokenizer, bf16, one thread of the team's 2-core CPU):
# a fine-tune step of 8 images at 256 px took 7.1 CPU s, an evaluation 22.5 s over 64 images (3.2 steps) and 92 s
# over 256 (13 steps). Early stopping must see a plateau inside a 25-minute fine-tune (~460 steps on real
# recordings): every 50 steps over 64 images costs 6% of the run (10% at most asked), where 256 images would need
# every 120 steps, 3 evaluations in the whole run. The same images at each evaluation make the comparisons paired
# (a change between two evaluations is the model's, not a new draw's), which a small bank measures as well.
# Without early stopping the evaluations are only a log: every 1000 steps of a 6000-step run from scratch.
EVAL_IMAGES = 64
EVAL_EVERY = 1000
EARLY_STOP_EVAL_EVERY = 50


@dataclass
class Recipe:
    """A run's resolved options: the flags given, the rest from FROM_SCRATCH or FINETUNE."""
    device: torch.device
    precision: str          # bf16-mixed or 32-true (common.device.resolve_precision without loss scaling)
    lr: float
    warmup: int
    crop_size: int
    batch_size: int

    def autocast(self):
        """The context of a forward pass: bf16 autocast, or nothing in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16-mixed" else nullcontext()


def resolve_recipe(init_from: str | Path | None, image_size: int, lr: float | None, warmup: int | None,
                   crop_size: int | None, batch_size: int | None, device: str, precision: str | None,
                   decoder_only: bool) -> Recipe:
    """Check the options and fill those left open: the device, bf16 where native, the recipe's lr/warm-up/batch.

    precision is a name the parser gave (32-true or bf16-mixed); None picks bf16-mixed where it is native
    (~2x on such CPUs) without a warning. The loop has no loss scaling, so a device without native bf16 trains
    in 32-true, never 16-mixed.
    """
    device = resolve_device(device)
    precision = resolve_precision(precision or "bf16-mixed", device, warn=precision is not None, loss_scaling=False)
    if decoder_only and init_from is None:
        raise PipelineError("--decoder_only keeps an existing encoder: give the tokenizer to start from with --init_from.")
    defaults = FINETUNE if init_from is not None else FROM_SCRATCH
    crop_size = crop_size or image_size
    if crop_size % 16 or not 16 <= crop_size <= image_size:
        raise PipelineError(f"--crop_size must be a multiple of 16 between 16 and --image_size (got {crop_size}).")
    return Recipe(device, precision, lr or defaults["lr"], defaults["warmup"] if warmup is None else warmup, crop_size,
                  batch_size or defaults["batch_size"])


def tokenizer_config(width: int = 48, num_res_blocks: int = 2, image_size: int = 256,
                     ch_mult=(1, 1, 2, 2, 4), z_channels: int = 32) -> dict:
    """A narrow f16d32: same levels, latent size and width ratios as the official one, `width` base channels."""
    if width < 8 or width % 8:
        raise PipelineError(f"--width must be a multiple of 8 (got {width}).")
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        raise PipelineError(f"--image_size must be a multiple of {factor} (got {image_size}).")
    return dict(ch=width, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                attn_resolutions=(image_size // factor,),       # attention at the latent resolution, as in f16d32
                z_channels=z_channels, embed_dim=z_channels, in_channels=3, out_channels=3,
                resolution=image_size, norm_groups=math.gcd(32, width))


def build_tokenizer(init_from: str | Path | None, width: int, num_res_blocks: int, image_size: int,
                    log=print) -> VAVAE:
    """A fresh narrow tokenizer, or an existing one (published .pt or project .safetensors) to fine-tune."""
    if init_from is None:
        return VAVAE(**tokenizer_config(width, num_res_blocks, image_size))
    # its own layout: the trainer goes channels_last on CUDA only (tokenizer/train.py; 1.08x on the CPU)
    model = load_vavae(init_from, memory_format=torch.contiguous_format).requires_grad_(True)
    log(f"fine-tuning {init_from} ({model.config['ch']} wide; --width/--num_res_blocks do not apply)")
    return model


def set_trainable(model: VAVAE, decoder_only: bool, image_size: int, crop_size: int, log=print) -> int:
    """Freeze the encoder under --decoder_only and log what is trained; returns the parameter count."""
    if decoder_only:          # every latent (and any DiT trained on them) stays valid
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"tokenizer: width {config['ch']}, {config['num_res_blocks']} res blocks, {n_params:,} params "
        f"(~{n_params * 2 / 2**20:.1f} MiB as fp16), {n_train:,} trained, latent {config['z_channels']}x"
        f"{image_size // 16}x{image_size // 16}, training crops {crop_size}px")
    return n_params


@dataclass
class TextureTerms:
    """The optional LPIPS and GAN terms of a run, and where their networks came from (for the metadata)."""
    lpips: LPIPS | None = None
    perceptual_weight: float = 0.0
    lpips_source: str = "off"
    adversary: Adversary | None = None
    disc_source: str = "off"


def texture_terms(init_from: str | Path | None, recipe: Recipe, perceptual_weight: float,
                  lpips_vgg: str | Path | None, disc_weight: float, disc_start: int, disc_lr: float | None,
                  log=print) -> TextureTerms:
    """LPIPS (--perceptual_weight > 0) and the PatchGAN (--disc_weight > 0), from local weights only: --lpips_vgg
    or the starting tokenizer's `loss.*` (the published VA-VAE keeps both networks there); a fresh discriminator
    otherwise. Raises PipelineError for negative weights, missing VGG weights, or crops too small for the GAN."""
    if perceptual_weight < 0 or disc_weight < 0 or disc_start < 0:
        raise PipelineError("--perceptual_weight, --disc_weight and --disc_start must be >= 0 "
                            f"(got {perceptual_weight}, {disc_weight}, {disc_start}).")
    terms = TextureTerms()
    if perceptual_weight == 0 and disc_weight == 0:
        return terms
    init_weights = training_loss_weights(init_from) if init_from is not None else {}
    if perceptual_weight > 0:
        lpips, source = build_lpips(lpips_vgg, init_weights, init_from, log)
        terms.lpips, terms.perceptual_weight, terms.lpips_source = lpips.to(recipe.device), perceptual_weight, source
        log(f"LPIPS term on: weight {perceptual_weight}, VGG-16 from {source}")
    if disc_weight > 0:
        disc, terms.disc_source = build_discriminator(init_weights, init_from, log)
        if recipe.crop_size < disc.min_size():
            raise PipelineError(f"the PatchGAN needs images of at least {disc.min_size()} px; "
                                f"--crop_size is {recipe.crop_size}. Raise --crop_size or set --disc_weight 0.")
        terms.adversary = Adversary(disc.to(recipe.device).train(), disc_weight, disc_start, disc_lr or recipe.lr,
                                    recipe.autocast)
        log(f"GAN term on: adaptive weight x {disc_weight} after {disc_start} warm-up steps, "
            f"discriminator lr {disc_lr or recipe.lr:g}")
    return terms


def eval_cadence(eval_every: int | None, early_stop_patience: int) -> int:
    """Steps between held-out PSNR evaluations: --eval_every, or by default EARLY_STOP_EVAL_EVERY with early
    stopping and EVAL_EVERY without. Raises PipelineError for early stopping without evaluations (--eval_every 0)."""
    if eval_every is None:
        return EARLY_STOP_EVAL_EVERY if early_stop_patience else EVAL_EVERY
    if early_stop_patience and not eval_every:
        raise PipelineError("--early_stop_patience watches the held-out PSNR of periodic evaluations, and "
                            f"--eval_every 0 turns them off: give --eval_every (e.g. {EARLY_STOP_EVAL_EVERY}) or "
                            "--early_stop_patience 0.")
    return eval_every


def learning_rate(lr: float, warmup: int, step: int, frac: float) -> float:
    """Linear warm-up, then cosine to zero over whichever runs out first (`frac` done): steps or minutes.

    The same with early stopping on (--early_stop_patience): the cosine runs over the caps, not over a plateau no
    one can foresee. A run that never plateaus (the look stays under the floor, or keeps rising) is then exactly the
    run without early stopping, annealed to zero at the cap, and a plateau only cuts it short. A constant rate after
    the warm-up (stage 4's judge) would leave every run that reaches the cap unannealed, and a tokenizer that stays
    under the floor, where every dB counts, would lose what the decay gives at the end. A plateau seen while the
    rate still decays is also the stricter test: even the smaller steps no longer buy --early_stop_min_delta_db.
    """
    return lr * min(1.0, step / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def split_files(data_dir: str | Path, val_fraction: float, log=print) -> tuple[list[Path], list[Path]]:
    """Train files from train/; PSNR files from val/, or a held-out slice of train/ when val/ is empty."""
    users = scan_dataset(data_dir, log=log, hold_out_val=False)     # --val_fraction holds out its own slice below
    train = [f for u in users for f in u.files["train"]]
    val = [f for u in users for f in u.files.get("val", [])]
    if not val:
        if not 0 < val_fraction < 1:
            raise PipelineError(f"{data_dir} has no val images and --val_fraction is {val_fraction}; "
                                "add val/ images or set --val_fraction to e.g. 0.1.")
        step = max(2, round(1 / val_fraction))
        val, train = train[::step], [f for i, f in enumerate(train) if i % step]
        log(f"no val images: holding out every {step}th train image ({len(val)}) for PSNR")
    if not train:
        raise PipelineError(f"{data_dir} has no training images left after the hold-out. Add images.")
    return train, val
