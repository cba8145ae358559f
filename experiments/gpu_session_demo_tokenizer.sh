#!/usr/bin/env bash
# One lent-GPU session, prepared to run unattended: simulate spectrograms on all CPU cores, train the demo
# tokenizer on them (assets/demo_vavae.safetensors), then the GPU check (benchmarks/gpu_check.py).
# Everything lands in $OUT.
#   TOKENIZER_MINUTES (default 5) bounds the tokenizer training; SHRINK=1 makes a seconds-long CPU dry run.
set -u
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."   # the repository root: the scripts below are named from there
export PYTHONUNBUFFERED=1
SIM=/tmp/sim_tokenizer
MIN=${TOKENIZER_MINUTES:-5}
if [ "${SHRINK:-0}" = 1 ]; then USERS_PER=1; TRAIN=3; VAL=1; JOBS=2; SIZE=64; else USERS_PER=2; TRAIN=60; VAL=8; JOBS=12; SIZE=256; fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

# Simulated users with seeds the demo (seed 0) never uses: the demo images stay unseen by the tokenizer.
start=$(date +%s)
for j in $(seq 1 $JOBS); do
  python -m data.simulate --output_dir $SIM/part$j --num_users $USERS_PER --train_per_user $TRAIN \
    --val_per_user $VAL --seed $((100 + j)) --image_size $SIZE > /dev/null &
done
wait
for j in $(seq 1 $JOBS); do for split in train val; do for u in $(seq 1 $USERS_PER); do
  mkdir -p $SIM/all/$split; mv $SIM/part$j/$split/ID_$u $SIM/all/$split/ID_$(( (j - 1) * USERS_PER + u ))
done; done; done
echo "simulated $(find $SIM/all -name '*.png' | wc -l) images in $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"

timeout $(python -c "print(int(float($MIN) * 60 + 120))") python train_tokenizer.py --data_dir $SIM/all --output_path "$OUT/demo_vavae.safetensors" \
  --width 32 --num_res_blocks 2 --batch_size 32 --lr 6e-4 --steps 200000 --max_minutes $MIN --eval_every 0 \
  --image_size $SIZE 2>&1 | grep -v "it/s]" | tee "$OUT/tokenizer_log.txt" || echo "FAILED tokenizer" | tee -a "$OUT/log.txt"

if [ "${BENCH:-1}" = 1 ]; then
  timeout 420 python benchmarks/gpu_check.py --json_out "$OUT/gpu_check.json" 2>&1 | tail -80 | tee "$OUT/bench_log.txt" \
    || echo "FAILED gpu_check" | tee -a "$OUT/log.txt"
fi
ls -la "$OUT"
