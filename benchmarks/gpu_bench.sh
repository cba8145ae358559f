#!/usr/bin/env bash
# One-shot GPU benchmark (single H100/H200, ~3 minutes): training throughput + MFU for B/1, L/1, XL/1
# (bf16, eager and --compile), stage 1 encoding and stage 3 sampling + decoding. All JSON goes to $OUT.
#
#   OUT=/path/to/results bash benchmarks/gpu_bench.sh
#
# Every part runs on its own, under a timeout; a failure prints "FAILED <part>" and the rest go on.
# BENCH_TINY=1 shrinks everything to a CPU smoke test (sizes, batches, steps, images).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if [ "${BENCH_TINY:-0}" = "1" ]; then
  DEV=cpu; T=300; SIZES="S/2"; BATCH=2; STEPS="--steps 1 --repeats 1 --warmup 1 --num_latents 64"
  S1="--num_images 2 --batch_size 2 --steps 1 --configs narrow"; S3="--model S/2 --steps 2 --batch_size 2 --repeats 1 --vae narrow"
  COMPILE_SIZES="S/2"
else
  DEV=cuda; T=${BENCH_TIMEOUT:-90}; SIZES="B/1,L/1,XL/1"; BATCH=32; STEPS="--steps 5 --repeats 2 --warmup 3"
  S1="--num_images 256 --batch_size 32"; S3="--model XL/1 --sampler euler --steps 32 --batch_size 64"
  COMPILE_SIZES="${COMPILE_SIZES:-B/1}"   # compile time is ~1 min per size; XL/1 via COMPILE_SIZES=B/1,XL/1
fi

"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
  || echo "FAILED torch import"

for SIZE in ${SIZES//,/ }; do
  echo "== train eager $SIZE (batch $BATCH, halved on OOM)"
  timeout $T "$PY" benchmarks/bench_train.py --device $DEV --sizes "$SIZE" --batch_size $BATCH $STEPS \
    --json_out "$OUT/train_eager_${SIZE//\//_}.json" || echo "FAILED train_eager $SIZE"
done

for SIZE in ${COMPILE_SIZES//,/ }; do
  echo "== train --compile bf16 $SIZE"
  timeout $T "$PY" benchmarks/bench_train.py --device $DEV --sizes "$SIZE" --batch_size $BATCH $STEPS \
    --compile --json_out "$OUT/train_compile_${SIZE//\//_}.json" || echo "FAILED train_compile $SIZE"
done

echo "== train XL/1 with gradient checkpointing"
timeout $T "$PY" benchmarks/bench_train.py --device $DEV --sizes "${SIZES##*,}" --batch_size $BATCH $STEPS \
  --grad_checkpointing --json_out "$OUT/train_ckpt.json" || echo "FAILED train_ckpt"

echo "== stage 1"
timeout $T "$PY" benchmarks/bench_stage1.py --device $DEV $S1 --json_out "$OUT/stage1.json" || echo "FAILED stage1"

echo "== stage 3"
timeout $T "$PY" benchmarks/bench_stage3.py --device $DEV $S3 --json_out "$OUT/stage3.json" || echo "FAILED stage3"

echo "results in $OUT:"; ls -l "$OUT"
