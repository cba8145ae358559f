#!/usr/bin/env bash
# Question: does non-leaking time-shift augmentation (--time_shift_aug P: latents rolled along time, the shift a
# condition that is 0 at sampling) raise identity and TSTR at the demo's compute? Reuses the data, latents and the
# 1x evaluation of experiments/identity_vs_compute.sh (same flags, same steps) as the baseline.
# Usage: OUT=/tmp/identity_vs_compute P=0.5 SAMPLES=30 experiments/time_shift_aug.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/identity_vs_compute}; P=${P:-0.5}; SAMPLES=${SAMPLES:-30}
TOKENIZER=assets/demo_vavae.safetensors
python stage2_train_dit.py --config configs/demo.yaml --latent_dir "$OUT/latents" --output_dir "$OUT/train_shift_$P" \
    --time_shift_aug "$P" --vavae_path "$TOKENIZER"
python stage3_inference.py --guidance_scale 2.0 --dit_checkpoint "$OUT/train_shift_$P/checkpoints/last.ckpt" \
    --vavae_path "$TOKENIZER" --output_dir "$OUT/samples_shift_$P" --user_ids 1 2 3 4 5 6 --num_samples_per_user "$SAMPLES"
python stage4_evaluate.py --classifier_epochs 8 --data_dir "$OUT/data" --generated_dir "$OUT/samples_shift_$P" \
    --output_dir "$OUT/eval_shift_$P" --vavae_path "$TOKENIZER"
echo "done: $OUT/eval_shift_$P (baseline: $OUT/eval_1x)"
