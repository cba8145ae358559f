#!/usr/bin/env bash
# Question: how recognisable are real people at the compute a GPU user has? On one GPU, in at most 8 minutes:
# the real mmGait recordings (../shared/data/mmgait60, 7 people) rendered in the stage 1 layout, a tokenizer
# fine-tune of the demo tokenizer on them, stage 1, stage 2 at B/1 for as many steps as fit, stage 3 (with the
# recipe's guidance) and stage 4; one JSON with the headline numbers and each part's seconds:
# OUT/gpu_quality.json.
# Usage (a lent GPU):  OUT=/tmp/gpu_quality experiments/gpu_quality.sh
#        (the CPU, tiny sizes; what tests/test_gpu_quality.py runs): SIZE=tiny OUT=/tmp/gq experiments/gpu_quality.sh
# Env: SOURCE (the vol*.npz folder), STAGE2_FLAGS / STAGE3_FLAGS (the recipe, default the demo's levers).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-/tmp/gpu_quality}
SOURCE=${SOURCE:-../shared/data/mmgait60}
SIZE=${SIZE:-gpu}
STAGE2_FLAGS=${STAGE2_FLAGS:-}
STAGE3_FLAGS=${STAGE3_FLAGS:-"--guidance_scale 2.0 --classifier_scale 4"}
if [ "$SIZE" = gpu ]; then
    # B/1 at batch 32 in bf16 runs ~14 steps/s on an H200 (benchmarks/gpu_check.py): 3,000 steps ~3.5 minutes.
    CONFIG=configs/sizes/b1.yaml
    TOKENIZER_FLAGS="--max_minutes 1.5 --device cuda"
    STAGE2_SIZE="--precision bf16-mixed --max_steps ${MAX_STEPS:-3000} --val_every_n_epochs 10
      --checkpoint_every_n_steps 1000"
    SAMPLES=30; DEVICE="--device cuda"
elif [ "$SIZE" = tiny ]; then
    CONFIG=configs/tiny_cpu.yaml
    TOKENIZER_FLAGS="--steps 2 --batch_size 2 --eval_every 0 --device cpu --precision 32-true --image_size 64"
    STAGE2_SIZE="--max_steps 6 --classifier_steps 20"
    SAMPLES=2; DEVICE="--device cpu"
else
    echo "SIZE must be gpu or tiny (got $SIZE)"; exit 2
fi
read_config "$CONFIG"
mkdir -p "$OUT"
: > "$OUT/milliseconds.txt"
timed() {   # timed NAME command...: run it, append "NAME milliseconds" to OUT/milliseconds.txt
    local name=$1 start; shift; start=$(date +%s%N)
    "$@"
    echo "$name $(( ($(date +%s%N) - start) / 1000000 ))" >> "$OUT/milliseconds.txt"
}
run_once "$OUT/data.done" timed render python experiments/render_mmgait.py --source "$SOURCE" --output_dir "$OUT/data"
users=$(user_ids "$OUT/data")
# shellcheck disable=SC2086
timed tokenizer python train_tokenizer.py --data_dir "$OUT/data" --init_from "$DEMO_TOKENIZER" \
    --output_path "$OUT/tokenizer.safetensors" $TOKENIZER_FLAGS
# shellcheck disable=SC2086
timed stage1 python stage1_extract_features.py "${STAGE1_CONFIG[@]}" --data_dir "$OUT/data" \
    --vavae_path "$OUT/tokenizer.safetensors" --output_path "$OUT/latents"
# shellcheck disable=SC2086
timed stage2 python stage2_train_dit.py "${STAGE2_CONFIG[@]}" $STAGE2_SIZE $STAGE2_FLAGS --latent_dir "$OUT/latents" \
    --output_dir "$OUT/train" --vavae_path "$OUT/tokenizer.safetensors" --restart
# shellcheck disable=SC2086
timed stage3 python stage3_inference.py "${STAGE3_CONFIG[@]}" $STAGE3_FLAGS $DEVICE --dit_checkpoint "$OUT/train/checkpoints/best.ckpt" \
    --vavae_path "$OUT/tokenizer.safetensors" --output_dir "$OUT/samples" --user_ids $users \
    --num_samples_per_user "$SAMPLES"
# shellcheck disable=SC2086
timed stage4 python stage4_evaluate.py "${STAGE4_CONFIG[@]}" $DEVICE \
    --data_dir "$OUT/data" --generated_dir "$OUT/samples" --output_dir "$OUT/eval" \
    --vavae_path "$OUT/tokenizer.safetensors"
python - "$OUT" "$SIZE" "$STAGE2_FLAGS" "$STAGE3_FLAGS" <<'EOF'
import json, sys
from pathlib import Path
out, size, stage2, stage3 = Path(sys.argv[1]), *sys.argv[2:]
report = json.loads((out / "eval" / "report.json").read_text())
milliseconds = dict(line.split() for line in (out / "milliseconds.txt").read_text().splitlines())
identity, tstr = report["identity"], report.get("tstr", {})
summary = {"size": size, "stage2_flags": stage2, "stage3_flags": stage3,
           "seconds": {k: round(int(v) / 1000, 1) for k, v in milliseconds.items()},
           "identity": identity["generated_top1"], "identity_ci": identity.get("generated_top1_ci"),
           "ceiling_real_val": identity["real_val_top1"],
           "ceiling_tokenizer": (identity.get("tokenizer_reconstructions") or {}).get("top1"),
           "relative_to_ceiling": identity.get("relative_to_ceiling"), "tstr": tstr.get("top1"),
           "tstr_ci": tstr.get("top1_ci"), "copy_rate": report.get("memorization", {}).get("copy_rate"),
           "augmentation_gain": report.get("augmentation", {}).get("gain"),
           "augmentation_gain_ci": report.get("augmentation", {}).get("gain_ci")}
(out / "gpu_quality.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
