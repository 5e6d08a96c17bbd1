"""PT versus SPT on ConvAI2 (RESULTS.md "Results"): score finished runs, and write the tables from what is scored.

    python results/convai2.py heldout RUN [RUN ...]  # Eq. 7 held-out NLL on every test example -> RUN/heldout.json
    python results/convai2.py baseline RUN           # the frozen LLM with no prompt, on RUN's test part -> RUNS/no_prompt.json
    python results/convai2.py predictions RUN        # greedy responses and their metrics -> RUN/predictions.jsonl, RUN/generation.json
    python results/convai2.py prompts RUN [RUN ...]  # an SPT run's K prompts one at a time on the test part -> RUN/prompts.json
    python results/convai2.py report RUNS            # RUNS/pt_vs_spt.md, ablations.md, num_prompts.md from the scored runs

Runs are train.py folders named SETTING_seedN (results/pt_vs_spt.sh, results/ablations.sh). The test part is the
checkpoint's --holdout (the last 100 dialogues of the shared ConvAI2 validation file). Committed predictions hold
the model's responses only (dialogue id, turn, response, chosen prompt), never ConvAI2 text: `predictions`
scores them against the references before it drops those.
"""
import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import generate  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
from llm_loader import load_llm  # noqa: E402

MAIN = [("pt_L1", "PT, L = 1"), ("pt_L4", "PT, L = 4"), ("spt_paper", "SPT K = 4, L = 1, --recipe paper"),
        ("spt_authors", "SPT K = 4, L = 1, --recipe authors"),
        ("spt_routed_soft", "SPT K = 4, L = 1, --recipe routed --nll-weights retriever --no-detach-prompts-in-scores"),
        ("spt_routed", "SPT K = 4, L = 1, --recipe routed"),  # spt_routed_soft: --recipe routed until commit f961a71
        ("spt_paper_centered", "SPT K = 4, L = 1, --recipe paper --center-contexts")]
NEWER = {"spt_routed_soft", "spt_routed", "spt_paper_centered"}  # rows added after results/convai2 was run: shown only in a folder that has them
ABLATIONS = [("spt_paper", "SPT (Eq. 6, --recipe paper)"), ("spt_no_con", "w/o contrastive (lambda-con 0)"),
             ("spt_no_sel", "w/o selection (lambda-sel 0)"), ("spt_no_fusion", "w/o fusion (lambda-fusion 0)")]
