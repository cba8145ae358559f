"""The command line of stage 2 (stage2_train_dit.py), with the options it hands to training/train_dit.py."""
import argparse
from typing import Sequence

from common.config import (add_config_flag, below_one, ema_width, new_parser, non_negative_float, non_negative_int,
                           options_class, parse_args, positive_float, positive_int, probability)
from common.device import add_precision_flag, device_word
from common.flag_groups import (add_batch_size_flag, add_devices_flag, add_latent_dir_flag, add_max_epochs_flag,
                                add_output_dir_flag, add_seed_flag, add_tokenizer_flag)
from models.lightningdit import DEFAULT_MODEL, LightningDiT_models
from models.latent_classifier import CLASSIFIER_STEPS

DESCRIPTION = "Stage 2: train a user-conditioned LightningDiT on the stage 1 latents (PyTorch Lightning, DDP)."
REQUIRED = ["latent_dir", "output_dir"]

def accelerator_word(text: str) -> str:
    """--accelerator's type: a device word (common.device.device_word) without an index; --devices counts GPUs."""
    word = device_word(text)
    if ":" in word:
        raise argparse.ArgumentTypeError(f"{text!r} names one GPU; --accelerator takes auto, cpu or cuda "
                                         "(--devices says how many)")
    return word


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "data" flags."""
    data = p.add_argument_group("data")
    add_latent_dir_flag(data, "stage 1 output (train/val.safetensors, latent_stats.safetensors)")
    add_output_dir_flag(data, "writes checkpoints/, lightning_logs/, loss_curve.png")
    add_batch_size_flag(data, 32, "per device")
    data.add_argument("--time_shift_aug", type=probability, default=0.0,
                      help="probability of shifting a training latent circularly along time, the shift given to the "
                           "DiT as a condition that is 0 at sampling (non-leaking augmentation; 0 = off)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "model" flags."""
    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(LightningDiT_models),
                       help="LightningDiT size/patch")
    model.add_argument("--depth", type=positive_int, default=None, help="override the named size's depth")
    model.add_argument("--hidden_size", type=positive_int, default=None, help="override the named size's width")
    model.add_argument("--num_heads", type=positive_int, default=None, help="override the named size's heads")
    model.add_argument("--use_qknorm", action="store_true", help="RMS-normalise q and k (stabler at high lr)")
    model.add_argument("--grad_checkpointing", action="store_true", help="recompute activations: less memory")
    model.add_argument("--compile", action="store_true", help="torch.compile the model")


def add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "optimisation" flags."""
    optimisation = p.add_argument_group("optimisation")
    add_max_epochs_flag(optimisation, 100, "passes over the train latents")
    optimisation.add_argument("--max_steps", type=positive_int, default=None,
                              help="stop after this many steps (overrides epochs)")
    optimisation.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate")
    optimisation.add_argument("--warmup_steps", type=non_negative_int, default=0,
                              help="linear lr warm-up over this many steps (0: none)")
    optimisation.add_argument("--beta2", type=below_one, default=0.999, help="AdamW beta2")
    optimisation.add_argument("--weight_decay", type=non_negative_float, default=0.0,
                              help="AdamW weight decay (not on norms, biases, class table)")
    optimisation.add_argument("--grad_clip", type=non_negative_float, default=1.0, help="0 disables")
    add_seed_flag(optimisation, "initial weights and every batch")


def add_loss_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "loss" flags."""
    loss = p.add_argument_group("loss")
    loss.add_argument("--timestep_sampling", default="uniform", choices=["uniform", "logit_normal"],
                      help="training t distribution")
    loss.add_argument("--cosine_loss_weight", type=non_negative_float, default=0.0,
                      help="weight of the velocity cosine term")
    loss.add_argument("--contrastive_weight", type=non_negative_float, default=0.0,
                      help="contrastive flow matching (Delta-FM): push each user's flow away from other users' "
                           "targets with this weight (0 = off; the paper uses 0.05)")


def add_precision_and_devices_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "precision and devices" flags."""
    devices = p.add_argument_group("precision and devices")
    add_devices_flag(devices, "processes (GPUs) per node; DDP when more than one")
    devices.add_argument("--num_nodes", type=positive_int, default=1, help="machines")
    devices.add_argument("--accelerator", default="auto", type=accelerator_word, metavar="{auto,cpu,cuda}",
                         help="auto: CUDA when present (gpu: cuda); --devices says how many")
    add_precision_flag(devices, "bf16-mixed",
                       "32-true; 16-mixed (fp16 with loss scaling, e.g. a T4); bf16-mixed where bf16 is native "
                       "(GPUs of compute capability >= 8.0, CPUs with AVX512-BF16/AMX), else 16-mixed on a GPU and "
                       "32-true on a CPU, with a warning. Aliases: 32, 16, bf16")


def add_ema_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "EMA" flags."""
    ema = p.add_argument_group("EMA")
    ema.add_argument("--ema_decay", type=below_one, default=0.9995,
                     help="EMA of the weights (validation and sampling use it)")
    ema.add_argument("--ema_std", type=ema_width, default=None, metavar="SIGMA_REL",
                     help="power-function EMA of this relative width (EDM2; e.g. 0.05-0.15) instead of --ema_decay: "
                          "averages a fixed fraction of the run so far, so short runs are not held back")


