#!/usr/bin/env bash
# Question: does autoguidance (Karras et al. 2024: guide with an earlier, weaker checkpoint of the same run)
# raise identity and TSTR over classifier-free guidance at the same scale? Uses the checkpoints of
# experiments/identity_vs_compute.sh: the GOOD one sampled with guidance SCALE, guided by the unconditional
# model (its eval_<good>x, made by that script) or by the BAD checkpoint (here), then stage 4. CONFIG (stage 3
# and 4 flags) as in that script: configs/studies/demo_lr5e-4.yaml, the recipe of the published numbers.
# Usage: OUT=/tmp/identity_vs_compute GOOD=4 BAD=1 SCALE=2.0 SAMPLES=30 experiments/autoguidance_vs_cfg.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-/tmp/identity_vs_compute}
GOOD=${GOOD:-4}; BAD=${BAD:-1}; SCALE=${SCALE:-2.0}; SAMPLES=${SAMPLES:-30}
CONFIG=${CONFIG:-configs/studies/demo_lr5e-4.yaml}
TOKENIZER=$DEMO_TOKENIZER
DATA=$OUT/data
read_config "$CONFIG"
name="auto_${GOOD}x_by_${BAD}x_w${SCALE}"
score_checkpoint "$OUT/ckpt_${GOOD}x.ckpt" "$OUT/ckpt_${GOOD}x.done" "$OUT/samples_$name" "$OUT/eval_$name" 0 \
    --guidance_scale "$SCALE" --guidance_checkpoint "$OUT/ckpt_${BAD}x.ckpt"
echo "done: $OUT/eval_$name"
