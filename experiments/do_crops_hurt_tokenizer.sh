#!/usr/bin/env bash
# Does training on crops hurt full-frame PSNR? Fine-tunes the demo tokenizer on the demo's own data for the same
# wall time with 64-px crops, 128-px crops and full frames (batch 32, lr 2e-4), each measured on the 60 full
# held-out images (results: experiments/results/tokenizer_crops_cpu.json).   Usage: experiments/do_crops_hurt_tokenizer.sh WORK_DIR [MINUTES]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=${1:?work folder}; minutes=${2:-4}
simulate_demo_data "$work/data"
for crop in 64 128 256; do
  python train_tokenizer.py --data_dir "$work/data" --output_path "$work/tok_$crop.safetensors" \
     --init_from "$DEMO_TOKENIZER" --crop_size $crop --batch_size 32 --max_minutes "$minutes" \
     --eval_every 0 --lr 2e-4 2>&1 | grep -E "^(trained|held-out PSNR over)"
done
