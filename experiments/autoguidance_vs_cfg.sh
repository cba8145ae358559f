#!/usr/bin/env bash
# Question: does autoguidance (Karras et al. 2024: guide with an earlier, weaker checkpoint of the same run)
# raise identity and TSTR over classifier-free guidance at the same scale? Uses the checkpoints of
# experiments/identity_vs_compute.sh: the GOOD one sampled with guidance SCALE, guided by the unconditional
# model (its eval_<good>x, made by that script) or by the BAD checkpoint (here), then stage 4.
# Usage: OUT=/tmp/identity_vs_compute GOOD=4 BAD=1 SCALE=2.0 SAMPLES=30 experiments/autoguidance_vs_cfg.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/identity_vs_compute}
GOOD=${GOOD:-4}; BAD=${BAD:-1}; SCALE=${SCALE:-2.0}; SAMPLES=${SAMPLES:-30}
TOKENIZER=assets/demo_vavae.safetensors
name="auto_${GOOD}x_by_${BAD}x_w${SCALE}"
python stage3_inference.py --guidance_scale "$SCALE" --dit_checkpoint "$OUT/ckpt_${GOOD}x.ckpt" \
    --guidance_checkpoint "$OUT/ckpt_${BAD}x.ckpt" --vavae_path "$TOKENIZER" --output_dir "$OUT/samples_$name" \
    --user_ids 1 2 3 4 5 6 --num_samples_per_user "$SAMPLES"
python stage4_evaluate.py --classifier_epochs 8 --data_dir "$OUT/data" --generated_dir "$OUT/samples_$name" \
    --output_dir "$OUT/eval_$name" --vavae_path "$TOKENIZER"
echo "done: $OUT/eval_$name"
