"""Train a VA-VAE tokenizer on a folder of spectrogram images, or fine-tune one on your own images.

    python train_tokenizer.py --data_dir D --output_path tok.safetensors --steps 6000
    python train_tokenizer.py --data_dir D --output_path tok.safetensors \
        --init_from assets/demo_vavae.safetensors --max_minutes 10
"""
import argparse

from common.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="stage-1 layout: D/train/<user>/*.png and D/val/<user>/*.png")
    p.add_argument("--output_path", required=True, help="the .safetensors file to write")
    p.add_argument("--init_from", default=None,
                   help="start from this tokenizer (project .safetensors or the published VA-VAE .pt) and "
                        "fine-tune it on --data_dir; --width and --num_res_blocks then come from the file")
    p.add_argument("--decoder_only", action="store_true",
                   help="with --init_from: train the decoder only, so latents (and any DiT trained on them) stay valid")
    p.add_argument("--crop_size", type=int, default=None,
                   help="train on random crops of this size (multiple of 16; default: the full image from scratch, "
                        "64 with --init_from): a 64-px crop costs 1/16 of a 256-px image; PSNR is always measured "
                        "on full images")
    p.add_argument("--width", type=int, default=48, help="base channels (the official tokenizer has 128)")
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (default: 6e-4 from scratch, 5e-4 with --init_from)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps before the cosine decay (default: 200 from scratch, 20 with --init_from)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop after this many minutes; the cosine schedule then follows the clock")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default bf16 where it is native (GPUs of compute capability >= 8.0, CPUs with AVX512-BF16/AMX), else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="fraction of train images held out for PSNR when the folder has no val images")
    p.add_argument("--eval_every", type=int, default=1000, help="val PSNR every this many steps (0: only at the end)")
    p.add_argument("--align_weights", default=None,
                   help="local torchvision ResNet/ViT state dict for the VA-VAE alignment term (off if absent)")
    p.add_argument("--align_weight", type=float, default=0.1)
    p.add_argument("--l1_weight", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from training.tokenizer import train_tokenizer     # torch import after argument errors
    train_tokenizer(args.data_dir, args.output_path, width=args.width, num_res_blocks=args.num_res_blocks,
                    image_size=args.image_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    warmup=args.warmup, device=args.device, precision=args.precision,
                    val_fraction=args.val_fraction, align_weights=args.align_weights,
                    align_weight=args.align_weight, l1_weight=args.l1_weight, eval_every=args.eval_every,
                    max_minutes=args.max_minutes, init_from=args.init_from, decoder_only=args.decoder_only,
                    crop_size=args.crop_size, compile_model=args.compile, seed=args.seed)


if __name__ == "__main__":
    main()
