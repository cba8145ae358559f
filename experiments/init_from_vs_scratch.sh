#!/usr/bin/env bash
# From scratch vs --init_from (and, with RUNS="init partial lora", the fine-tune modes) at equal steps, on the
# demo's simulated users. There is no published ImageNet file here, so the stand-in is a DiT pre-trained on
# 12 *other* simulated people (seed 1). Prints the evaluation stage's numbers for each run and writes them to
# $OUT/summary.json; with a fine-tune mode in RUNS, also trainable parameters and CPU time per step.
# The recipe is the one the published numbers used (2026-11-26): configs/studies/demo_lr5e-4.yaml with the
# demo's precision and samples of that day (RECIPE below; CONFIG and RECIPE="" measure another).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-outputs/init_from_experiment}
EPOCHS=${EPOCHS:-20}            # fine-tuning epochs for every run (7 steps each on the demo data)
RUNS=${RUNS:-"scratch init"}    # scratch, init (= --finetune full), partial, lora
PY=${PYTHON:-python}
CONFIG=${CONFIG:-configs/studies/demo_lr5e-4.yaml}
RECIPE=${RECIPE-"--precision 32-true --num_samples_per_user 6"}
INIT=$OUT/pretrain/trained_models/checkpoints/best.ckpt
# shellcheck disable=SC2206
common=(--config "$CONFIG" $RECIPE --vavae_path "$DEMO_TOKENIZER")   # stage 3: every user

run_once "$OUT/pretrain_data.done" $PY -m data.simulate --output_dir "$OUT/pretrain_data" --num_users 12 \
    --train_per_user 40 --val_per_user 5 --seed 1
$PY run_complete_pipeline.py "${common[@]}" --data_dir "$OUT/pretrain_data" --output_dir "$OUT/pretrain" \
    --stages 1 2 --max_epochs "${PRETRAIN_EPOCHS:-30}"
simulate_demo_data "$OUT/data"
first=""
for run in $RUNS; do
  case $run in
    scratch) extra=() ;;
    init) extra=(--init_from $INIT) ;;
    *) extra=(--init_from $INIT --finetune $run) ;;
  esac
  if [ -n "$first" ] && [ ! -d $OUT/$run/latent_features ]; then
    mkdir -p $OUT/$run && cp -r $OUT/$first/latent_features $OUT/$run/   # same data, same latents
  fi
  first=${first:-$run}
  $PY run_complete_pipeline.py "${common[@]}" --data_dir $OUT/data --output_dir $OUT/$run --max_epochs $EPOCHS "${extra[@]}"
done
modes=$(echo $RUNS | tr ' ' '\n' | sed 's/^init$/full/' | grep -v scratch | paste -sd, || true)
if [ -n "$modes" ]; then   # the runs' stage 2 flags, timed in fp32 on the CPU
    $PY experiments/finetune_modes_cost.py --modes $modes --json_out $OUT/modes.json --latent_dir $OUT/$first/latent_features \
        --init_from $INIT --config "$CONFIG" --precision 32-true --accelerator cpu
fi
$PY - "$OUT" $RUNS <<'PY'
import json, os, sys
out, runs = sys.argv[1], sys.argv[2:]
modes = {r["finetune"]: r for r in json.load(open(f"{out}/modes.json"))["rows"]} if os.path.exists(f"{out}/modes.json") else {}
rows = {}
for run in runs:
    r = json.load(open(f"{out}/{run}/evaluation/report.json"))
    rows[run] = {"generated_top1": r["identity"]["generated_top1"], "real_val_top1": r["identity"]["real_val_top1"],
                 "fd_classifier": r["fd"]["classifier"], "precision": r["manifold"]["generated"]["precision"],
                 "recall": r["manifold"]["generated"]["recall"], "tstr_top1": r["tstr_top1"],
                 "copy_rate": r["memorization"]["copy_rate"]}
    mode = modes.get("full" if run == "init" else run)
    if mode:
        rows[run].update({k: mode[k] for k in ("trainable_params", "trainable_share", "ms_per_step_cpu")})
    print(run, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[run].items()})
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
