"""Training curves and sample responses of the PT-versus-SPT comparison (run by results/run.sh).

Writes results/curves.md (mean Eq. 2 NLL per prompt, averaged over windows of steps), results/curves.png
(when matplotlib is installed) and results/samples.md (model outputs only: the ConvAI2 text itself is
not copied here; dialogue id and turn locate each example in the shared file).
"""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent
WINDOW = 25


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def nll_per_prompt(record, num_prompts):
    """The log's "nll" is Eq. 6's first term, a sum over the K prompts; per prompt it is comparable with PT."""
    return record["nll"] / num_prompts


def window_mean(run, start, key):
    """Mean of a logged loss term over steps start+1 .. start+WINDOW of one run (config, log)."""
    config, log = run
    window = log[start:start + WINDOW]
    values = [nll_per_prompt(r, config["num_prompts"]) if key == "nll" else r[key] for r in window]
    return sum(values) / len(values)


def main():
    runs = {}
    for name in ("pt", "spt"):
        config = json.loads((RESULTS / name / "config.json").read_text())
        runs[name] = (config, read_jsonl(RESULTS / name / "log.jsonl"))
    steps = len(runs["spt"][1])
    lines = ["| steps | PT NLL | SPT NLL per prompt | SPT con | SPT sel | SPT fusion |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for start in range(0, steps, WINDOW):
        cells = [window_mean(runs["pt"], start, "nll"), *(window_mean(runs["spt"], start, key) for key in ("nll", "con", "sel", "fusion"))]
        lines.append(f"| {start + 1}-{min(start + WINDOW, steps)} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    (RESULTS / "curves.md").write_text("\n".join(lines) + "\n")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: results/curves.png not written")
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        for name, (config, log) in runs.items():
            left.plot([r["step"] for r in log], [nll_per_prompt(r, config["num_prompts"]) for r in log], label=name.upper(), alpha=0.8)
        left.set(xlabel="step", ylabel="training NLL per prompt (Eq. 2)", title="soft prompt loss")
        left.legend()
        log = runs["spt"][1]
        for key in ("con", "sel", "fusion"):
            right.plot([r["step"] for r in log], [r[key] for r in log], label=key)
        right.set(xlabel="step", title="SPT: Eq. 4, Eq. 3, Eq. 5 terms")
        right.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "curves.png", dpi=110)

    pt, spt = (read_jsonl(RESULTS / name / "predictions.jsonl") for name in ("pt", "spt"))
    rows = ["| dialogue | turn | PT | SPT (prompt) |", "| --- | --- | --- | --- |"]
    for p, s in list(zip(pt, spt))[::97][:8]:
        assert (p["dialogue_id"], p["turn"]) == (s["dialogue_id"], s["turn"])
        rows.append(f"| {p['dialogue_id']} | {p['turn']} | {p['prediction']} | {s['prediction']} ({s['chosen_prompt']}) |")
    (RESULTS / "samples.md").write_text("\n".join(rows) + "\n")
    print("wrote results/curves.md, results/samples.md")


if __name__ == "__main__":
    main()