def add_guidance_training_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "guidance training" flags."""
    guidance = p.add_argument_group("guidance training")
    guidance.add_argument("--class_dropout_prob", type=below_one, default=0.1, help="label dropout for guidance")
    guidance.add_argument("--early_checkpoint_step", type=non_negative_int, default=None,
                          help="step at which checkpoints/early.ckpt (EMA weights, the guide of stage 3's "
                               "--guidance_checkpoint) is kept (default: 1/8 of the run; 0 = none)")


def add_noisy_latent_classifier_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "noisy-latent classifier" flags."""
    classifier = p.add_argument_group("noisy-latent classifier")
    classifier.add_argument("--classifier_steps", type=non_negative_int, default=CLASSIFIER_STEPS,
                            help="steps of the noisy-latent user classifier trained on the train latents before the "
                                 "DiT (stage 3's --classifier_scale and val_identity use it; 0 = none)")
    classifier.add_argument("--val_identity_samples", type=non_negative_int, default=8,
                            help="unguided EMA samples per user scored by that classifier at each validation: the "
                                 "val_identity metric (0 = off)")


def add_repa_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "REPA" flags."""
    repa = p.add_argument_group("REPA")
    repa.add_argument("--repa_weight", type=non_negative_float, default=0.0,
                      help="REPA: align block --repa_depth's tokens with stage 1's repa_targets.safetensors (stage 1 "
                           "--repa_encoder) with this weight (0 = off; the paper uses 0.5)")
    repa.add_argument("--repa_depth", type=positive_int, default=None,
                      help="REPA: the block whose tokens are aligned (default: a third of the depth, at least 1)")
    repa.add_argument("--repa_stop_step", type=non_negative_int, default=None,
                      help="REPA: weight the term 0 from this step on (HASTE's early stop; default: never)")


def add_checkpoints_and_validation_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "checkpoints and validation" flags."""
    checkpoints = p.add_argument_group("checkpoints and validation")
    add_tokenizer_flag(checkpoints, "the stage 1 tokenizer: lets each validation decode a grid of samples (val_grids/)")
    checkpoints.add_argument("--val_every_n_epochs", type=positive_int, default=1,
                             help="EMA validation (and best.ckpt) cadence")
    checkpoints.add_argument("--val_grid_users", type=non_negative_int, default=4,
                             help="users in the validation sample grid (0 = no grid)")
    checkpoints.add_argument("--val_grid_samples", type=non_negative_int, default=2,
                             help="samples per user in the validation grid (0 = no grid)")
    checkpoints.add_argument("--checkpoint_every_n_steps", type=positive_int, default=500, help="last.ckpt cadence")
    checkpoints.add_argument("--log_every_n_steps", type=positive_int, default=10, help="metrics.csv cadence")
    checkpoints.add_argument("--restart", action="store_true",
                             help="start over: remove the previous run's last.ckpt and best.ckpt")


def add_init_and_fine_tuning_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "init and fine-tuning" flags."""
    finetune = p.add_argument_group("init and fine-tuning")
    finetune.add_argument("--init_from", default=None, help="published LightningDiT weights to start from")
    finetune.add_argument("--finetune", default="full", choices=["full", "partial", "lora"],
                          help="with --init_from: train everything, only adaLN/embeddings/final layer, or those "
                               "plus low-rank adapters on attention/MLP (frozen base)")
    finetune.add_argument("--lora_rank", type=positive_int, default=16, help="--finetune lora: rank of the adapters")
    finetune.add_argument("--lora_alpha", type=positive_float, default=None,
                          help="--finetune lora: scale alpha/rank (default rank)")
    finetune.add_argument("--backbone_lr_scale", type=non_negative_float, default=1.0,
                          help="lr factor for the transformer blocks")


def add_memory_check_flags(p: argparse.ArgumentParser) -> None:
    """Stage 2's "memory check" flags."""
    memory = p.add_argument_group("memory check")
    memory.add_argument("--check_memory", type=positive_float, default=None, metavar="GB",
                        help="only estimate the peak memory per device for these flags; exit 0 if it fits in GB")
    memory.add_argument("--skip_memory_check", action="store_true",
                        help="train on CUDA even if the estimate exceeds the free memory")


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    add_config_flag(p)
    # One function per argument group (--help shows them in this order): a reader finds a flag by its concern.
    for add_group in (add_data_flags, add_model_flags, add_optimisation_flags, add_loss_flags,
                      add_precision_and_devices_flags, add_ema_flags, add_guidance_training_flags,
                      add_noisy_latent_classifier_flags, add_repa_flags, add_checkpoints_and_validation_flags,
                      add_init_and_fine_tuning_flags, add_memory_check_flags):
        add_group(p)
    return p


# Every stage 2 flag by name, as a frozen dataclass derived from build_parser, where each flag, its type and its
# default are written once. train(), DiTTrainingModule and the memory estimate read it.
TrainOptions = options_class("TrainOptions", build_parser, REQUIRED, __name__)


def training_options(argv: Sequence[str], required: Sequence[str] = REQUIRED) -> TrainOptions:
    """Stage 2's options from command-line tokens (with --config), as the stage parses them."""
    return TrainOptions.from_args(parse_args(build_parser(), [str(a) for a in argv], required=required))
