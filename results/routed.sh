#!/usr/bin/env bash
# RESULTS.md "A recipe that routes" (issue 31): --recipe routed against PT, --recipe paper and the oracle on the routing
# set (`--data routing`, four kinds), each seed of SEEDS, the same steps and data order per seed; then the ablation,
# --recipe routed without each of its changes (seed 0), and the table (python results/routing.py routed OUT).
# Usage: bash results/routed.sh   (about 3.5 hours on 2 idle cores in bf16; STEPS=5 SEEDS=0 for a quick look;
# MODEL=tiny OUT=/tmp/x STEPS=2 SEEDS=0 is the smoke run the tests do). A finished run is kept; a cut one continues.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
MODEL=${MODEL:-smollm2}
STEPS=${STEPS:-300}
OUT=${OUT:-results/routed}
DTYPE=${DTYPE:-bfloat16}
SEEDS=${SEEDS:-0 1 2}
# 300 steps (2.4 epochs): at 80 steps PT's and the oracle's NLL varied by 0.5-1.2 over seeds. --eval-every logs the
# held-out curve (all 200 held-out examples) of each run on the routing set; the oracle's runs hold nothing out.
TRAIN=(--model "$MODEL" --max-steps "$STEPS" --device cpu --dtype "$DTYPE" --prompt-len 1 --prompt-init vocab --log-every 10)
SPT=(--data routing --holdout 200 --batch-size 8 --num-prompts 4 --eval-every 50 --eval-examples 200)
echo "routed recipe check: ${TRAIN[*]}, seeds $SEEDS"

train() {  # train NAME SEED FLAGS...: one run into OUT/NAME, unless it finished; a cut run continues with --resume
  local out=$OUT/$1 seed=$2 resume=()
  shift 2
  if [[ -f $out/train_state.pt ]]; then resume=(--resume)
  elif [[ -f $out/spt.safetensors ]]; then echo "$out: done, kept"; return 0; fi
  echo "== $out ($(date -u +%H:%M:%S))"
  "$PY" train.py "${TRAIN[@]}" --seed "$seed" "$@" --out "$out" "${resume[@]}"
  rm -f "$out/train_state.pt"  # finished: the optimizer state is only needed to continue
}

"$PY" results/routing.py oracle-data "$OUT/oracle_data"
for seed in $SEEDS; do
  train "seed$seed/pt" "$seed" "${SPT[@]}" --method pt
  train "seed$seed/spt_paper" "$seed" "${SPT[@]}" --recipe paper
  train "seed$seed/spt_routed" "$seed" "${SPT[@]}" --recipe routed
  train "seed$seed/spt_routed_picked" "$seed" "${SPT[@]}" --recipe routed --nll-weights picked
  train "seed$seed/spt_routed_picked_detached" "$seed" "${SPT[@]}" --recipe routed --nll-weights picked --detach-prompts-in-scores
  for kind in food music pets sports; do
    train "seed$seed/oracle_$kind" "$seed" --data "$OUT/oracle_data/$kind.jsonl" --batch-size 2 --method pt
  done
done
first=${SEEDS%% *}
train "ablation/no_nll_weights" "$first" "${SPT[@]}" --recipe routed --nll-weights uniform
train "ablation/no_center_contexts" "$first" "${SPT[@]}" --recipe routed --no-center-contexts
train "ablation/detached" "$first" "${SPT[@]}" --recipe routed --detach-prompts-in-scores
train "ablation/picked_detached_no_center_contexts" "$first" "${SPT[@]}" --recipe routed --nll-weights picked \
  --detach-prompts-in-scores --no-center-contexts
rm -r "$OUT/oracle_data"
"$PY" results/routing.py routed "$OUT"
echo "routed recipe check done in $((SECONDS / 60))m$((SECONDS % 60))s"
