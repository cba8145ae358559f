"""Stage 3: generate micro-Doppler images for chosen users from a stage 2 checkpoint."""
import argparse

from common.config import add_config_flag, parse_args
from common.errors import cli_entry
from models.transport import DEFAULT_SAMPLER, DEFAULT_SHIFT, DEFAULT_STEPS, SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    add_config_flag(p)
    p.add_argument("--dit_checkpoint", help="stage 2 checkpoint, e.g. trained_models/checkpoints/best.ckpt")
    p.add_argument("--vavae_path", help="the tokenizer used in stage 1")
    p.add_argument("--output_dir")
    p.add_argument("--user_ids", type=int, nargs="+", help="numbers in the user folder names (ID_3 -> 3)")
    p.add_argument("--num_samples_per_user", type=int, default=4)
    p.add_argument("--guidance_scale", type=float, default=4.0, help="1 = no guidance")
    p.add_argument("--num_steps", type=int, default=DEFAULT_STEPS, help="integration steps")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    p.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="timestep shift > 0 (<1: more steps near noise)")
    p.add_argument("--cfg_interval_start", type=float, default=0.0, help="guide only where t >= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    return p


@cli_entry
def main(argv=None) -> None:
    args = parse_args(build_parser(), argv, required=["dit_checkpoint", "vavae_path", "output_dir", "user_ids"])
    from generation.generate import generate
    generate(args.dit_checkpoint, args.vavae_path, args.output_dir, args.user_ids, args.num_samples_per_user,
             args.guidance_scale, args.num_steps, args.sampler, args.shift, args.cfg_interval_start,
             args.seed, args.batch_size, args.device)


if __name__ == "__main__":
    main()
