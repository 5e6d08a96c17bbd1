# Shared by results/pt_vs_spt.sh, results/ablations.sh and results/num_prompts.sh (sourced, not run).
# Frozen SmolLM2-135M on CPU in DTYPE (default float32, as every run in results/convai2 was trained; bfloat16 runs go to
# their own OUT, e.g. results/convai2_bf16, so that no table mixes dtypes); train on the first 900 dialogues of the shared ConvAI2 validation file,
# test on its last 100 (776 examples). Every run has the same data order for a seed and the same steps.
# Environment: STEPS (default 300), SEEDS, ONLY (run names to run, space-separated), MODEL, DATA, HOLDOUT, DTYPE, OUT, PY.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python}
MODEL=${MODEL:-smollm2}
DATA=${DATA:-../shared/data/convai2/valid_self_original_no_cands.txt}
HOLDOUT=${HOLDOUT:-100}
STEPS=${STEPS:-300}
EVAL_EVERY=${EVAL_EVERY:-50}
DTYPE=${DTYPE:-float32}
OUT=${OUT:-results/convai2}
if [[ $DATA != demo && ! -f $DATA ]]; then
  echo "skipped: $DATA is absent (the ConvAI2 validation split; see ../shared/README.md), or set DATA=" >&2
  exit 0
fi
# --prompt-init vocab: the paper's N(0, 1) init has about 7 times the norm of SmolLM2's embedding rows, and a 1-token
# prompt from it barely moves at lr 0.01 (RESULTS.md "Routing"). --eval-every scores the first 200 test examples.
# Each run takes its recipe's lr: 0.01 (Table 6) for PT and --recipe paper, 1e-4 for --recipe authors (their README's
# command). The float32 runs in results/convai2 all ran at --lr 0.01, the authors' row included (their config.json).
# 300 steps: PT L = 1's held-out NLL fell 0.11, then 0.06 per 50 steps up to step 150 (3.457, 3.348, 3.287), so 150 was
# not enough for the curve to flatten.
TRAIN=(--model "$MODEL" --data "$DATA" --holdout "$HOLDOUT" --max-steps "$STEPS" --batch-size 8 --device cpu
       --dtype "$DTYPE" --prompt-init vocab --eval-every "$EVAL_EVERY" --eval-examples 200
       --save-every 25 --log-every 10)
mkdir -p "$OUT"
echo "ConvAI2 runs in $OUT: ${TRAIN[*]}"

selected() {  # selected NAME: true unless ONLY names other runs
  [[ -z ${ONLY:-} || " $ONLY " == *" $1 "* ]]
}

# run NAME SEED DECODE TRAIN_FLAGS...: train NAME (or continue it with --resume from its checkpoint), score the
# held-out part with Eq. 7 and, when DECODE is 1, decode greedily. A run with a heldout.json at STEPS is finished; a cut
# run, or a finished one run again with a larger STEPS, continues from its train_state.pt (Adam at a constant lr: the
# same as a straight run). train_state.pt (trainable parts and Adam state) stays, so any run can be extended.
run() {
  local name=$1 seed=$2 decode=$3 out="$OUT/$1"
  shift 3
  if ! selected "$name"; then return 0; fi
  if [[ -f $out/heldout.json ]]; then
    local steps_done
    steps_done=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["step"])' "$out/heldout.json")
    if [[ $steps_done == "$STEPS" ]]; then echo "$name: finished, skipped"; return 0; fi
    if [[ $steps_done -gt $STEPS || ! -f $out/train_state.pt ]]; then
      echo "error: $name finished at $steps_done steps and cannot continue to STEPS=$STEPS (no train_state.pt, or fewer" \
           "steps): set STEPS=$steps_done, or delete $out to retrain" >&2
      exit 1
    fi
    echo "$name: extending from $steps_done to $STEPS steps"
  fi
  local resume=()
  if [[ -f $out/train_state.pt ]]; then resume=(--resume); fi
  echo "== $name ($(date -u +%H:%M:%S))"
  "$PY" train.py "${TRAIN[@]}" --seed "$seed" "$@" --out "$out" "${resume[@]}"
  if [[ ! -f $OUT/no_prompt.json ]]; then "$PY" results/convai2.py baseline "$out"; fi
  if [[ $decode == 1 ]]; then "$PY" results/convai2.py predictions "$out"; fi
  "$PY" results/convai2.py heldout "$out"
}

report() {
  "$PY" results/convai2.py report "$OUT"
  if [[ $OUT == results/convai2 ]]; then "$PY" results/fill_readme.py; fi
  echo "done in $((SECONDS / 60))m$((SECONDS % 60))s"
}
