#!/usr/bin/env bash
# RESULTS.md "Results", Table 1 at this scale: PT with L = 1 and L = 4, and SPT with K = 4 prompts of L = 1 under the
# paper's and the authors' losses, --recipe routed and --recipe paper --center-contexts, for each seed in SEEDS
# (default 0 1 2); seed 0 also decodes greedily; then each SPT run's prompts one at a time. spt_routed_soft is
# --recipe routed as first defined (until commit f961a71). The float32 runs in results/convai2 predate the routed and
# centred rows: run them with ONLY naming the rest.
# Usage: DTYPE=bfloat16 OUT=results/convai2_bf16 bash results/pt_vs_spt.sh   (2 idle cores with avx512_bf16: a PT run
# about 20 minutes, an SPT run about an hour; float32 2-2.5x as long; STEPS=5 HOLDOUT=5 OUT=/tmp/x for a quick look;
# ONLY="pt_L1_seed1 spt_paper_seed1" runs just those). A cut run continues from its checkpoint when run again.
source "$(dirname "$0")/convai2_common.sh"
for seed in ${SEEDS:-0 1 2}; do
  decode=$([[ $seed == 0 ]] && echo 1 || echo 0)
  run "pt_L1_seed$seed" "$seed" "$decode" --method pt --prompt-len 1
  run "pt_L4_seed$seed" "$seed" "$decode" --method pt --prompt-len 4
  run "spt_paper_seed$seed" "$seed" "$decode" --num-prompts 4 --prompt-len 1 --recipe paper
  run "spt_authors_seed$seed" "$seed" "$decode" --num-prompts 4 --prompt-len 1 --recipe authors
  run "spt_routed_soft_seed$seed" "$seed" "$decode" --num-prompts 4 --prompt-len 1 --recipe routed \
    --nll-weights retriever --no-detach-prompts-in-scores
  run "spt_routed_seed$seed" "$seed" "$decode" --num-prompts 4 --prompt-len 1 --recipe routed
  # the paper's losses, which train every prompt on every example, with the routed recipe's centred contexts for the
  # retriever, the weak link of --recipe paper here (RESULTS.md "Table 1 in bf16")
  run "spt_paper_centered_seed$seed" "$seed" "$decode" --num-prompts 4 --prompt-len 1 --recipe paper --center-contexts
done
# each SPT run's prompts one at a time, against the one Eq. 7 picks: a retriever that misses good prompts, or prompts
# that are no good? (RESULTS.md "Table 1 in bf16"; about 4 held-out passes a run; a run scored at its step is kept)
for seed in ${SEEDS:-0 1 2}; do
  for setting in spt_paper spt_authors spt_routed_soft spt_routed spt_paper_centered; do
    name=${setting}_seed$seed
    if ! selected "$name" || [[ ! -f $OUT/$name/heldout.json ]]; then continue; fi
    "$PY" results/convai2.py prompts "$OUT/$name"
  done
done
report
