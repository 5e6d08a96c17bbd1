"""RESULTS.md "The first run": each prompt's held-out NLL on each kind, for SPT and PT runs of the first run.

    python results/first_run_per_prompt.py runs/first_run_seed0 runs/first_run_seed1 ...   # each also scores RUN/pt

It shows whether the prompt Eq. 7 picks for a kind is the one that predicts that kind best. The table goes to
results/first_run/per_prompt.md (RESULTS.md fills it in) and to the terminal.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import train  # noqa: E402
from llm_loader import load_llm  # noqa: E402


def main(runs):
    llm, tok = load_llm("smollm2", dtype=torch.bfloat16)
    held_out = data.split_by_dialogue(data.load_examples("two-kinds"), 100, shuffle=False)[1]
    kinds = [data.routing_kind(ex) for ex in held_out]
    batches = list(data.batches([data.encode_example(ex, tok, 512) for ex in held_out], 8, tok.pad_id, shuffle=False))
    rows = []
    for run in runs:
        for folder in (Path(run), Path(run) / "pt"):
            spt, _ = train.load_checkpoint(folder, llm.embed_dim)
            cells = []
            for k in range(spt.num_prompts):
                nll = [x for b in batches for x in train.prompted_nll(llm, spt.soft_prompts[[k] * len(b.examples)], b).tolist()]
                per_kind = {kind: sum(x for x, c in zip(nll, kinds) if c == kind) / kinds.count(kind) for kind in sorted(set(kinds))}
                cells.append(", ".join(f"{kind} {v:.2f}" for kind, v in per_kind.items()))
            rows.append(f"| {folder} | " + " | ".join(cells + [""] * (4 - len(cells))) + " |")
            print(rows[-1], flush=True)
    table = ["| run | prompt 0 | prompt 1 | prompt 2 | prompt 3 |", "| --- | --- | --- | --- | --- |", *rows]
    (ROOT / "results" / "first_run" / "per_prompt.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
