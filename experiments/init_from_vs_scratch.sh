#!/usr/bin/env bash
# From scratch vs --init_from (and, with RUNS="init partial lora", the fine-tune modes) at equal steps, on the
# demo's simulated users. There is no published ImageNet file here, so the stand-in is a DiT pre-trained on
# 12 *other* simulated people (seed 1). Prints the evaluation stage's numbers for each run and writes them to
# $OUT/summary.json; with a fine-tune mode in RUNS, also trainable parameters and CPU time per step.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/init_from_experiment}
EPOCHS=${EPOCHS:-20}            # fine-tuning epochs for every run (7 steps each on the demo data)
RUNS=${RUNS:-"scratch init"}    # scratch, init (= --finetune full), partial, lora
PY=${PYTHON:-python}
TOK=assets/demo_vavae.safetensors
INIT=$OUT/pretrain/trained_models/checkpoints/best.ckpt
common=(--config configs/demo.yaml --vavae_path $TOK --generate_user_ids 1 2 3 4 5 6)

[ -f $INIT ] || {
  $PY -m data.simulate --output_dir $OUT/pretrain_data --num_users 12 --train_per_user 40 --val_per_user 5 --seed 1
  $PY run_complete_pipeline.py "${common[@]}" --data_dir $OUT/pretrain_data --output_dir $OUT/pretrain \
      --stages 1 2 --max_epochs ${PRETRAIN_EPOCHS:-30} --generate_user_ids 1
}
[ -d $OUT/data ] || $PY -m data.simulate --output_dir $OUT/data --num_users 6 --train_per_user 40 --val_per_user 10 --seed 0
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
if [ -n "$modes" ]; then   # the demo's stage 2 flags (configs/demo.yaml)
  $PY experiments/finetune_modes_cost.py --modes $modes --json_out $OUT/modes.json --latent_dir $OUT/$first/latent_features \
      --init_from $INIT --model LightningDiT-S/2 --depth 4 --hidden_size 192 --num_heads 3 --batch_size 32 \
      --lr 0.0005 --precision 32-true --ema_decay 0.998 --accelerator cpu
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
