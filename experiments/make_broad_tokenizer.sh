#!/usr/bin/env bash
# How assets/broad_vavae.safetensors was made: the tokenizer START (default: the previous broad tokenizer,
# itself the demo tokenizer fine-tuned 85 CPU min on 64-px crops of broad looks) fine-tuned on *full frames*
# of 64 people in random radar looks (data.simulate.sample_look) and 64 in the demo's look (half the images:
# the demo look must not be given up), none of them the demo's people. Full frames because crops teach
# another GroupNorm regime (tokenizer/recipe.py, FINETUNE). Measure it with experiments/tokenizer_psnr_per_look.py.
#   Usage: experiments/make_broad_tokenizer.sh WORK_DIR [MINUTES] [START]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=${1:?work folder}; minutes=${2:-70}; start=${3:-assets/broad_vavae.safetensors}
run_once "$work/broad.done" python -m data.simulate --output_dir "$work/broad" --num_users 64 --train_per_user 20 \
    --val_per_user 1 --seed 101 --looks broad
run_once "$work/demolook.done" python -m data.simulate --output_dir "$work/demolook" --num_users 64 \
    --train_per_user 20 --val_per_user 1 --seed 202
for split in train val; do
  mkdir -p "$work/mix/$split"
  for u in $(seq 1 64); do
    ln -sfn "$work/broad/$split/ID_$u" "$work/mix/$split/ID_$u"
    ln -sfn "$work/demolook/$split/ID_$u" "$work/mix/$split/ID_$((u + 64))"
  done
done
python train_tokenizer.py --data_dir "$work/mix" --output_path "$work/broad_vavae.safetensors" --init_from "$start" \
    --lr 3e-4 --warmup 20 --batch_size 8 --steps 100000 --max_minutes "$minutes" --eval_every 0