NUM_PROMPTS = [("pt_L1", 1), ("spt_K2", 2), ("spt_paper", 4), ("spt_K8", 8)]  # K = 1 is PT L = 1: see num_prompts_table()
GENERATION = [("F1", "f1"), ("BLEU", "bleu"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"),
              ("DIST-1", "dist1"), ("DIST-2", "dist2"), ("persona BLEU", "persona_bleu")]
# Table 2's metrics: those of the paper's Table 2 we compute (it also has BERTScore; DIST-1 and DIST-2 in place of
# their average).
ABLATION_METRICS = [(name, key) for name, key in GENERATION if key in ("f1", "bleu", "rougeL", "dist1", "dist2")]


def test_batches(config, tok, batch_size=8):
    """The checkpoint's held-out examples, encoded as it was trained, in batches of similar length (less padding)."""
    held_out = data.split_by_dialogue(data.load_examples(config["data"]), config["holdout"], shuffle=False)[1]
    encoded = sorted((data.encode_example(ex, tok, config["max_len"]) for ex in held_out), key=lambda e: len(e.prompt_ids) + len(e.target_ids))
    return list(data.batches(encoded, batch_size, tok.pad_id, shuffle=False))


def run_dtype(config):
    """The dtype a run trained its LLM in; runs from before config.json recorded it all used --dtype float32."""
    return config.get("dtype", "float32")


def load_run_llm(config):
    """The frozen LLM in the dtype the run trained in, so scores compare like with like."""
    return load_llm(config["model"], device="cpu", dtype=getattr(torch, run_dtype(config)))


def heldout(runs):
    """Held-out NLL per token with the prompt of Eq. 7, averaged over every test example, and the prompts picked."""
    llm = tok = None
    for run in map(Path, runs):
        spt, config = train.load_checkpoint(run)
        if llm is None or llm.dtype != getattr(torch, run_dtype(config)):
            llm, tok = load_run_llm(config)
        batches = test_batches(config, tok)
        nll, chosen = train.heldout_nll(llm, spt, batches)
        turns = [ex.turn for batch in batches for ex in batch.examples]
        result = {"step": config["step"], "examples": len(nll), "nll": sum(nll) / len(nll),
                  "usage": [chosen.count(k) for k in range(spt.num_prompts)],
                  "usage_by_turn": metrics.prompt_usage_by_turn(turns, chosen, spt.num_prompts)}
        (run / "heldout.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{run}: held-out NLL {result['nll']:.4f} on {len(nll)} examples (step {result['step']}), usage {result['usage']}")


def prompts(runs):
    """Each of an SPT run's K prompts given to every test context, and each context's best of the K: tells a retriever
    that misses good prompts (best far below Eq. 7's pick) from prompts that are no good (best no better than PT)."""
    llm = tok = None
    for run in map(Path, runs):
        spt, config = train.load_checkpoint(run)
        if (read(run / "prompts.json") or {}).get("step") == config["step"]:
            print(f"{run}: prompts.json is of its step {config['step']}, kept")
            continue
        if llm is None or llm.dtype != getattr(torch, run_dtype(config)):
            llm, tok = load_run_llm(config)
        every = torch.cat([train.each_prompt_nll(llm, spt.soft_prompts, batch) for batch in test_batches(config, tok)])  # (N, K)
        result = {"step": config["step"], "examples": len(every), "best_prompt_nll": every.min(1).values.mean().item(),
                  "each_prompt_nll": every.mean(0).tolist()}
        (run / "prompts.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{run}: each context's best prompt {result['best_prompt_nll']:.4f}, each prompt for every context "
              + " / ".join(f"{v:.4f}" for v in result["each_prompt_nll"]))


def baseline(run):
    """The frozen LLM with no soft prompt on run's test part: the floor every prompt should beat."""
    config = train.load_checkpoint(run)[1]
    llm, tok = load_run_llm(config)
    nll = train.no_prompt_nll(llm, test_batches(config, tok))
    out = Path(run).parent / "no_prompt.json"
    out.write_text(json.dumps({"examples": len(nll), "nll": sum(nll) / len(nll)}, indent=1) + "\n")
    print(f"frozen LLM, no prompt: held-out NLL {sum(nll) / len(nll):.4f} on {len(nll)} examples -> {out}")


def predictions(run):
    """Greedy responses to every test context (generate.py), scored, then stored without the ConvAI2 text."""
    run = Path(run)
    dtype = run_dtype(train.load_checkpoint(run)[1])
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "predictions.jsonl"
        generate.main(["--ckpt", str(run), "--out", str(full), "--device", "cpu", "--dtype", dtype])
        records = metrics.read_predictions(full)
    scores = {k: v for k, v in metrics.metrics_of_records(records).items() if not k.startswith("bertscore")}
    (run / "generation.json").write_text(json.dumps({"examples": len(records), **scores}, indent=1) + "\n")
    own = [{k: r[k] for k in ("dialogue_id", "turn", "prediction", "chosen_prompt")} for r in records]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in own))
    print(f"{run}: " + ", ".join(f"{name} {scores[key]:.2f}" for name, key in GENERATION))


# ----------------------------------------------------------------------------- tables

def read(path):
    return json.loads(path.read_text()) if path.is_file() else None


def seeds_of(runs_dir, setting):
    """{seed: heldout.json} of the scored runs SETTING_seedN."""
    found = {}
    for folder in sorted(runs_dir.glob(f"{setting}_seed*")):
        result = read(folder / "heldout.json")
        if result is not None:
            found[int(folder.name.rsplit("seed", 1)[1])] = result
    return dict(sorted(found.items()))


