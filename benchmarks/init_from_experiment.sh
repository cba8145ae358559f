#!/usr/bin/env bash
# From scratch vs --init_from at equal steps, on the demo's simulated users. There is no published
# ImageNet file here, so the stand-in is a DiT pre-trained on 12 *other* simulated people (seed 1).
# Prints the evaluation stage's numbers for both runs and writes them to $OUT/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/init_from_experiment}
EPOCHS=${EPOCHS:-20}            # fine-tuning epochs for both runs (7 steps each on the demo data)
PY=${PYTHON:-python}
TOK=assets/demo_vavae.safetensors
common=(--config configs/demo.yaml --vavae_path $TOK --generate_user_ids 1 2 3 4 5 6)

$PY -m data.simulate --output_dir $OUT/pretrain_data --num_users 12 --train_per_user 40 --val_per_user 5 --seed 1
$PY run_complete_pipeline.py "${common[@]}" --data_dir $OUT/pretrain_data --output_dir $OUT/pretrain \
    --stages 1 2 --max_epochs ${PRETRAIN_EPOCHS:-30} --generate_user_ids 1
$PY -m data.simulate --output_dir $OUT/data --num_users 6 --train_per_user 40 --val_per_user 10 --seed 0
for run in scratch init; do
  extra=(); [ $run = init ] && extra=(--init_from $OUT/pretrain/trained_models/checkpoints/best.ckpt)
  if [ $run = init ] && [ -d $OUT/scratch/latent_features ] && [ ! -d $OUT/init/latent_features ]; then
    mkdir -p $OUT/init && cp -r $OUT/scratch/latent_features $OUT/init/   # same data, same latents
  fi
  $PY run_complete_pipeline.py "${common[@]}" --data_dir $OUT/data --output_dir $OUT/$run --max_epochs $EPOCHS "${extra[@]}"
done
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for run in ("scratch", "init"):
    r = json.load(open(f"{out}/{run}/evaluation/report.json"))
    rows[run] = {"generated_top1": r["identity"]["generated_top1"], "real_val_top1": r["identity"]["real_val_top1"],
                 "fd_classifier": r["fd"]["classifier"], "precision": r["manifold"]["generated"]["precision"],
                 "recall": r["manifold"]["generated"]["recall"], "tstr_top1": r["tstr_top1"],
                 "copy_rate": r["memorization"]["copy_rate"]}
    print(run, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[run].items()})
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
