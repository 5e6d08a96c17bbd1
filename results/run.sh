#!/usr/bin/env bash
# Reproduce the PT-versus-SPT comparison of README "Results": frozen SmolLM2-135M, CPU, float32.
# Train on the first 900 dialogues of the shared ConvAI2 validation file, test on the last 100.
# Usage: bash results/run.sh   (about 1h15m on 2 CPU cores; STEPS=20 bash results/run.sh for a quick look)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/convai2/valid_self_original_no_cands.txt}
STEPS=${STEPS:-150}
COMMON=(--model smollm2 --data "$DATA" --holdout 100 --max-steps "$STEPS" --batch-size 8 --seed 0 --device cpu --dtype float32)

/usr/bin/time -f "PT training: %e s" "$PY" train.py "${COMMON[@]}" --method pt --prompt-len 4 --out results/pt
/usr/bin/time -f "SPT training: %e s" "$PY" train.py "${COMMON[@]}" --method spt --num-prompts 4 --prompt-len 1 --out results/spt
/usr/bin/time -f "PT decoding: %e s" "$PY" generate.py --ckpt results/pt --out results/pt/predictions.jsonl
/usr/bin/time -f "SPT decoding: %e s" "$PY" generate.py --ckpt results/spt --out results/spt/predictions.jsonl
"$PY" metrics.py --compare results/pt/predictions.jsonl results/spt/predictions.jsonl | tee results/comparison.txt
"$PY" metrics.py results/spt/predictions.jsonl --plot results/prompt_usage.png | tee results/spt_report.txt
"$PY" results/summarize.py