def pending(runs_dir, run):
    """What a table says for a run without scores: 'not run yet', 'not decoded yet' (trained and scored, no greedy
    responses), or the step its last checkpoint holds (where --resume continues; a run still training logs steps past
    it)."""
    config = read(runs_dir / run / "config.json")
    if config is None:
        return "not run yet"
    if (runs_dir / run / "heldout.json").exists():
        return "not decoded yet"
    return f"cut at step {config['step']} of {config['args']['max_steps']}"


def mean_std(values):
    """'mean ± std' (sample std over seeds), or the one value."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def steps_note(runs_dir, settings):
    """How long, and in which dtype, the finished runs of the table trained, from their configs (one phrase when all agree)."""
    shapes = set()
    for setting, _ in settings:
        for folder in runs_dir.glob(f"{setting}_seed*"):
            config = read(folder / "config.json")
            if config and (folder / "heldout.json").is_file():
                steps, batch = config["args"]["max_steps"], config["batch_size"]
                shapes.add(f"{steps} steps of {batch} examples ({steps * batch} examples) in {run_dtype(config)}")
    return "Runs trained " + " or ".join(sorted(shapes)) if shapes else "No run has finished yet"


def eval_curve(folder):
    """[(step, held-out NLL on the first --eval-examples test examples)] from a run's training log."""
    log = folder / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return [(row["step"], row["eval_nll"]) for row in rows if "eval_nll" in row]


def main_table(runs_dir):
    """Table 1 at this scale (PT against SPT, held-out NLL over seeds, seed 0's generation metrics), with Table 4's
    comparison in the same runs: PT with one 4-token prompt against SPT's four 1-token prompts."""
    lines = ["| setting | seeds | held-out NLL (mean ± std over seeds) | per seed | prompt usage per seed |",
             "| --- | ---: | ---: | --- | --- |"]
    baseline_result = read(runs_dir / "no_prompt.json")
    if baseline_result:
        lines.append(f"| frozen LLM, no prompt | | {baseline_result['nll']:.3f} | | |")
    rows = [(setting, label) for setting, label in MAIN if setting not in NEWER or list(runs_dir.glob(f"{setting}_seed*"))]
    scored = {setting: seeds_of(runs_dir, setting) for setting, _ in rows}
    for setting, label in rows:
        found = scored[setting]
        if not found:
            lines.append(f"| {label} | 0 | {pending(runs_dir, f'{setting}_seed0')} | | |")
            continue
        values = [r["nll"] for r in found.values()]
        per_seed = ", ".join(f"{r['nll']:.3f} ({seed})" for seed, r in found.items())
        usage = ", ".join(f"{r['usage']} ({seed})" for seed, r in found.items()) if setting.startswith("spt") else ""
        lines.append(f"| {label} | {len(found)} | {mean_std(values)} | {per_seed} | {usage} |")
    lines += ["", f"Held-out NLL: mean over the test examples of the per-token NLL of the reference response, each "
                  f"with the prompt Eq. 7 picks. {steps_note(runs_dir, rows)}. Per seed: value (seed)."]
    lines += versus_pt_table({label: [r["nll"] for r in scored[setting].values()] for setting, label in rows})
    lines += ["", generation_table(runs_dir, [(f"{s}_seed0", label) for s, label in rows])]
    runs = [(f"{setting}_seed{seed}", f"{label}, seed {seed}") for setting, label in rows for seed in scored[setting]]
    lines += ["", curve_table(runs_dir, runs)]
    lines += prompts_table(runs_dir, rows)
    for setting, label in rows[2:]:
        found = scored[setting]
        if found:
            examples = next(iter(found.values()))["examples"]
            lines += ["", f"Prompt usage by turn, {label} (Eq. 7 on the {examples} test contexts; each cell is the share "
                          f"of the turn's contexts sent to prompts 0, 1, ...):", "",
                      usage_by_turn_table({seed: r["usage_by_turn"] for seed, r in found.items()})]
    return "\n".join(lines) + "\n"


