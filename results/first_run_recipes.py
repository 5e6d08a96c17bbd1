"""RESULTS.md "The first run": the first run's closing numbers per seed, one row per seed and recipe, from the logs
results/first_run.sh writes (OUT/seedN.log), so the paper recipe and --recipe routed sit side by side.

Routing purity (metrics.routing_purity) gives each kind one prompt, so a kind split over two prompts counts as
misrouted; with K = 4 prompts and two kinds that split is no mistake. Prompt purity counts it as routed: the share
of contexts whose prompt gets mostly contexts of their kind (1 when no prompt serves both kinds).

    python results/first_run_recipes.py results/first_run results/first_run_routed   # -> results/first_run/recipes.md
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"spt": r"SPT \(K = \d+\): NLL ([\d.]+)", "pt": r"PT  \(K = 1\): NLL ([\d.]+)",
          "recipe": r"^recipe (\S+) \(SPT\)", "purity": r"routing purity ([\d.]+)"}


def prompt_purity(usage_by_kind):
    """Share of contexts on a prompt whose contexts are mostly of their kind; usage_by_kind: one count list per kind."""
    return sum(max(counts) for counts in zip(*usage_by_kind)) / sum(map(sum, usage_by_kind))


def read_run(log):
    """{'spt', 'pt', 'purity', 'prompt_purity': float, 'recipe': str} from one seedN.log; an error names a missing
    field."""
    text = log.read_text()
    found = {}
    for name, pattern in FIELDS.items():
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            sys.exit(f"error: {log} has no '{name}' line: is the run finished? (bash results/first_run.sh)")
        found[name] = match.group(1) if name == "recipe" else float(match.group(1))
    usage = [json.loads(counts) for counts in re.findall(r"SPT prompt usage, \w+ +contexts: (\[.*\])", text)]
    found["prompt_purity"] = prompt_purity(usage)
    return found


def table(folders):
    """One row per (folder, seed) and a mean row per folder."""
    lines = ["| recipe | seed | SPT NLL | PT NLL | SPT - PT | routing purity | prompt purity |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for folder in folders:
        logs = sorted(Path(folder).glob("seed*.log"))
        if not logs:
            sys.exit(f"error: {folder} has no seedN.log: run bash results/first_run.sh with OUT={folder}")
        runs = [read_run(log) for log in logs]
        for log, run in zip(logs, runs):
            lines.append(f"| --recipe {run['recipe']} | {log.stem.removeprefix('seed')} | {run['spt']:.3f} | "
                         f"{run['pt']:.3f} | {run['spt'] - run['pt']:+.3f} | {run['purity']:.2f} | {run['prompt_purity']:.2f} |")
        mean = {key: sum(run[key] for run in runs) / len(runs) for key in ("spt", "pt", "purity", "prompt_purity")}
        lines.append(f"| --recipe {runs[0]['recipe']} | mean | {mean['spt']:.3f} | {mean['pt']:.3f} | "
                     f"{mean['spt'] - mean['pt']:+.3f} | {mean['purity']:.2f} | {mean['prompt_purity']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    text = table(sys.argv[1:])
    (ROOT / "results" / "first_run" / "recipes.md").write_text(text)
    print(text, end="")
