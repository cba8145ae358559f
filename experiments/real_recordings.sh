#!/usr/bin/env bash
# Question: how does the pipeline do on real radar recordings, run as a CPU user would? The mmGait recordings
# (../shared/data/mmgait60: 7 people walking, 60 GHz) rendered in the stage 1 layout, stage 1's tokenizer check
# with the demo tokenizer, a 25-minute tokenizer fine-tune, stage 1 again, the demo recipe (configs/demo.yaml: its
# 200 epochs are 5,400 steps on these 892 images), stage 3 (SAMPLES per person) and stage 4. ~52 minutes on an idle
# 2-core CPU. Numbers: OUT/eval/report.json.
# Usage: OUT=/tmp/real SOURCE=../shared/data/mmgait60 [TUNE_MINUTES=25 MAX_STEPS=5600 SAMPLES=30] \
#        experiments/real_recordings.sh [extra stage 2 flags]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/real_recordings}
SOURCE=${SOURCE:-../shared/data/mmgait60}
SAMPLES=${SAMPLES:-30}
TUNE_MINUTES=${TUNE_MINUTES:-25}
MAX_STEPS=${MAX_STEPS:-5600}     # a cap; the demo's 200 epochs end first here (5,400 steps)
mkdir -p "$OUT"
[ -d "$OUT/data/train" ] || python experiments/render_mmgait.py --source "$SOURCE" --output_dir "$OUT/data"
users=$(ls "$OUT/data/train" | sed 's/ID_//' | sort -n | tr '\n' ' ')
# The demo tokenizer's check on a look it never saw (stage 1 prints the PSNR; --tokenizer_check_images only).
[ -f "$OUT/tokenizer.safetensors" ] || python train_tokenizer.py --data_dir "$OUT/data" \
    --init_from assets/demo_vavae.safetensors --output_path "$OUT/tokenizer.safetensors" --max_minutes "$TUNE_MINUTES" \
    | tee "$OUT/tokenizer_log.txt"
[ -f "$OUT/latents/train.safetensors" ] || python stage1_extract_features.py --data_dir "$OUT/data" \
    --vavae_path "$OUT/tokenizer.safetensors" --output_path "$OUT/latents" | tee "$OUT/stage1_log.txt"
[ -f "$OUT/train/checkpoints/best.ckpt" ] || python stage2_train_dit.py --config configs/demo.yaml \
    --latent_dir "$OUT/latents" --output_dir "$OUT/train" --vavae_path "$OUT/tokenizer.safetensors" \
    --max_steps "$MAX_STEPS" "$@"
python stage3_inference.py --config configs/demo.yaml --dit_checkpoint "$OUT/train/checkpoints/best.ckpt" \
    --vavae_path "$OUT/tokenizer.safetensors" --output_dir "$OUT/samples" --user_ids $users --num_samples_per_user "$SAMPLES"
python stage4_evaluate.py --config configs/demo.yaml --data_dir "$OUT/data" --generated_dir "$OUT/samples" \
    --output_dir "$OUT/eval" --vavae_path "$OUT/tokenizer.safetensors"
echo "done: $OUT"
