#!/usr/bin/env bash
# RESULTS.md "A recipe that routes" (issue 31): is the recipe's gap to the oracle the initialisation's luck? PT,
# --recipe routed and the oracle as results/routed.sh trains them (BATCH 8, 600 steps, cosine, bf16; no ablation), at
# the data order of one seed (SEED) from other initialisations (INITS, train.py --init-seed); then the table of these
# and of routed.sh's own runs at that seed (BASE), python results/routing.py inits OUT BASE/seedSEED.
# Usage: bash results/routed_init.sh   (about 30 minutes an initialisation on 2 idle cores with AMX bf16 kernels;
# MODEL=tiny STEPS=2 OUT=/tmp/x BASE=/tmp/y INITS=5 is the smoke run the tests do, BASE holding a routed.sh table)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SEED=${SEED:-2}
INITS=${INITS:-10 11 12}
OUT=${OUT:-results/routed_init}
BASE=${BASE:-results/routed_cosine}
for init in $INITS; do
  INIT_SEED=$init SEEDS=$SEED NO_DETACH=0 ABLATION=0 OUT=$OUT/init$init PY=$PY bash results/routed.sh
done
"$PY" results/routing.py inits "$OUT" "$BASE/seed$SEED"
