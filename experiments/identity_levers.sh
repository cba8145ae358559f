#!/usr/bin/env bash
# Question: which stage 2 / stage 3 lever makes the demo's people recognisable sooner, beyond seed-to-seed spread?
# One run = the demo recipe (configs/demo.yaml) for STEPS_X times the demo's 1,400 steps with one
# SEED, then stage 3 (the demo's guidance, SAMPLES per person, the same seed) and stage 4. Every run shares one simulated data set and
# one stage 1 folder, so runs differ only by their flags and seed. Stage 2's wall time goes to
# OUT/NAME_sSEED_STEPS_Xx/stage2_seconds.txt (compare levers at equal CPU time, on an otherwise idle machine).
# A stage-3-only lever reuses another run's stage 2: TRAIN_NAME=baseline NAME=cg2 STAGE3="--classifier_scale 2".
# STAGE2 comes last, so it may also set --max_epochs (e.g. fewer epochs of smaller batches, at equal CPU time).
# STAGE1 adds stage 1 flags (e.g. "--repa_encoder spectrogram" for --repa_weight); each STAGE1 has its own latents.
# Usage: OUT=/tmp/levers NAME=baseline SEED=0 STEPS_X=1 STAGE2="--ema_std 0.05" STAGE3="--classifier_scale 2" \
#            experiments/identity_levers.sh
# Summary of every run in OUT: python experiments/summarise_levers.py OUT
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/identity_levers}
NAME=${NAME:-baseline}
SEED=${SEED:-0}
STEPS_X=${STEPS_X:-1}
SAMPLES=${SAMPLES:-30}
STAGE2=${STAGE2:-}
STAGE3=${STAGE3:-}
STAGE1=${STAGE1:-}
TOKENIZER=assets/demo_vavae.safetensors
DEMO_EPOCHS=$(sed -n 's/^max_epochs: *//p' configs/demo.yaml)   # 200 epochs = 1,400 steps
LATENTS="$OUT/latents$(printf '%s' "$STAGE1" | tr -c 'a-z0-9' '_')"
TRAIN_NAME=${TRAIN_NAME:-$NAME}
RUN="$OUT/${NAME}_s${SEED}_${STEPS_X}x"
TRAINED="$OUT/${TRAIN_NAME}_s${SEED}_${STEPS_X}x"
mkdir -p "$OUT"
[ -f "$OUT/data/.done" ] || { python -m data.simulate --output_dir "$OUT/data" --num_users 6 --train_per_user 40 \
    --val_per_user 10 --seed 0 && touch "$OUT/data/.done"; }
# shellcheck disable=SC2086
[ -f "$LATENTS/train.safetensors" ] || python stage1_extract_features.py --data_dir "$OUT/data" \
    --vavae_path "$TOKENIZER" --output_path "$LATENTS" $STAGE1
mkdir -p "$RUN"
ONE_X="$OUT/${NAME}_s${SEED}_1x"
if [ ! -f "$TRAINED/stage2_seconds.txt" ]; then
    [ "$TRAINED" = "$RUN" ] || { echo "train $TRAINED first"; exit 1; }
    start=$(date +%s)
    # A longer run continues the 1x run of the same lever and seed (stage 2 resumes exactly), counting its time.
    if [ "$STEPS_X" != 1 ] && [ -f "$ONE_X/stage2_seconds.txt" ] && [ ! -d "$RUN/train" ]; then
        cp -r "$ONE_X/train" "$RUN/train"
        start=$(( start - $(cat "$ONE_X/stage2_seconds.txt") ))
    fi
    # shellcheck disable=SC2086
    python stage2_train_dit.py --config configs/demo.yaml --max_epochs $((DEMO_EPOCHS * STEPS_X)) $STAGE2 \
        --seed "$SEED" --latent_dir "$LATENTS" --output_dir "$RUN/train" --vavae_path "$TOKENIZER"
    echo $(( $(date +%s) - start )) > "$RUN/stage2_seconds.txt"
fi
if [ ! -f "$RUN/eval/report.json" ]; then
    # shellcheck disable=SC2086
    python stage3_inference.py --config configs/demo.yaml $STAGE3 --seed "$SEED" \
        --dit_checkpoint "$TRAINED/train/checkpoints/last.ckpt" --vavae_path "$TOKENIZER" --output_dir "$RUN/samples" \
        --user_ids 1 2 3 4 5 6 --num_samples_per_user "$SAMPLES"
    python stage4_evaluate.py --classifier_epochs 8 --seed "$SEED" --data_dir "$OUT/data" \
        --generated_dir "$RUN/samples" --output_dir "$RUN/eval" --vavae_path "$TOKENIZER"
fi
printf '{"name": "%s", "trained_as": "%s", "seed": %s, "steps_x": %s, "stage1": "%s", "stage2": "%s", "stage3": "%s"}\n' \
    "$NAME" "$TRAIN_NAME" "$SEED" "$STEPS_X" "$STAGE1" "$STAGE2" "$STAGE3" > "$RUN/setup.json"
echo "done: $RUN"
