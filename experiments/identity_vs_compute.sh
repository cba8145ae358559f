#!/usr/bin/env bash
# Question: does identity keep rising with training compute on the demo data, or flatten below the
# tokenizer-reconstruction ceiling? One run of configs/demo.yaml to 8x the demo's steps, EMA checkpoints kept at
# 1x, 2x, 4x, 8x, then stage 3 (SAMPLES per person) + stage 4 on each. Results: OUT/curve.json (plot with
# experiments/plot_identity_vs_compute.py).
# Usage: OUT=/tmp/curve SAMPLES=30 MULTIPLES="1 2 4 8" experiments/identity_vs_compute.sh [extra stage 2 flags]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/identity_vs_compute}
SAMPLES=${SAMPLES:-30}
MULTIPLES=${MULTIPLES:-"1 2 4 8"}
DEMO_EPOCHS=200                                   # configs/demo.yaml: 200 epochs = 1,400 steps
TOKENIZER=assets/demo_vavae.safetensors
# configs/demo.yaml's stage 2 keys (max_epochs set per checkpoint below); stage 3 guidance 2.0, stage 4 8 epochs.
DEMO_STAGE2="--batch_size 32 --val_every_n_epochs 5 --model LightningDiT-S/2 --depth 4 --hidden_size 192 --num_heads 3
 --lr 0.0005 --precision bf16-mixed --ema_decay 0.998 --checkpoint_every_n_steps 200"
mkdir -p "$OUT"
[ -f "$OUT/data/.done" ] || { python -m data.simulate --output_dir "$OUT/data" --num_users 6 --train_per_user 40 \
    --val_per_user 10 --seed 0 && touch "$OUT/data/.done"; }
[ -f "$OUT/latents/train.safetensors" ] || python stage1_extract_features.py --data_dir "$OUT/data" \
    --vavae_path "$TOKENIZER" --output_path "$OUT/latents"
for m in $MULTIPLES; do
    ckpt="$OUT/ckpt_${m}x.ckpt"
    if [ ! -f "$ckpt" ]; then
        start=$(date +%s)
        python stage2_train_dit.py $DEMO_STAGE2 --latent_dir "$OUT/latents" --output_dir "$OUT/train" \
            --max_epochs $((DEMO_EPOCHS * m)) "$@"
        cp "$OUT/train/checkpoints/last.ckpt" "$ckpt"
        echo "$m $(( $(date +%s) - start ))" >> "$OUT/stage2_seconds.txt"
    fi
done
for m in $MULTIPLES; do
    [ -f "$OUT/eval_${m}x/report.json" ] && continue
    python stage3_inference.py --guidance_scale 2.0 --dit_checkpoint "$OUT/ckpt_${m}x.ckpt" \
        --vavae_path "$TOKENIZER" --output_dir "$OUT/samples_${m}x" --user_ids 1 2 3 4 5 6 \
        --num_samples_per_user "$SAMPLES"
    python stage4_evaluate.py --classifier_epochs 8 --data_dir "$OUT/data" --generated_dir "$OUT/samples_${m}x" \
        --output_dir "$OUT/eval_${m}x" --vavae_path "$TOKENIZER"
done
echo "done: $OUT"
