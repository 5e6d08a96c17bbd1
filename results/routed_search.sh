#!/usr/bin/env bash
# How --recipe routed was found (RESULTS.md, "A recipe that routes"): --recipe paper with each candidate change, on the
# routing set, seed 0, 80 steps, bf16, scored on the 200 held-out examples by `routing.py score`. PT and the oracle
# at the same seed and steps: RESULTS.md (commit 57a6b9d's results/routed/seed0). Usage: bash results/routed_search.sh
# (about 45 minutes on 2 cores; the committed results/routed/search.txt came from these commands run one at a time
# beside other work)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-runs/routed_search}
TRAIN=(--model "${MODEL:-smollm2}" --max-steps "${STEPS:-80}" --seed 0 --device cpu --dtype bfloat16 --prompt-len 1
       --prompt-init vocab --log-every 10 --data routing --holdout 200 --batch-size 8 --num-prompts 4 --recipe paper)
declare -A CANDIDATES=(
  [fb_ts01]="--nll-weights feedback --tau-s 0.1"
  [rt_ts01]="--nll-weights retriever --tau-s 0.1"
  [fb_ts01_nocon]="--nll-weights feedback --tau-s 0.1 --lambda-con 0"
  [fb_ts01_pm]="--nll-weights feedback --tau-s 0.1 --con-reduction pair-mean"
  [fb_ts01_cc_nocon]="--nll-weights feedback --tau-s 0.1 --center-contexts --lambda-con 0"
  [fb_ts01_cc]="--nll-weights feedback --tau-s 0.1 --center-contexts"
  [cc]="--center-contexts"
  [rt_ts01_cc]="--nll-weights retriever --tau-s 0.1 --center-contexts"
  [rt_cc]="--nll-weights retriever --center-contexts"
)
names=(fb_ts01 rt_ts01 fb_ts01_nocon fb_ts01_pm fb_ts01_cc_nocon fb_ts01_cc cc rt_ts01_cc rt_cc)
for name in "${names[@]}"; do
  # shellcheck disable=SC2086  # the candidate's flags are words
  [[ -f $OUT/$name/spt.safetensors ]] || "$PY" train.py "${TRAIN[@]}" ${CANDIDATES[$name]} --out "$OUT/$name"
done
"$PY" results/routing.py score "${names[@]/#/$OUT/}"
