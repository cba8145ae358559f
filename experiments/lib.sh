# Sourced by the study scripts (`source "$(dirname "$0")/lib.sh"`): moves to the repository root and gives them
# one way each to skip a finished step, to read a config, to make the demo's data and to score a checkpoint.
# Requires `set -euo pipefail` in the script (a failed step ends it).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEMO_TOKENIZER=assets/demo_vavae.safetensors

# run_once MARKER [--after MARKER2]... command...: run the command unless MARKER records that this same command
# (every word) finished after the steps it follows (each MARKER2, as they stand now). MARKER is written only after
# the command succeeds, so an interrupted step runs again; a step whose command changed, or that follows a step
# done again since, runs again and says so (as run_complete_pipeline.py redoes a stage).
run_once() {
    local marker=$1 record=""
    shift
    while [ "${1:-}" = --after ]; do
        record+="after $2: $(cat "$2" 2>/dev/null || true)"$'\n'
        shift 2
    done
    record+=$(printf '%q ' "$@")
    if [ -f "$marker" ]; then
        if [ "$(sed '$d' "$marker")" = "$record" ]; then
            echo "== done already: $marker"
            return 0
        fi
        echo "== redone: $marker (its command or a step before it changed)"
        rm "$marker"
    fi
    "$@"
    mkdir -p "$(dirname "$marker")"
    printf '%s\nfinished %s\n' "$record" "$(date +%s.%N)" > "$marker"
}

# logged FILE command...: run the command, its output also written to FILE.
logged() {
    local file=$1
    shift
    "$@" | tee "$file"
}

# read_config CONFIG: STAGE1_CONFIG ... STAGE4_CONFIG (arrays) become the flags run_complete_pipeline.py --config
# CONFIG gives each stage (experiments/stage_flags.py); later flags on a stage's command line override them.
read_config() {
    local lines
    lines=$(python experiments/stage_flags.py "$1")
    read -ra STAGE1_CONFIG <<< "$(sed -n 1p <<< "$lines")"
    read -ra STAGE2_CONFIG <<< "$(sed -n 2p <<< "$lines")"
    read -ra STAGE3_CONFIG <<< "$(sed -n 3p <<< "$lines")"
    read -ra STAGE4_CONFIG <<< "$(sed -n 4p <<< "$lines")"
}

# config_value CONFIG KEY: one value of a config (e.g. max_epochs, to train a multiple of it).
config_value() {
    python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

# simulate_demo_data DIR: the demo's simulated people (pipeline/demo.py's DEMO_DATA, as --demo writes them), once
# (pipeline.demo.simulate_once's marker DIR/.simulated.json says which; a step reading them runs --after it).
simulate_demo_data() {
    python -c 'import sys; from pathlib import Path; from pipeline.demo import DEMO_DATA, simulate_once
simulate_once(Path(sys.argv[1]), **DEMO_DATA)' "$1"
}

# user_ids DATA_DIR: the user numbers of DATA_DIR/train (ID_3 -> 3), ascending.
user_ids() {
    ls "$1/train" | sed -n 's/^ID_//p' | sort -n | tr '\n' ' '
}

# score_checkpoint CHECKPOINT AFTER SAMPLES_DIR EVAL_DIR SEED [stage 3 flags...] [-- stage 4 flags...]: stage 3
# draws $SAMPLES images of every user of $DATA from CHECKPOINT (made by the step of marker AFTER) with $TOKENIZER
# into SAMPLES_DIR, then stage 4 scores them into EVAL_DIR; both with read_config's flags and SEED, each once
# (markers SAMPLES_DIR.done and EVAL_DIR.done).
score_checkpoint() {
    local checkpoint=$1 after=$2 samples_dir=$3 eval_dir=$4 seed=$5 stage3=() users
    shift 5
    while [ $# -gt 0 ] && [ "$1" != -- ]; do stage3+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    users=$(user_ids "$DATA")
    # shellcheck disable=SC2086
    run_once "$samples_dir.done" --after "$after" python stage3_inference.py "${STAGE3_CONFIG[@]}" "${stage3[@]}" \
        --seed "$seed" --dit_checkpoint "$checkpoint" --vavae_path "$TOKENIZER" --output_dir "$samples_dir" \
        --user_ids $users --num_samples_per_user "$SAMPLES"
    run_once "$eval_dir.done" --after "$samples_dir.done" python stage4_evaluate.py "${STAGE4_CONFIG[@]}" "$@" \
        --seed "$seed" --data_dir "$DATA" --generated_dir "$samples_dir" --output_dir "$eval_dir" --vavae_path "$TOKENIZER"
}
