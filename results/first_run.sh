#!/usr/bin/env bash
# RESULTS.md "The first run": what `python train.py` does without ConvAI2 (the two-kinds set, SPT then PT trained the
# same way, both scored on the 100 held-out examples), at seeds 0 1 2 in bfloat16. Each run's closing table goes to
# OUT/seedN.md (a code block, for RESULTS.md and README), its whole output to OUT/seedN.log.
# Usage: bash results/first_run.sh   (about 3 minutes per seed on 2 idle CPU cores; SEEDS="0" for one; MODEL=tiny OUT=/tmp/x
# for a smoke run; RECIPE=routed OUT=results/first_run_routed for the same run with --recipe routed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-results/first_run}
RECIPE=${RECIPE:-paper}
RUNS=runs/first_run$([[ $RECIPE == paper ]] || echo "_$RECIPE")  # paper: the folders first_run_per_prompt.py is pointed at
mkdir -p "$OUT"
for seed in ${SEEDS:-0 1 2}; do
  "$PY" train.py --model "${MODEL:-smollm2}" --data two-kinds --holdout 100 --compare-pt --dtype bfloat16 --recipe "$RECIPE" --seed "$seed" \
    --out "${RUNS}_seed$seed" \
    | tee "$OUT/seed$seed.log"
  { echo '```'; sed -n '/^held-out: /,/routing purity/p' "$OUT/seed$seed.log"; echo '```'; } > "$OUT/seed$seed.md"
done
"$PY" results/fill_readme.py
