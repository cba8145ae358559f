#!/usr/bin/env bash
# Question: does non-leaking time-shift augmentation (--time_shift_aug P: latents rolled along time, the shift a
# condition that is 0 at sampling) raise identity and TSTR at the demo's compute? Reuses the data, latents and the
# 1x evaluation of experiments/identity_vs_compute.sh as the baseline, so CONFIG must be that run's (default
# configs/studies/demo_lr5e-4.yaml, the recipe of the published numbers: same flags, same steps).
# Usage: OUT=/tmp/identity_vs_compute P=0.5 SAMPLES=30 experiments/time_shift_aug.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-/tmp/identity_vs_compute}; P=${P:-0.5}; SAMPLES=${SAMPLES:-30}
CONFIG=${CONFIG:-configs/studies/demo_lr5e-4.yaml}
TOKENIZER=$DEMO_TOKENIZER
DATA=$OUT/data
read_config "$CONFIG"
run_once "$OUT/train_shift_$P.done" --after "$OUT/latents.done" python stage2_train_dit.py "${STAGE2_CONFIG[@]}" \
    --latent_dir "$OUT/latents" --output_dir "$OUT/train_shift_$P" --time_shift_aug "$P" --vavae_path "$TOKENIZER"
score_checkpoint "$OUT/train_shift_$P/checkpoints/last.ckpt" "$OUT/train_shift_$P.done" "$OUT/samples_shift_$P" \
    "$OUT/eval_shift_$P" 0
echo "done: $OUT/eval_shift_$P (baseline: $OUT/eval_1x)"
