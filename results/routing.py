"""The controlled routing check (RESULTS.md "Routing"): does the retriever send each kind of context to a prompt of its own?

    python results/routing.py oracle-data DIR   # one JSONL per kind of the routing set's training part
    python results/routing.py report RUNS       # held-out NLL and routing purity of the runs in RUNS
    python results/routing.py routed RUNS       # the same over seeds for results/routed.sh, with its ablation
    python results/routing.py score RUN ...     # one line per run (results/routed_search.sh)
    python results/routing.py inits RUNS BASE   # one data order, several initialisations (results/routed_init.sh)

The data is data.routing_examples() (`--data routing`): four kinds of context, each with a response
pattern the context does not reveal. `report` scores the last 200 examples (`--holdout 200`, never
trained on) with the prompt the retriever picks (Eq. 7), writes RUNS/table.md and RUNS/report.json,
and plots what the training logs say about routing to RUNS/routing.png (when matplotlib is installed).
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
from llm_loader import load_llm  # noqa: E402

HOLDOUT = 200
RUNS = [("pt", "PT (K = 1)"), ("spt_paper", "SPT, --recipe paper"), ("spt_authors", "SPT, --recipe authors")]
ORACLE = ("oracle", "oracle (a PT prompt per kind, picked by kind)")  # scored from the four oracle_KIND runs


def split():
    """(training examples, held-out examples) of the routing set, as train.py --data routing --holdout 200 splits it."""
    return data.split_by_dialogue(data.routing_examples(), HOLDOUT, shuffle=False)


def write_oracle_data(folder):
    """The training part of each kind as its own JSONL, for the oracle's one-kind PT runs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for kind in sorted(data.ROUTING_KINDS):
        rows = [{"persona": ex.persona, "context": ex.context, "response": ex.response, "dialogue_id": ex.dialogue_id}
                for ex in split()[0] if data.routing_kind(ex) == kind]
        (folder / f"{kind}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {folder / kind}.jsonl: {len(rows)} examples")


@torch.no_grad()
def score_run(llm, batches, soft_prompts, choose, best_of_k=True):
    """Per held-out example: NLL with the chosen prompt, the chosen prompt, and the NLL of its best prompt
    (best_of_k=False skips the K forwards that takes and reports None).

    soft_prompts (K, L, E); choose(batch) -> (B,) prompt indices.
    """
    nll, chosen, best = [], [], []
    for batch in batches:
        picks = choose(batch)
        if not best_of_k:
            nll += train.prompted_nll(llm, soft_prompts[picks], batch).tolist()
            chosen += picks.tolist()
            continue
        every = train.each_prompt_nll(llm, soft_prompts, batch)  # (B, K)
        nll += every.gather(1, picks[:, None]).squeeze(1).tolist()
        chosen += picks.tolist()
        best += every.min(1).values.tolist()
    return nll, chosen, best or None


def summarize(name, label, kinds, nll, chosen, best, config):
    purity, share, assignment = metrics.routing_purity(kinds, chosen)
    per_kind = {kind: sum(x for x, k in zip(nll, kinds) if k == kind) / kinds.count(kind) for kind in sorted(set(kinds))}
    return {"run": name, "label": label, "nll": sum(nll) / len(nll), "nll_by_kind": per_kind,
            "best_prompt_nll": sum(best) / len(best) if best else None, "purity": purity, "purity_by_kind": share,
            "prompt_of_kind": assignment, "usage": [chosen.count(k) for k in range(max(chosen) + 1)],
            "steps": config.get("step"), "settings": {**{k: config["args"][k] for k in (
                "num_prompts", "prompt_len", "prompt_init", "lr", "batch_size", "seed", "recipe", "fusion",
                "contrast_text", "nll_reduction", "lambda_con", "lambda_sel", "lambda_fusion", "tau_s")},
                "con_reduction": config["con_reduction"], "dtype": config["args"]["dtype"]}}