def versus_pt_table(nll_by_label):
    """Each SPT row against each PT row with at least 2 seeds each: the difference of the mean held-out NLLs, and
    whether it is beyond the seeds' spread (every SPT seed below every PT seed, or every one above)."""
    pts = [label for label, values in nll_by_label.items() if label.startswith("PT") and len(values) >= 2]
    spts = [label for label, values in nll_by_label.items() if label.startswith("SPT") and len(values) >= 2]
    if not pts or not spts:
        return []
    lines = ["", "| SPT - PT, mean held-out NLL (beyond the seeds' spread?) | " + " | ".join(pts) + " |",
             "| --- |" + " ---: |" * len(pts)]
    for spt in spts:
        cells = []
        for pt in pts:
            a, b = nll_by_label[spt], nll_by_label[pt]
            verdict = ("every seed below" if max(a) < min(b) else "every seed above" if min(a) > max(b)
                       else "seeds overlap")
            cells.append(f"{sum(a) / len(a) - sum(b) / len(b):+.3f} ({verdict})")
        lines.append(f"| {spt} | " + " | ".join(cells) + " |")
    return lines


def generation_table(runs_dir, runs):
    lines = ["| greedy responses, seed 0 | " + " | ".join(name for name, _ in GENERATION) + " |",
             "| --- |" + " ---: |" * len(GENERATION)]
    for run, label in runs:
        result = read(runs_dir / run / "generation.json")
        cells = [f"{result[key]:.2f}" for _, key in GENERATION] if result else [pending(runs_dir, run)] + [""] * (len(GENERATION) - 1)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(runs_dir, runs):
    """Held-out NLL on the first test examples at each --eval-every step of each (run, label), and has it flattened:
    how much each run improved over its last 100 steps, against issue 31's bar of 0.01."""
    curves = {label: dict(eval_curve(runs_dir / run)) for run, label in runs}
    steps = sorted({step for curve in curves.values() for step in curve})
    if not steps:
        return "(no evaluation during training logged yet)"
    lines = ["| held-out NLL on the first 200 test examples during training, at step | " + " | ".join(map(str, steps))
             + " | fall over the last 100 steps |", "| --- |" + " ---: |" * (len(steps) + 1)]
    falls = []
    for label, curve in curves.items():
        last = max(curve, default=None)
        fall = curve[last - 100] - curve[last] if last is not None and last - 100 in curve else None
        falls += [fall] if fall is not None else []
        lines.append(f"| {label} | " + " | ".join(f"{curve[s]:.3f}" if s in curve else "" for s in steps)
                     + f" | {'' if fall is None else f'{fall:+.3f}'} |")
    if falls:
        verdict = "yes" if max(falls) <= 0.01 else f"no, the largest fall is {max(falls):.3f}"
        lines += ["", f"Flattened (no run's NLL fell by more than 0.01 over its last 100 steps): {verdict}."]
    return "\n".join(lines)


def prompts_table(runs_dir, rows):
    """The SPT runs with a prompts.json, against PT L = 1 of the same seed: the prompt Eq. 7 picks, each context's
    best prompt, and each prompt given to every context."""
    lines = []
    for setting, label in rows:
        for seed in seeds_of(runs_dir, setting):
            found = read(runs_dir / f"{setting}_seed{seed}" / "prompts.json")
            picked = read(runs_dir / f"{setting}_seed{seed}" / "heldout.json")
            if found is None or found["step"] != picked["step"]:
                continue
            pt = read(runs_dir / f"pt_L1_seed{seed}" / "heldout.json")
            pt_nll = f"{pt['nll']:.3f}" if pt else ""
            each = " / ".join(f"{v:.3f}" for v in found["each_prompt_nll"])
            lines.append(f"| {label}, seed {seed} | {pt_nll} | {picked['nll']:.3f} | {found['best_prompt_nll']:.3f} | {each} |")
    if not lines:
        return []
    return ["", "| SPT's prompts one at a time (python results/convai2.py prompts RUN) | PT, L = 1, same seed | "
                "the prompt Eq. 7 picks | each context's best prompt | each prompt for every context |",
            "| --- | ---: | ---: | ---: | --- |", *lines]


