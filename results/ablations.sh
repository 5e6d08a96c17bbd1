#!/usr/bin/env bash
# RESULTS.md "Results", Table 2 at this scale: SPT (K = 4, L = 1, --recipe paper) without each of Eq. 3-5's terms
# of Eq. 6, seed 0, with greedy decoding for the generation metrics. The full model is spt_paper_seed0 of results/pt_vs_spt.sh.
# Usage: bash results/ablations.sh   (about 5 hours on 2 CPU cores, plus spt_paper_seed0 if absent; STEPS=5 HOLDOUT=5 OUT=/tmp/x for a quick look on 5 test dialogues)
source "$(dirname "$0")/convai2_common.sh"
SPT=(--num-prompts 4 --prompt-len 1 --recipe paper)
run spt_paper_seed0 0 1 "${SPT[@]}"
run spt_no_con_seed0 0 1 "${SPT[@]}" --lambda-con 0
run spt_no_sel_seed0 0 1 "${SPT[@]}" --lambda-sel 0
run spt_no_fusion_seed0 0 1 "${SPT[@]}" --lambda-fusion 0
report
