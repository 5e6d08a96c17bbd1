"""How much bfloat16 changes what SPT computes (README "Mixed precision"), on SmolLM2 and ConvAI2.

    python results/precision.py            # about 2 minutes on 2 idle CPU cores -> results/precision.md

1. The first training step's loss (train.py's first batch, seed 0, the paper's recipe, K = 4, L = 1) in
   float32 and in bfloat16: the relative difference.
2. Eq. 7 in both dtypes: for every committed SPT checkpoint of results/convai2 (all trained in float32), the
   share of its 776 held-out contexts for which the retriever picks the same prompt when the frozen
   LLM's token embeddings are bfloat16 instead of float32 (the retriever itself is float32 in both).
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from convai2 import test_batches  # noqa: E402
from llm_loader import load_llm  # noqa: E402

CONVAI2 = ROOT.parent / "shared" / "data" / "convai2" / "valid_self_original_no_cands.txt"
RUNS = ROOT / "results" / "convai2"
OUT = ROOT / "results" / "precision.md"


def first_step_loss(dtype):
    """train.py's logged loss of step 1 on ConvAI2 (as README's first ConvAI2 command, one step) in dtype."""
    with tempfile.TemporaryDirectory() as out:
        train.train(train.parse_args(["--model", "smollm2", "--data", str(CONVAI2), "--holdout", "100", "--max-steps", "1",
                                      "--prompt-len", "1", "--device", "cpu", "--dtype", dtype, "--out", out]))
        return json.loads((Path(out) / "log.jsonl").read_text().splitlines()[0])["loss"]


@torch.no_grad()
def eq7_agreement(run, llms, tok):
    """Share of run's held-out contexts whose Eq. 7 pick is the same with float32 and with bfloat16 embeddings."""
    spt, config = train.load_checkpoint(run)
    same = total = 0
    for batch in test_batches(config, tok):
        picks = [spt.scores(llm.embed(batch.context_ids), batch.context_mask).argmax(-1) for llm in llms]
        same += int((picks[0] == picks[1]).sum())
        total += len(picks[0])
    return same, total


def main():
    if not CONVAI2.is_file():
        sys.exit(f"skipped: {CONVAI2} is absent (the ConvAI2 validation split; see ../shared/README.md)")
    losses = {dtype: first_step_loss(dtype) for dtype in ("float32", "bfloat16")}
    relative = abs(losses["bfloat16"] - losses["float32"]) / losses["float32"]
    lines = ["| first training step (SmolLM2, ConvAI2, K = 4, L = 1, seed 0) | loss |", "| --- | ---: |",
             f"| float32 | {losses['float32']:.4f} |", f"| bfloat16 | {losses['bfloat16']:.4f} |",
             f"| relative difference | {100 * relative:.3f}% |", "",
             "| checkpoint (trained in float32) | held-out contexts | same Eq. 7 pick in bfloat16 |", "| --- | ---: | ---: |"]
    llms = [load_llm("smollm2", dtype=dtype)[0] for dtype in (torch.float32, torch.bfloat16)]
    tok = load_llm("smollm2")[1]
    same_all = total_all = 0
    for run in sorted(RUNS.glob("spt_*_seed*")):
        same, total = eq7_agreement(run, llms, tok)
        same_all, total_all = same_all + same, total_all + total
        lines.append(f"| {run.name} | {total} | {same} ({100 * same / total:.1f}%) |")
    lines.append(f"| all | {total_all} | {same_all} ({100 * same_all / total_all:.1f}%) |")
    OUT.write_text("\n".join(lines) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    train.run_cli(lambda argv: main())
