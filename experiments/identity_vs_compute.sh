#!/usr/bin/env bash
# Question: does identity keep rising with training compute on the demo data, or flatten below the
# tokenizer-reconstruction ceiling? One run of CONFIG to 8x its epochs (the demo's 200 epochs = 1,400 steps), EMA
# checkpoints kept at 1x, 2x, 4x, 8x, then stage 3 (SAMPLES per person) + stage 4 on each. Results:
# OUT/eval_<M>x/report.json (curve and plot: experiments/plot_identity_vs_compute.py --run_dir OUT).
# CONFIG defaults to configs/studies/demo_lr5e-4.yaml, the demo's recipe when the published curve was measured
# (2026-11-29: lr 5e-4, guidance 2.0); CONFIG=configs/demo.yaml measures today's.
# Usage: OUT=/tmp/curve SAMPLES=30 MULTIPLES="1 2 4 8" [CONFIG=...] experiments/identity_vs_compute.sh [extra stage 2 flags]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-/tmp/identity_vs_compute}
SAMPLES=${SAMPLES:-30}
MULTIPLES=${MULTIPLES:-"1 2 4 8"}
CONFIG=${CONFIG:-configs/studies/demo_lr5e-4.yaml}
TOKENIZER=$DEMO_TOKENIZER
DATA=$OUT/data
read_config "$CONFIG"
EPOCHS=$(config_value "$CONFIG" max_epochs)
simulate_demo_data "$DATA"
run_once "$OUT/latents.done" --after "$DATA/.simulated.json" python stage1_extract_features.py "${STAGE1_CONFIG[@]}" --data_dir "$DATA" \
    --vavae_path "$TOKENIZER" --output_path "$OUT/latents"
train_to() {   # train_to M [stage 2 flags]: the one run continued (with those flags); its last (EMA) checkpoint kept
    local m=$1 start
    shift
    start=$(date +%s)
    python stage2_train_dit.py "$@" --latent_dir "$OUT/latents" --output_dir "$OUT/train"
    cp "$OUT/train/checkpoints/last.ckpt" "$OUT/ckpt_${m}x.ckpt"
    echo "$m $(( $(date +%s) - start ))" >> "$OUT/stage2_seconds.txt"
}
previous=$OUT/latents.done
for m in $MULTIPLES; do   # each multiple continues the one before it
    run_once "$OUT/ckpt_${m}x.done" --after "$previous" \
        train_to "$m" "${STAGE2_CONFIG[@]}" --max_epochs $((EPOCHS * m)) "$@"
    previous=$OUT/ckpt_${m}x.done
done
for m in $MULTIPLES; do
    score_checkpoint "$OUT/ckpt_${m}x.ckpt" "$OUT/ckpt_${m}x.done" "$OUT/samples_${m}x" "$OUT/eval_${m}x" 0
done
echo "done: $OUT"