def usage_by_turn_table(by_seed):
    """{seed: {turn: [contexts sent to each prompt]}} -> one row per turn, one column of prompt shares per seed."""
    turns = next(iter(by_seed.values()))
    lines = ["| turn | contexts | " + " | ".join(f"seed {seed}" for seed in by_seed) + " |",
             "| ---: | ---: |" + " --- |" * len(by_seed)]
    for turn, counts in turns.items():
        shares = [" ".join(f"{c / sum(table[turn]):.2f}" for c in table[turn]) for table in by_seed.values()]
        lines.append(f"| {turn} | {sum(counts)} | " + " | ".join(shares) + " |")
    return "\n".join(lines)


def ablation_table(runs_dir):
    """Table 2: held-out NLL, ABLATION_METRICS, and how many of the K prompts Eq. 7 gives any test context."""
    lines = ["| variant, seed 0 | held-out NLL | " + " | ".join(name for name, _ in ABLATION_METRICS) + " | prompts used | prompt usage |",
             "| --- | ---: |" + " ---: |" * len(ABLATION_METRICS) + " ---: | --- |"]
    for setting, label in ABLATIONS:
        result = read(runs_dir / f"{setting}_seed0" / "heldout.json")
        generation = read(runs_dir / f"{setting}_seed0" / "generation.json")
        if not result:
            lines.append(f"| {label} | {pending(runs_dir, f'{setting}_seed0')} |" + " |" * (len(ABLATION_METRICS) + 2))
            continue
        cells = [f"{generation[key]:.2f}" if generation else "" for _, key in ABLATION_METRICS]
        lines.append(f"| {label} | {result['nll']:.3f} | " + " | ".join(cells) +
                     f" | {prompts_used(result['usage'])} of {len(result['usage'])} | {result['usage']} |")
    return "\n".join(lines) + "\n"


def prompts_used(usage):
    """How many prompts Eq. 7 sends at least one test context to: comparable across seeds, unlike which ones."""
    return sum(count > 0 for count in usage)


def num_prompts_table(runs_dir):
    """Table 3, then its runs' held-out NLL during training. K = 1 is the PT L = 1 run: with one prompt Eq. 3's KL
    is 0, Eq. 5 equals Eq. 2, and Eq. 4 moves only the retriever, so the prompt's gradient is 2x PT's, which Adam's
    update does not see (up to its eps)."""
    lines = ["| K, seed 0 | held-out NLL | prompts used | prompt usage |", "| ---: | ---: | ---: | --- |"]
    for setting, k in NUM_PROMPTS:
        result = read(runs_dir / f"{setting}_seed0" / "heldout.json")
        lines.append(f"| {k} | {result['nll']:.3f} | {prompts_used(result['usage'])} | {result['usage']} |" if result
                     else f"| {k} | {pending(runs_dir, f'{setting}_seed0')} | | |")
    lines += ["", curve_table(runs_dir, [(f"{setting}_seed0", f"K = {k}") for setting, k in NUM_PROMPTS])]
    return "\n".join(lines) + "\n"


def report(runs_dir):
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        sys.exit(f"error: {runs_dir} does not exist: pass the OUT folder of results/pt_vs_spt.sh (results/convai2)")
    for name, text in [("pt_vs_spt.md", main_table(runs_dir)), ("ablations.md", ablation_table(runs_dir)),
                       ("num_prompts.md", num_prompts_table(runs_dir))]:
        (runs_dir / name).write_text(text)
        print(f"{runs_dir / name}:\n{text}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("heldout", help="Eq. 7 held-out NLL of each run -> RUN/heldout.json").add_argument("runs", nargs="+")
    sub.add_parser("baseline", help="the frozen LLM's held-out NLL on RUN's test part").add_argument("run")
    sub.add_parser("predictions", help="greedy responses and their metrics").add_argument("run")
    sub.add_parser("prompts", help="an SPT run's K prompts one at a time -> RUN/prompts.json").add_argument("runs", nargs="+")
    sub.add_parser("report", help="the tables from the scored runs in RUNS").add_argument("runs_dir")
    args = p.parse_args(argv)
    if args.command == "heldout":
        heldout(args.runs)
    elif args.command == "baseline":
        baseline(args.run)
    elif args.command == "predictions":
        predictions(args.run)
    elif args.command == "prompts":
        prompts(args.runs)
    else:
        report(args.runs_dir)


if __name__ == "__main__":
    train.run_cli(main)
