"""Stage 2: train a user-conditioned LightningDiT on the stage 1 latents (PyTorch Lightning, DDP)."""
import argparse
import sys

from common.config import add_config_flag, parse_args
from common.errors import cli_entry
from models.lightningdit import DEFAULT_MODEL, LightningDiT_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    add_config_flag(p)
    p.add_argument("--latent_dir", help="stage 1 output (train/val.safetensors, latent_stats.safetensors)")
    p.add_argument("--output_dir", help="writes checkpoints/, lightning_logs/, loss_curve.png")
    p.add_argument("--batch_size", type=int, default=32, help="per device")
    p.add_argument("--max_epochs", type=int, default=100)
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (overrides epochs)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup_steps", type=int, default=0, help="linear lr warm-up over this many steps (0: none)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda"])
    p.add_argument("--precision", default="bf16-mixed", help="32-true, 16-mixed (T4), bf16-mixed (Ampere+)")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(LightningDiT_models))
    p.add_argument("--depth", type=int, default=None, help="override the named size's depth")
    p.add_argument("--hidden_size", type=int, default=None, help="override the named size's width")
    p.add_argument("--num_heads", type=int, default=None, help="override the named size's heads")
    p.add_argument("--use_qknorm", action="store_true", help="RMS-normalise q and k (stabler at high lr)")
    p.add_argument("--class_dropout_prob", type=float, default=0.1, help="label dropout for guidance")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--ema_decay", type=float, default=0.9995)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0 disables")
    p.add_argument("--timestep_sampling", default="uniform", choices=["uniform", "logit_normal"])
    p.add_argument("--cosine_loss_weight", type=float, default=0.0)
    p.add_argument("--checkpoint_every_n_steps", type=int, default=500, help="last.ckpt cadence")
    p.add_argument("--log_every_n_steps", type=int, default=10)
    p.add_argument("--val_every_n_epochs", type=int, default=1)
    p.add_argument("--restart", action="store_true",
                   help="start over: remove the previous run's last.ckpt and best.ckpt")
    p.add_argument("--init_from", default=None, help="published LightningDiT weights to start from")
    p.add_argument("--finetune", default="full", choices=["full", "partial", "lora"],
                   help="with --init_from: train everything, only adaLN/embeddings/final layer, or those "
                        "plus low-rank adapters on attention/MLP (frozen base)")
    p.add_argument("--lora_rank", type=int, default=16, help="--finetune lora: rank of the adapters")
    p.add_argument("--lora_alpha", type=float, default=None, help="--finetune lora: scale alpha/rank (default rank)")
    p.add_argument("--backbone_lr_scale", type=float, default=1.0, help="lr factor for the transformer blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check_memory", type=float, default=None, metavar="GB",
                   help="only estimate the peak memory per device for these flags; exit 0 if it fits in GB")
    p.add_argument("--skip_memory_check", action="store_true",
                   help="train on CUDA even if the estimate exceeds the free memory")
    return p


@cli_entry
def main(argv=None) -> None:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.check_memory is not None:   # a question about the flags: no data or output folder needed
        from training.memory import GB, memory_report
        fits, text, _ = memory_report(args, args.check_memory * GB)
        print(text)
        sys.exit(0 if fits else 1)
    args = parse_args(parser, argv, required=["latent_dir", "output_dir"])
    from training.train_dit import train
    train(args)


if __name__ == "__main__":
    main()
