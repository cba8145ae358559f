#!/usr/bin/env bash
# Question: how does the pipeline do on real radar recordings, run as a CPU user would? The mmGait recordings
# (../shared/data/mmgait60: 7 people walking, 60 GHz) rendered in the stage 1 layout, stage 1's tokenizer check
# with the demo tokenizer, a 25-minute tokenizer fine-tune, stage 1 again, the demo recipe (configs/demo.yaml) at
# 200 epochs with a validation every 5, as the README's path (5,400 steps on these 892 images), stage 3 (SAMPLES per person; guidance 2 everywhere unless STAGE3
# says otherwise) and stage 4. ~52 minutes on an idle 2-core CPU.
# Runs share OUT's data, tokenizer and latents; one run = stage 2 with SEED (trained once per TRAIN_NAME and seed),
# stage 3 with STAGE3's flags and the same seed, stage 4: OUT/NAME_sSEED_1x/{samples,eval,setup.json}, the layout
# of identity_levers.sh, so `python experiments/summarise_levers.py OUT` tabulates them.
# Usage: OUT=/tmp/real SOURCE=../shared/data/mmgait60 [TUNE_MINUTES=25 TUNE_FLAGS= EPOCHS=200 VAL_EVERY=5 \
#        MAX_STEPS=5600 SAMPLES=30 SEED=0 \
#        NAME=own_data TRAIN_NAME=own_data STAGE3="--guidance_scale 6 --cfg_interval_start 0.3"] \
#        experiments/real_recordings.sh [extra stage 2 flags]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-/tmp/real_recordings}
SOURCE=${SOURCE:-../shared/data/mmgait60}
SAMPLES=${SAMPLES:-30}
TUNE_MINUTES=${TUNE_MINUTES:-25}   # the fine-tune's clock (on a CPU its PSNR still rises then: docs/tokenizers.md)
TUNE_FLAGS=${TUNE_FLAGS-}          # e.g. "--early_stop_patience 3" (the runs of 2026-12-06)
EPOCHS=${EPOCHS:-200}            # stage 2's epochs (27 steps each on these 892 images at batch 32)
VAL_EVERY=${VAL_EVERY:-5}        # a validation (val_loss, val_identity) every this many epochs
MAX_STEPS=${MAX_STEPS:-5600}     # a cap; the demo's 200 epochs end first here (5,400 steps)
SEED=${SEED:-0}
NAME=${NAME:-own_data}
TRAIN_NAME=${TRAIN_NAME:-$NAME}
STAGE3=${STAGE3-"--guidance_scale 2 --cfg_interval_start 0"}   # guidance 2 everywhere: see docs/experiments.md
CONFIG=configs/demo.yaml
DATA=$OUT/data
TOKENIZER=$OUT/tokenizer.safetensors
RUN="$OUT/${NAME}_s${SEED}_1x"
TRAINED="$OUT/${TRAIN_NAME}_s${SEED}_1x"
read_config "$CONFIG"
run_once "$DATA.done" python experiments/render_mmgait.py --source "$SOURCE" --output_dir "$DATA"
# The demo tokenizer's check on a look it never saw (stage 1 prints the PSNR; --tokenizer_check_images only).
# shellcheck disable=SC2086
run_once "$TOKENIZER.done" --after "$DATA.done" logged "$OUT/tokenizer_log.txt" python train_tokenizer.py \
    --data_dir "$DATA" --init_from "$DEMO_TOKENIZER" --output_path "$TOKENIZER" --max_minutes "$TUNE_MINUTES" $TUNE_FLAGS
run_once "$OUT/latents.done" --after "$TOKENIZER.done" logged "$OUT/stage1_log.txt" python stage1_extract_features.py \
    "${STAGE1_CONFIG[@]}" --data_dir "$DATA" --vavae_path "$TOKENIZER" --output_path "$OUT/latents"
train() {   # train [stage 2 flags]: this seed's stage 2, its wall time in TRAINED/stage2_seconds.txt
    local start
    start=$(date +%s)
    python stage2_train_dit.py "$@" --latent_dir "$OUT/latents" --output_dir "$TRAINED/train" --vavae_path "$TOKENIZER"
    echo $(( $(date +%s) - start )) > "$TRAINED/stage2_seconds.txt"
}
mkdir -p "$RUN" "$TRAINED"
if [ "$TRAINED" = "$RUN" ]; then
    run_once "$RUN/stage2.done" --after "$OUT/latents.done" \
        train "${STAGE2_CONFIG[@]}" --max_epochs "$EPOCHS" --val_every_n_epochs "$VAL_EVERY" --seed "$SEED" --max_steps "$MAX_STEPS" "$@"
elif [ ! -f "$TRAINED/stage2.done" ]; then
    echo "train $TRAINED first (NAME=$TRAIN_NAME, same SEED)"; exit 2
fi
# Stage 4 at batch 32 as the published runs (the script then gave stage 4 configs/demo.yaml, whose batch_size is
# the DiT's); the demo's own stage 4 trains its classifiers at 64.
# shellcheck disable=SC2086
score_checkpoint "$TRAINED/train/checkpoints/best.ckpt" "$TRAINED/stage2.done" "$RUN/samples" "$RUN/eval" "$SEED" \
    $STAGE3 -- --batch_size 32
printf '{"name": "%s", "trained_as": "%s", "seed": %s, "steps_x": 1, "stage1": "", "stage2": "%s", "stage3": "%s"}\n' \
    "$NAME" "$TRAIN_NAME" "$SEED" "$*" "$STAGE3" > "$RUN/setup.json"
echo "done: $RUN"
