#!/usr/bin/env bash
# The maintainer's check of issue 12 on a look no tokenizer here was trained on (data/unseen_look.py: 6 people,
# 40 train + 10 val each): fine-tune the demo tokenizer for 10 minutes on the train images, then LightningDiT-S/2
# for 60 epochs, 10 samples per person, stage 4. Extra arguments go to the pipeline (e.g. --lr 5e-4).
#   Usage: experiments/unseen_look_check.sh WORK_DIR [pipeline flags...]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
work=${1:?work folder}; shift
run_once "$work/data.done" python -m data.unseen_look --output_dir "$work/data" --num_users 6 --train_per_user 40 \
    --val_per_user 10 --seed 31
run_once "$work/tok.done" --after "$work/data.done" python train_tokenizer.py --data_dir "$work/data" \
    --output_path "$work/tok.safetensors" --init_from "$DEMO_TOKENIZER" --max_minutes 10
python run_complete_pipeline.py --data_dir "$work/data" --vavae_path "$work/tok.safetensors" --output_dir "$work/run" \
    --model LightningDiT-S/2 --max_epochs 60 --num_samples_per_user 10 "$@"
