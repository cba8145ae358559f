#!/usr/bin/env bash
# Question: how does the pipeline do on real radar recordings, run as a CPU user would? The mmGait recordings
# (../shared/data/mmgait60: 7 people walking, 60 GHz) rendered in the stage 1 layout, stage 1's tokenizer check
# with the demo tokenizer, a 25-minute tokenizer fine-tune, stage 1 again, the demo recipe (configs/demo.yaml: its
# 200 epochs are 5,400 steps on these 892 images), stage 3 (SAMPLES per person; guidance 2 everywhere unless STAGE3
# says otherwise) and stage 4. ~52 minutes on an idle 2-core CPU.
# Runs share OUT's data, tokenizer and latents; one run = stage 2 with SEED (trained once per TRAIN_NAME and seed),
# stage 3 with STAGE3's flags and the same seed, stage 4: OUT/NAME_sSEED_1x/{samples,eval,setup.json}, the layout
# of identity_levers.sh, so `python experiments/summarise_levers.py OUT` tabulates them.
# Usage: OUT=/tmp/real SOURCE=../shared/data/mmgait60 [TUNE_MINUTES=25 MAX_STEPS=5600 SAMPLES=30 SEED=0 \
#        NAME=own_data TRAIN_NAME=own_data STAGE3="--guidance_scale 6 --cfg_interval_start 0.3"] \
#        experiments/real_recordings.sh [extra stage 2 flags]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/real_recordings}
SOURCE=${SOURCE:-../shared/data/mmgait60}
SAMPLES=${SAMPLES:-30}
TUNE_MINUTES=${TUNE_MINUTES:-25}
MAX_STEPS=${MAX_STEPS:-5600}     # a cap; the demo's 200 epochs end first here (5,400 steps)
SEED=${SEED:-0}
NAME=${NAME:-own_data}
TRAIN_NAME=${TRAIN_NAME:-$NAME}
STAGE3=${STAGE3-"--guidance_scale 2 --cfg_interval_start 0"}   # guidance 2 everywhere: see docs/experiments.md
RUN="$OUT/${NAME}_s${SEED}_1x"
TRAINED="$OUT/${TRAIN_NAME}_s${SEED}_1x"
mkdir -p "$OUT"
[ -d "$OUT/data/train" ] || python experiments/render_mmgait.py --source "$SOURCE" --output_dir "$OUT/data"
users=$(ls "$OUT/data/train" | sed 's/ID_//' | sort -n | tr '\n' ' ')
# The demo tokenizer's check on a look it never saw (stage 1 prints the PSNR; --tokenizer_check_images only).
[ -f "$OUT/tokenizer.safetensors" ] || python train_tokenizer.py --data_dir "$OUT/data" \
    --init_from assets/demo_vavae.safetensors --output_path "$OUT/tokenizer.safetensors" --max_minutes "$TUNE_MINUTES" \
    | tee "$OUT/tokenizer_log.txt"
[ -f "$OUT/latents/train.safetensors" ] || python stage1_extract_features.py --data_dir "$OUT/data" \
    --vavae_path "$OUT/tokenizer.safetensors" --output_path "$OUT/latents" | tee "$OUT/stage1_log.txt"
mkdir -p "$RUN" "$TRAINED"
if [ ! -f "$TRAINED/stage2_seconds.txt" ]; then
    [ "$TRAINED" = "$RUN" ] || { echo "train $TRAINED first"; exit 1; }
    start=$(date +%s)
    python stage2_train_dit.py --config configs/demo.yaml --seed "$SEED" --latent_dir "$OUT/latents" \
        --output_dir "$TRAINED/train" --vavae_path "$OUT/tokenizer.safetensors" --max_steps "$MAX_STEPS" "$@"
    echo $(( $(date +%s) - start )) > "$TRAINED/stage2_seconds.txt"
fi
# shellcheck disable=SC2086
python stage3_inference.py --config configs/demo.yaml $STAGE3 --seed "$SEED" \
    --dit_checkpoint "$TRAINED/train/checkpoints/best.ckpt" --vavae_path "$OUT/tokenizer.safetensors" \
    --output_dir "$RUN/samples" --user_ids $users --num_samples_per_user "$SAMPLES"
python stage4_evaluate.py --config configs/demo.yaml --seed "$SEED" --data_dir "$OUT/data" \
    --generated_dir "$RUN/samples" --output_dir "$RUN/eval" --vavae_path "$OUT/tokenizer.safetensors"
printf '{"name": "%s", "trained_as": "%s", "seed": %s, "steps_x": 1, "stage1": "", "stage2": "%s", "stage3": "%s"}\n' \
    "$NAME" "$TRAIN_NAME" "$SEED" "$*" "$STAGE3" > "$RUN/setup.json"
echo "done: $RUN"
