"""Stage 3's command line (stage3_inference.py)."""
import argparse

from common.device import DEVICE_WORDS, device_word
from common.config import (DistinctValues, add_config_flag, new_parser, non_negative_float, non_negative_int,
                           open_fraction, options_class, positive_float, positive_int, probability, seed)
from models.transport import (DEFAULT_CLASSIFIER_INTERVAL, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SHIFT,
                              DEFAULT_STEPS, SAMPLERS)

DESCRIPTION = "Stage 3: generate micro-Doppler images for chosen users from a stage 2 checkpoint."
REQUIRED = ["dit_checkpoint", "vavae_path", "output_dir", "user_ids"]


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(DESCRIPTION)
    add_config_flag(p)
    p.add_argument("--dit_checkpoint", help="stage 2 checkpoint, e.g. trained_models/checkpoints/best.ckpt")
    p.add_argument("--vavae_path", help="the tokenizer used in stage 1")
    p.add_argument("--output_dir", help="micro_doppler_userNN_KKK.png and micro_doppler_grid.png go here")
    p.add_argument("--user_ids", type=non_negative_int, nargs="+", action=DistinctValues, help="numbers in the user folder names (ID_3 -> 3)")
    p.add_argument("--num_samples_per_user", type=positive_int, default=4, help="images per user")
    p.add_argument("--guidance_scale", type=non_negative_float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance; 1 = no guidance, 0 = unconditional")
    p.add_argument("--num_steps", type=positive_int, default=DEFAULT_STEPS, help="integration steps")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help="ODE integrator")
    p.add_argument("--shift", type=positive_float, default=DEFAULT_SHIFT, help="timestep shift > 0 (<1: more steps near noise)")
    p.add_argument("--cfg_interval_start", type=probability, default=0.0, help="guide only where t >= this (0 noise, 1 image)")
    p.add_argument("--cfg_interval_end", type=probability, default=1.0, help="guide only where t <= this")
    p.add_argument("--guidance_checkpoint", default=None,
                   help="autoguidance: guide with this weaker checkpoint of the same run (checkpoints/early.ckpt) "
                        "instead of the unconditional model")
    p.add_argument("--classifier_scale", type=non_negative_float, default=0.0,
                   help="classifier guidance with stage 2's noisy-latent user classifier (0 = off)")
    p.add_argument("--classifier_interval_start", type=open_fraction, default=DEFAULT_CLASSIFIER_INTERVAL[0],
                   help="classifier guidance only where t >= this (> 0: its weight (1 - t) / t grows towards noise)")
    p.add_argument("--classifier_interval_end", type=probability, default=DEFAULT_CLASSIFIER_INTERVAL[1],
                   help="classifier guidance only where t <= this")
    p.add_argument("--seed", type=seed, default=0, help="same seed, same images")
    p.add_argument("--batch_size", type=positive_int, default=16, help="images sampled together")
    p.add_argument("--device", default="auto", type=device_word, help=DEVICE_WORDS)
    p.add_argument("--devices", type=positive_int, default=1,
                   help="processes that share the sampling, the same images as one: GPUs cuda:0..N-1 (CPU processes "
                        "with --device cpu); under torchrun/srun every process it starts samples")
    return p


# Stage 3's flags by name (common.config.Options), handed to generation.generate.generate whole.
GenerateOptions = options_class("GenerateOptions", build_parser, REQUIRED, __name__)
