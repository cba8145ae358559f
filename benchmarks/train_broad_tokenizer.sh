#!/usr/bin/env bash
# How assets/broad_vavae.safetensors was made (2-core CPU, 85 min of training, 1 thread, shared machine):
# the demo tokenizer fine-tuned on 64 people in random radar looks (data.simulate.sample_look) plus 24 people
# in the demo's look, none of them the demo's people; 64-px crops, bf16. Measure it with
# benchmarks/tokenizer_looks.py.   Usage: benchmarks/train_broad_tokenizer.sh WORK_DIR [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:?work folder}; minutes=${2:-85}
python -m data.simulate --output_dir "$work/broad" --num_users 64 --train_per_user 32 --val_per_user 3 --seed 101 --looks broad
python -m data.simulate --output_dir "$work/demolook" --num_users 24 --train_per_user 32 --val_per_user 3 --seed 202
for split in train val; do
  mkdir -p "$work/mix/$split"
  for u in $(seq 1 64); do ln -sfn "$work/broad/$split/ID_$u" "$work/mix/$split/ID_$u"; done
  for u in $(seq 1 24); do ln -sfn "$work/demolook/$split/ID_$u" "$work/mix/$split/ID_$((u + 64))"; done
done
OMP_NUM_THREADS=1 python train_tokenizer.py --data_dir "$work/mix" --output_path "$work/broad_vavae.safetensors" \
    --init_from assets/demo_vavae.safetensors --crop_size 64 --precision bf16 --lr 3e-4 --warmup 100 \
    --steps 100000 --max_minutes "$minutes" --eval_every 600 --batch_size 32
