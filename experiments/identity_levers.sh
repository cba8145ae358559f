#!/usr/bin/env bash
# Question: which stage 2 / stage 3 lever makes the demo's people recognisable sooner, beyond seed-to-seed spread?
# One run = the demo recipe (CONFIG) for STEPS_X times the demo's 1,400 steps with one
# SEED, then stage 3 (the demo's guidance, SAMPLES per person, the same seed) and stage 4. Every run shares one simulated data set and
# one stage 1 folder, so runs differ only by their flags and seed. Stage 2's wall time goes to
# OUT/NAME_sSEED_STEPS_Xx/stage2_seconds.txt (compare levers at equal CPU time, on an otherwise idle machine).
# A stage-3-only lever reuses another run's stage 2: TRAIN_NAME=baseline NAME=cg2 STAGE3="--classifier_scale 2".
# STAGE2 comes last, so it may also set --max_epochs (e.g. fewer epochs of smaller batches, at equal CPU time).
# STAGE1 adds stage 1 flags (e.g. "--repa_encoder spectrogram" for --repa_weight); each STAGE1 has its own latents.
# CONFIG (default configs/demo.yaml) gives every stage its keys as run_complete_pipeline.py would; the study's rows
# at lr 5e-4 and guidance 2.0 (the demo's recipe before it) are CONFIG=configs/studies/demo_lr5e-4.yaml (give runs
# of another CONFIG their own NAME: a changed command into the same run folder is redone, not added).
# Usage: OUT=/tmp/levers NAME=baseline SEED=0 STEPS_X=1 STAGE2="--ema_std 0.05" STAGE3="--classifier_scale 2" \
#            [CONFIG=...] experiments/identity_levers.sh
# Summary of every run in OUT: python experiments/summarise_levers.py OUT
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-/tmp/identity_levers}
NAME=${NAME:-baseline}
SEED=${SEED:-0}
STEPS_X=${STEPS_X:-1}
SAMPLES=${SAMPLES:-30}
STAGE2=${STAGE2:-}
STAGE3=${STAGE3:-}
STAGE1=${STAGE1:-}
CONFIG=${CONFIG:-configs/demo.yaml}
TOKENIZER=$DEMO_TOKENIZER
DATA=$OUT/data
read_config "$CONFIG"
EPOCHS=$(config_value "$CONFIG" max_epochs)   # the demo's 200 epochs = 1,400 steps
LATENTS="$OUT/latents$(printf '%s' "$STAGE1" | tr -c 'a-z0-9' '_')"
TRAIN_NAME=${TRAIN_NAME:-$NAME}
RUN="$OUT/${NAME}_s${SEED}_${STEPS_X}x"
TRAINED="$OUT/${TRAIN_NAME}_s${SEED}_${STEPS_X}x"
ONE_X="$OUT/${NAME}_s${SEED}_1x"
simulate_demo_data "$DATA"
# shellcheck disable=SC2086
run_once "$LATENTS.done" --after "$DATA/.simulated.json" python stage1_extract_features.py "${STAGE1_CONFIG[@]}" \
    --data_dir "$DATA" --vavae_path "$TOKENIZER" --output_path "$LATENTS" $STAGE1
train() {   # train [stage 2 flags]: this run's stage 2, its wall time in RUN/stage2_seconds.txt
    local start
    start=$(date +%s)
    # A longer run continues the 1x run of the same lever and seed (stage 2 resumes exactly), counting its time.
    if [ "$STEPS_X" != 1 ] && [ -f "$ONE_X/stage2.done" ] && [ ! -d "$RUN/train" ]; then
        cp -r "$ONE_X/train" "$RUN/train"
        start=$(( start - $(cat "$ONE_X/stage2_seconds.txt") ))
    fi
    python stage2_train_dit.py "$@" --latent_dir "$LATENTS" --output_dir "$RUN/train" --vavae_path "$TOKENIZER"
    echo $(( $(date +%s) - start )) > "$RUN/stage2_seconds.txt"
}
mkdir -p "$RUN"
if [ "$TRAINED" = "$RUN" ]; then
    # shellcheck disable=SC2086
    run_once "$RUN/stage2.done" --after "$LATENTS.done" \
        train "${STAGE2_CONFIG[@]}" --max_epochs $((EPOCHS * STEPS_X)) $STAGE2 --seed "$SEED"
elif [ ! -f "$TRAINED/stage2.done" ]; then
    echo "train $TRAINED first (NAME=$TRAIN_NAME, same SEED and STEPS_X)"; exit 2
fi
# shellcheck disable=SC2086
score_checkpoint "$TRAINED/train/checkpoints/last.ckpt" "$TRAINED/stage2.done" "$RUN/samples" "$RUN/eval" "$SEED" $STAGE3
printf '{"name": "%s", "trained_as": "%s", "seed": %s, "steps_x": %s, "stage1": "%s", "stage2": "%s", "stage3": "%s"}\n' \
    "$NAME" "$TRAIN_NAME" "$SEED" "$STEPS_X" "$STAGE1" "$STAGE2" "$STAGE3" > "$RUN/setup.json"
echo "done: $RUN"
