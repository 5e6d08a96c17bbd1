#!/usr/bin/env bash
# RESULTS.md "Results", Table 3 at this scale: SPT (L = 1, --recipe paper) with K = 2, 4 and 8 prompts, seed 0.
# K = 1 is the PT L = 1 run (the same updates; results/convai2.py, num_prompts_table, says why; a test checks it).
# Usage: bash results/num_prompts.sh   (about 5.5 hours on 2 CPU cores: K = 2 about 1.2, K = 8 about 4.2; plus the K = 1 and 4 runs if absent; STEPS=5 HOLDOUT=5 OUT=/tmp/x for a quick look on 5 test dialogues)
source "$(dirname "$0")/convai2_common.sh"
run pt_L1_seed0 0 1 --method pt --prompt-len 1
run spt_K2_seed0 0 0 --num-prompts 2 --prompt-len 1 --recipe paper
run spt_paper_seed0 0 1 --num-prompts 4 --prompt-len 1 --recipe paper
run spt_K8_seed0 0 0 --num-prompts 8 --prompt-len 1 --recipe paper
report
