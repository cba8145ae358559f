"""The flags several commands take, each defined once (willisma/SiT's train_utils.py: argument groups that train.py
and sample.py share).

A command puts these into its own argument groups (argparse's add_argument_group: the sections of its --help)
and, where the commands' texts differ, says in `help` what the flag does in its work; the name, the type (the
checks a value passes) and, unless a command needs another, the default are the function's. The orchestrator
sends one value of a flag to every stage that has it (pipeline/orchestrate.py): a flag two stages share comes
from one function here, so that value is read the same way by each.

--device is common.device.add_device_flag, beside the device words it takes, so that this module (and with it the
orchestrator's --help) loads without torch. Flags with the same name and another meaning stay with their command:
--output_path (stage 1's folder, the tokenizer's file), --init_from (DiT or tokenizer weights), --precision (the
tokenizer refuses 16-mixed), --lr and --compile (of the DiT or of the tokenizer, with their own defaults).
"""
import argparse
from typing import Any, Protocol

from common.config import non_negative_int, positive_int, seed


class FlagGroup(Protocol):
    """An argparse parser or one of its argument groups: what the functions below add flags to."""
    def add_argument(self, *names: str, **options: Any) -> argparse.Action: ...


#################################################################################
#                               Images and batches                              #
#################################################################################

def add_data_dir_flag(group: FlagGroup, help: str) -> None:
    """--data_dir: the user's image folder in stage 1's layout (train/ and val/, a folder per user)."""
    group.add_argument("--data_dir", help=help)


def add_image_size_flag(group: FlagGroup, help: str) -> None:
    """--image_size: the side in pixels the images are centre-cropped and resized to, 256 by default."""
    group.add_argument("--image_size", type=positive_int, default=256, help=help)


def add_batch_size_flag(group: FlagGroup, default: int | None, help: str) -> None:
    """--batch_size: images (or latents) in one batch of the command's model; None: the command picks."""
    group.add_argument("--batch_size", type=positive_int, default=default, help=help)


def add_num_workers_flag(group: FlagGroup, default: int, help: str) -> None:
    """--num_workers: processes that decode images beside the main one (0: the main process decodes)."""
    group.add_argument("--num_workers", type=non_negative_int, default=default, help=help)


def add_samples_per_user_flag(group: FlagGroup, help: str) -> None:
    """--num_samples_per_user: images stage 3 generates for each user, 4 by default."""
    group.add_argument("--num_samples_per_user", type=positive_int, default=4, help=help)


#################################################################################
#                            Files the stages share                             #
#################################################################################

def add_tokenizer_flag(group: FlagGroup, help: str) -> None:
    """--vavae_path: the VA-VAE tokenizer file (published .pt or a project .safetensors) whose latents the DiT
    learns; every stage that reads or decodes latents takes the same file."""
    group.add_argument("--vavae_path", help=help)


def add_latent_dir_flag(group: FlagGroup, help: str) -> None:
    """--latent_dir: stage 1's output folder (train/val.safetensors, latent_stats.safetensors, split.json)."""
    group.add_argument("--latent_dir", help=help)


def add_output_dir_flag(group: FlagGroup, help: str) -> None:
    """--output_dir: the folder a command writes its results to."""
    group.add_argument("--output_dir", help=help)


#################################################################################
#                          Runs: length, devices, seed                          #
#################################################################################

def add_max_epochs_flag(group: FlagGroup, default: int, help: str) -> None:
    """--max_epochs: stage 2's passes over the train latents (the orchestrator passes its own default on)."""
    group.add_argument("--max_epochs", type=positive_int, default=default, help=help)


def add_devices_flag(group: FlagGroup, help: str) -> None:
    """--devices: how many GPUs (or processes) share the work, 1 by default."""
    group.add_argument("--devices", type=positive_int, default=1, help=help)


def add_seed_flag(group: FlagGroup, help: str) -> None:
    """--seed: the seed of the command's random numbers (common.config.seed's range), 0 by default."""
    group.add_argument("--seed", type=seed, default=0, help=help)