def held_out_part(run):
    """The frozen LLM in the dtype of the run folder `run`, the held-out examples encoded, their batches of 8 and
    their kinds: what every report scores on."""
    config = json.loads((Path(run) / "config.json").read_text())
    dtype = config.get("dtype", "float32")  # the runs' own dtype; runs from before configs recorded it were float32
    llm, tok = load_llm(config["model"], device="cpu", dtype=getattr(torch, dtype))
    held_out = split()[1]
    encoded = [data.encode_example(ex, tok, config["max_len"]) for ex in held_out]
    return llm, encoded, list(data.batches(encoded, 8, tok.pad_id, shuffle=False)), [data.routing_kind(ex) for ex in held_out]


def report(runs_dir):
    runs_dir = Path(runs_dir)
    llm, encoded, batches, kinds = held_out_part(runs_dir / RUNS[0][0])
    nll = train.no_prompt_nll(llm, batches)
    rows = [{"run": "none", "label": "no prompt (frozen LLM)", "nll": sum(nll) / len(nll)}]
    rows += [score_folder(llm, batches, kinds, runs_dir / name, label) for name, label in RUNS + [ORACLE]]

    target_len = sum(len(e.target_ids) for e in encoded) / len(encoded)
    lines = ["| run | held-out NLL, Eq. 7 | NLL with each context's best prompt | routing purity | prompt usage |",
             "| --- | ---: | ---: | ---: | --- |"]
    for row in rows:
        if row["run"] == "none":
            lines.append(f"| {row['label']} | {row['nll']:.3f} | | | |")
            continue
        best = f"{row['best_prompt_nll']:.3f}" if row["best_prompt_nll"] is not None else ""
        lines.append(f"| {row['label']} | {row['nll']:.3f} | {best} | {row['purity']:.2f} | "
                     f"{row['usage']} |")
    lines.append("")
    lines.append(f"Held-out: the last {HOLDOUT} examples of `--data routing` ({len(split()[0])} train). NLL is per target "
                 f"token; the random answer word alone leaves log 4 / {target_len:.1f} target tokens = "
                 f"{math.log(4) / target_len:.3f} per token that no prompt can remove. Routing purity: share of held-out contexts on their "
                 f"kind's prompt, each kind on a prompt of its own (when all share one prompt: the largest kind's share, "
                 f"{max(kinds.count(k) for k in set(kinds)) / len(kinds):.2f} here).")
    lines += ["", *diagnostics(runs_dir)]
    (runs_dir / "table.md").write_text("\n".join(lines) + "\n")
    (runs_dir / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    plot(runs_dir)


# results/routed.sh's runs per seed, in table order; a run is shown when it finished at every seed. Rows are labelled by
# the flags that give them today (train.recipe_flags), so the runs of an earlier --recipe routed label themselves.
ROUTED_RUNS = ["pt", "spt_paper", "spt_routed", "spt_routed_picked", "spt_routed_picked_detached", "oracle"]
ABLATIONS = ["no_nll_weights", "no_detach", "no_center_contexts", "no_fusion", "detached", "picked_detached_no_center_contexts"]
# an ablation row that is also a row of every seed: read from the first seed's folder (routed.sh trains it once)
ABLATION_IN_SEEDS = {"no_detach": "spt_routed_picked"}


def finished(folder):
    """True when the run in folder (or, for seedN/oracle, each of the four oracle runs) trained all its steps."""
    configs = [json.loads((f / "config.json").read_text()) if (f / "config.json").is_file() else None
               for f in run_folders(folder)]
    return all(c is not None and c["step"] == c["args"]["max_steps"] for c in configs)


def run_label(folder, prefix="SPT, "):
    """A routed.sh run's row label: PT, the oracle, or prefix and the flags its config.json was trained with."""
    fixed = {RUNS[0][0]: RUNS[0][1], ORACLE[0]: ORACLE[1]}  # PT and the oracle: one label whatever the recipe
    if folder.name in fixed:
        return fixed[folder.name]
    return prefix + train.recipe_flags(json.loads((folder / "config.json").read_text()))


def read_log(folder):
    """The records of a run's log.jsonl, one per logged step (train.py writes them)."""
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def oracle_folders(seed_dir):
    """The oracle's four one-kind PT runs in seed_dir, in the order of sorted(data.ROUTING_KINDS)."""
    return [seed_dir / f"oracle_{kind}" for kind in sorted(data.ROUTING_KINDS)]


def run_folders(folder):
    """The folders a run trained in: for seedN/oracle its four one-kind PT runs, else the folder itself."""
    return oracle_folders(folder.parent) if folder.name == "oracle" else [folder]


def score_folder(llm, batches, kinds, folder, label):
    """summarize() of one run folder: an SPT/PT checkpoint picked by Eq. 7, or (oracle) the four one-kind PT runs."""
    if folder.name != "oracle":
        spt, config = train.load_checkpoint(folder, llm.embed_dim)
        choose = lambda batch: spt.scores(llm.embed(batch.context_ids), batch.context_mask).argmax(-1)  # noqa: E731  Eq. 7
        return summarize(folder.name, label, kinds, *score_run(llm, batches, spt.soft_prompts, choose), config)
    oracle = [train.load_checkpoint(run, llm.embed_dim) for run in oracle_folders(folder.parent)]
    prompts = torch.cat([spt.soft_prompts for spt, _ in oracle])  # (4, L, E): prompt k trained on kind k only
    index = {kind: k for k, kind in enumerate(sorted(data.ROUTING_KINDS))}
    choose = lambda batch: torch.tensor([index[data.routing_kind(ex)] for ex in batch.examples])  # noqa: E731
    return summarize("oracle", label, kinds, *score_run(llm, batches, prompts, choose, best_of_k=False), oracle[0][1])


def score_runs(folders):
    """One line per run folder: held-out NLL (Eq. 7), best-prompt NLL, purity, usage, and the routing diagnostics of
    its last ten logged steps (results/routed_search.sh)."""
    llm, _, batches, kinds = held_out_part(folders[0])
    for folder in map(Path, folders):
        row = score_folder(llm, batches, kinds, folder, folder.name)
        log = read_log(folder)[-10:] if (folder / "log.jsonl").exists() else []  # the oracle is four runs: no log of its own
        diag = " ".join(f"{key} {sum(r[key] for r in log) / len(log):.2f}" for key in ("q_max", "p_max", "agree", "vc_cos") if log)
        best = "" if row["best_prompt_nll"] is None else f"best {row['best_prompt_nll']:.3f} "  # the oracle has none
        print(f"{folder.name:22s} nll {row['nll']:.3f} {best}purity {row['purity']:.2f} "
              f"usage {row['usage']} {diag}", flush=True)


def best_of_seeds(by_kind, kinds):
    """A run's NLL with each kind's prompt taken from the seed where it did best on the held-out part. For the oracle,
    a bound that a prompt gone astray at one seed does not loosen (picked on the held-out part, so it only makes the
    bar stricter); for the recipe, the like-for-like comparison with it.

    by_kind: one {kind: mean NLL} per seed; kinds: the held-out examples' kinds. -> (NLL per example, {kind: NLL})."""
    best = {kind: min(seed[kind] for seed in by_kind) for kind in sorted(set(kinds))}
    return sum(best[kind] for kind in kinds) / len(kinds), best


def lr_schedule(config):
    """A run's lr schedule as the table names it: 'cosine', or 'cosine after 50 warmup steps' (configs from before
    a setting existed mean its old value: train.LEGACY_SETTINGS)."""
    config = {**train.LEGACY_SETTINGS, **config}
    return train.lr_plan(config["lr_schedule"], config["warmup_steps"])


def mean_std(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def routed_report(runs_dir):
    """RUNS/seed*/ (routed.sh) -> RUNS/table.md: each run's held-out NLL and purity over the seeds, the issue's
    bar for --recipe routed (purity >= 0.9, NLL below PT's and within 0.05 of the oracle's, at every seed), the
    last part against the oracle of each kind's best seed too (and the run's own best seed per kind, like for like),
    and the ablation (RUNS/ablation/, seed 0; a row that is also a run of every seed comes from the first seed)."""
    runs_dir = Path(runs_dir)
    seeds = sorted(runs_dir.glob("seed*"), key=lambda d: int(d.name[4:]))
    names = [name for name in ROUTED_RUNS if all(finished(seed / name) for seed in seeds)]
    if "pt" not in names or "oracle" not in names:
        sys.exit(f"error: {runs_dir} has no finished PT and oracle runs at every seed: run bash results/routed.sh")
    ablation = [seeds[0] / ABLATION_IN_SEEDS[name] if name in ABLATION_IN_SEEDS and ABLATION_IN_SEEDS[name] in names
                else runs_dir / "ablation" / name for name in ABLATIONS]
    ablation = [folder for folder in ablation if folder.is_dir() and finished(folder)]
    folders = [f for seed in seeds for name in names for f in run_folders(seed / name)]
    schedule = {lr_schedule(json.loads((f / "config.json").read_text())) for f in folders + ablation}
    if len(schedule) > 1:
        sys.exit(f"error: {runs_dir} mixes lr schedules {sorted(schedule)}: a table compares runs under one schedule")
    labels = {name: run_label(seeds[0] / name) for name in names}
    llm, _, batches, kinds = held_out_part(seeds[0] / "pt")
    config = json.loads((seeds[0] / "pt" / "config.json").read_text())
    rows = {(seed.name, name): score_folder(llm, batches, kinds, seed / name, labels[name]) for seed in seeds for name in names}
    cell = lambda name, key, fmt: " / ".join(fmt.format(rows[seed.name, name][key]) for seed in seeds)  # noqa: E731
    lines = [f"Seeds {', '.join(seed.name[4:] for seed in seeds)}; {config['args']['max_steps']} steps each, "
             f"{config.get('dtype', 'float32')}, lr {schedule.pop()} (every run); per-seed values in seed order.", "",
             "| run | held-out NLL, Eq. 7 | per seed | NLL with each context's best prompt | routing purity per seed |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in names:
        nll = [rows[seed.name, name]["nll"] for seed in seeds]
        best = [rows[seed.name, name]["best_prompt_nll"] for seed in seeds]
        best_cell = mean_std(best) if None not in best else ""
        lines.append(f"| {labels[name]} | {mean_std(nll)} | {cell(name, 'nll', '{:.3f}')} | {best_cell} | "
                     f"{cell(name, 'purity', '{:.2f}')} |")
    lines.append("")
    for name in [name for name in names if name.startswith("spt_routed")]:  # the bar for each
        routed = [rows[seed.name, name] for seed in seeds]
        checks = {"routing purity >= 0.9": all(r["purity"] >= 0.9 for r in routed),
                  "held-out NLL below PT's": all(r["nll"] < rows[s.name, "pt"]["nll"] for r, s in zip(routed, seeds)),
                  "within 0.05 of the oracle's": all(r["nll"] <= rows[s.name, "oracle"]["nll"] + 0.05 for r, s in zip(routed, seeds))}
        lines += [f"{labels[name].removeprefix('SPT, ')} at every seed: " + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items()) + "."]
    per_kind = lambda name: best_of_seeds([rows[s.name, name]["nll_by_kind"] for s in seeds], kinds)  # noqa: E731
    stable, best = per_kind("oracle")
    lines += ["", f"The oracle with each kind's best prompt over the seeds (food / music / pets / sports "
                  f"{' / '.join(f'{v:.2f}' for v in best.values())}): {stable:.3f}."]
    for name in [name for name in names if name.startswith("spt_routed")]:
        within = all(rows[s.name, name]["nll"] <= stable + 0.05 for s in seeds)
        own, own_best = per_kind(name)
        lines += [f"{labels[name].removeprefix('SPT, ')} within 0.05 of it at every seed: {'yes' if within else 'no'}; "
                  f"with each kind's best prompt over the seeds too ({' / '.join(f'{v:.2f}' for v in own_best.values())}): "
                  f"{own:.3f}, {own - stable:+.3f}."]
    lines += ["", "| held-out NLL by kind: food / music / pets / sports | " + " | ".join(f"seed {s.name[4:]}" for s in seeds) + " |",
              "| --- |" + " ---: |" * len(seeds)]
    for name in names:
        lines.append(f"| {labels[name]} | " + " | ".join(" / ".join(f"{v:.2f}" for _, v in sorted(rows[s.name, name]["nll_by_kind"].items()))
                                                       for s in seeds) + " |")
    lines += ["", *budget_table(seeds, names, labels)]
    if ablation and "spt_routed" in names:
        seed0 = seeds[0].name
        lines += ["", f"| ablation (seed {seed0[4:]}) | held-out NLL, Eq. 7 | NLL with each context's best prompt | routing purity | prompt usage |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for row in [rows[seed0, "spt_routed"]] + [{**rows[seed0, f.name], "label": run_label(f, "")} if f.parent == seeds[0]
                                                   else score_folder(llm, batches, kinds, f, run_label(f, "")) for f in ablation]:
            lines.append(f"| {row['label']} | {row['nll']:.3f} | {row['best_prompt_nll']:.3f} | {row['purity']:.2f} | {row['usage']} |")
    (runs_dir / "table.md").write_text("\n".join(lines) + "\n")
    (runs_dir / "report.json").write_text(json.dumps({f"{s}/{n}": r for (s, n), r in rows.items()}, indent=1) + "\n")
    print("\n".join(lines))


def training_nll(folder, first, last):
    """Median over steps first..last of a run's logged training NLL per example and prompt (train.py logs Eq. 6's
    weighted sum over the K prompts, whose weights sum to K for each example: divided by K); seedN/oracle: the mean of
    its four runs' medians, one per kind. None when a run logged no step in that range."""
    values = []
    for f in run_folders(folder):
        num_prompts = json.loads((f / "config.json").read_text())["num_prompts"]
        values.append([r["nll"] / num_prompts for r in read_log(f) if first <= r["step"] <= last])
    return sum(map(statistics.median, values)) / len(values) if all(values) else None


def training_nll_by_kind(folder, row, first, last):
    """{kind: median training NLL over steps first..last} of a run scored as row (summarize): for SPT the logged
    prompt_nll of the prompt each kind is routed to on the held-out part (steps where Eq. 7 picked it for no example
    left out; NaN for a kind no prompt serves), for seedN/oracle each kind's own run. None for an SPT run whose log
    has no prompt_nll (before 2e8fc87)."""
    if folder.name == "oracle":
        return {kind: statistics.median(r["nll"] for r in read_log(f) if first <= r["step"] <= last)
                for kind, f in zip(sorted(data.ROUTING_KINDS), oracle_folders(folder.parent))}
    log = [r for r in read_log(folder) if first <= r["step"] <= last]
    if not all("prompt_nll" in r for r in log):
        return None
    values = {kind: [] if prompt is None else [r["prompt_nll"][prompt] for r in log if r["prompt_nll"][prompt] is not None]
              for kind, prompt in row["prompt_of_kind"].items()}
    return {kind: statistics.median(v) if v else math.nan for kind, v in values.items()}  # NaN: a kind without a prompt


def inits_report(runs_dir, base):
    """RUNS/init*/seedS (results/routed_init.sh) and BASE, routed.sh's seedS folder, initialised from S itself ->
    RUNS/table.md: PT, --recipe routed and the oracle at one data order from several initialisations. Each
    initialisation's gap between the recipe and the oracle, and the spread of each over the initialisations: whether
    the recipe stays above the oracle whatever the start, or the gap is one start's luck."""
    runs_dir, base = Path(runs_dir), Path(base)
    inits = sorted(runs_dir.glob("init*"), key=lambda d: int(d.name[4:]))
    folders = [init / base.name for init in inits] + [base]
    names = ["pt", "spt_routed", "oracle"]
    missing = [str(f / name) for f in folders for name in names if not finished(f / name)]
    if missing:
        sys.exit(f"error: unfinished or missing runs: {', '.join(missing)}: run bash results/routed_init.sh")
    labels = [f"--init-seed {init.name[4:]}" for init in inits] + [f"{base.parent.name} (from --seed {base.name[4:]})"]
    llm, _, batches, kinds = held_out_part(folders[0] / "pt")
    rows = {(label, name): score_folder(llm, batches, kinds, f / name, name) for label, f in zip(labels, folders) for name in names}
    config = json.loads((folders[0] / "spt_routed" / "config.json").read_text())
    by_kind = lambda row: " / ".join(f"{v:.2f}" for _, v in sorted(row["nll_by_kind"].items()))  # noqa: E731
    lines = [f"Data order of --seed {base.name[4:]}; {config['args']['max_steps']} steps, batch {config['batch_size']} "
             f"(the oracle's {config['batch_size'] // 4}), {config['dtype']}, lr {lr_schedule(config)}; each row one "
             f"initialisation of every run (train.py --init-seed).", "",
             "| initialisation | PT | --recipe routed | oracle | recipe - oracle | recipe by kind: food / music / pets / sports "
             "| oracle by kind | training NLL, steps 101-200: recipe / oracle |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, folder in zip(labels, folders):
        pt, routed, oracle = (rows[label, name] for name in names)
        training = [training_nll(folder / name, 101, 200) for name in ("spt_routed", "oracle")]
        lines.append(f"| {label} | {pt['nll']:.3f} | {routed['nll']:.3f} | {oracle['nll']:.3f} | "
                     f"{routed['nll'] - oracle['nll']:+.3f} | {by_kind(routed)} | {by_kind(oracle)} | "
                     f"{' / '.join('' if v is None else f'{v:.2f}' for v in training)} |")
    column = lambda name: [rows[label, name]["nll"] for label in labels]  # noqa: E731
    gaps = [r - o for r, o in zip(column("spt_routed"), column("oracle"))]
    lines.append(f"| mean ± std | {mean_std(column('pt'))} | {mean_std(column('spt_routed'))} | {mean_std(column('oracle'))} | "
                 f"{mean_std(gaps)} | | | |")
    purity = [rows[label, "spt_routed"]["purity"] for label in labels]
    lines += ["", f"--recipe routed within 0.05 of the oracle: {sum(g <= 0.05 for g in gaps)} of {len(gaps)} initialisations; "
                  f"routing purity {' / '.join(f'{p:.2f}' for p in purity)}.", "",
              "| training NLL by kind (median over the steps), food / music / pets / sports | steps | --recipe routed "
              "(its prompt for the kind) | oracle |", "| --- | --- | ---: | ---: |"]
    for label, folder in zip(labels, folders):
        steps = [r["step"] for r in read_log(folder / "spt_routed")]
        for first, last in [(1, 50), (51, 100), (101, 200), (201, 400), (401, 600)]:
            if not any(first <= step <= last for step in steps):
                continue  # a run shorter than these steps
            cells = [training_nll_by_kind(folder / name, rows[label, name], first, last) for name in ("spt_routed", "oracle")]
            if cells[0] is None:
                continue  # a log from before prompt_nll
            lines.append(f"| {label} | {first}-{last} | " + " | ".join(" / ".join(f"{v:.2f}" for _, v in sorted(c.items()))
                                                                     for c in cells) + " |")
    (runs_dir / "table.md").write_text("\n".join(lines) + "\n")
    (runs_dir / "report.json").write_text(json.dumps({f"{label}/{name}": row for (label, name), row in rows.items()}, indent=1) + "\n")
    print("\n".join(lines))


def budget_table(seeds, names, labels):
    """Each run's training minutes (mean over seeds; the oracle's four runs added) and its held-out curve, the NLL at
    each --eval-every step with Eq. 7's pick (mean over seeds), from the runs' log.jsonl: the budget, and whether it
    was enough for the curves to flatten."""
    minutes, curves = {}, {}
    for name in names:
        folders = [run_folders(seed / name) for seed in seeds]
        minutes[name] = sum(r["seconds"] for per_seed in folders for f in per_seed for r in read_log(f)) / 60 / len(seeds)
        evals = [{r["step"]: r["eval_nll"] for r in read_log(per_seed[0]) if "eval_nll" in r} for per_seed in folders]
        curves[name] = {step: sum(e[step] for e in evals) / len(evals) for step in evals[0] if all(step in e for e in evals)}
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = ["| run | training minutes per seed | " + " | ".join(f"NLL at step {s}" for s in steps) + " |",
             "| --- | ---: |" + " ---: |" * len(steps)]
    for name in names:
        lines.append(f"| {labels[name]} | {minutes[name]:.1f} | " + " | ".join(f"{curves[name][s]:.3f}" if s in curves[name] else ""
                                                                   for s in steps) + " |")
    return lines + ["", "Minutes: the sum of the logged step times (evaluation not included). NLL at step N: "
                        "the held-out part with Eq. 7's pick, mean over the seeds (the oracle logs none)."]


def diagnostics(runs_dir, window=10):
    """What the SPT training logs say about routing, averaged over the first and the last `window` steps."""
    keys = [("q_max", "largest q"), ("p_max", "largest p"), ("agree", "argmax p = argmax q"),
            ("vc_cos", "v_C cosine"), ("grad_lin_context", "grad norm at lin_C"), ("distinct", "distinct prompts / batch")]
    lines = ["| SPT run, steps | " + " | ".join(title for _, title in keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for name, label in RUNS[1:]:
        log = read_log(runs_dir / name)
        for part in (log[:window], log[-window:]):
            cells = [sum(r[key] for r in part) / len(part) for key, _ in keys]
            lines.append(f"| {label}, {part[0]['step']}-{part[-1]['step']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return lines


def plot(runs_dir):
    """Per training step of the two SPT runs: q and p sharpness, their agreement, v_C cosine, gradient at lin_C, usage."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no routing.png")
        return
    keys = [("q_max", "largest share of q (LLM feedback)"), ("p_max", "largest share of p (retriever)"),
            ("agree", "argmax p = argmax q"), ("vc_cos", "cosine between two contexts' v_C"),
            ("grad_lin_context", "gradient norm at lin_C"), ("distinct", "distinct prompts chosen in the batch")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for name, label in RUNS[1:]:
        log = read_log(runs_dir / name)
        steps = [r["step"] for r in log]
        for ax, (key, title) in zip(axes.flat, keys):
            ax.plot(steps, [r[key] for r in log], label=label, alpha=0.8)
            ax.set(title=title, xlabel="step")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(runs_dir / "routing.png", dpi=100)
    print(f"wrote {runs_dir / 'routing.png'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["oracle-data", "report", "routed", "score", "inits"])
    p.add_argument("folder", nargs="+", help="oracle-data: where the JSONL files go; report, routed: the folder of the "
                                             "runs; score: run folders; inits: the folder of the runs and routed.sh's "
                                             "seed folder they share the data order of")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.command == "score":
        return score_runs(args.folder)
    if args.command == "inits":
        if len(args.folder) != 2:
            p.error("inits takes two folders: RUNS (results/routed_init) and BASE (e.g. results/routed_cosine/seed2)")
        return inits_report(*args.folder)
    {"oracle-data": write_oracle_data, "report": report, "routed": routed_report}[args.command](args.folder[0])


if __name__ == "__main__":
    main()
