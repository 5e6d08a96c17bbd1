"""
Evaluation of generated responses (paper 4.3, 5.2, 5.7): unigram F1, corpus BLEU-4, ROUGE-1/2/L,
DIST-1/2, BLEU overlap with the persona (Table 5), BERTScore F1/P/R on request, prompt usage by
conversation turn (Figure 2) and a Table-1-style report.

    python metrics.py predictions.jsonl [--plot usage.png] [--bertscore]
    python metrics.py --compare baseline.jsonl new.jsonl

A predictions file has one JSON record per line, as generate.py writes them:
{dialogue_id, turn, persona, context, reference, prediction, chosen_prompt, scores}.
All scores are on a 0-100 scale.
"""

import argparse
import itertools
import json
import os
import re
import string
import sys
from collections import Counter

from nltk.translate.bleu_score import corpus_bleu

# BERTScore as the authors computed it: bert_score's BERTScorer(model_type="microsoft/deberta-xlarge-mnli") and
# .score(preds, refs, batch_size=64) (hqsiswiliam/SPT, evaluate_runs_results.py lines 17 and 79), so its defaults
# hold: layer 40 (bert_score's model2layers for this model), no idf, no baseline rescaling.
BERTSCORE_MODEL = "microsoft/deberta-xlarge-mnli"  # the paper's choice (4.3)
BERTSCORE_LAYER = 40
BERTSCORE_MAX_TOKENS = 512  # what transformers 4.30 (the authors' env.yml) gave this model's tokenizer
BERTSCORE_INSTALL = "pip install -r requirements-bertscore.txt"

# -----------------------------------------------------------------------------
# unigram F1 (ParlAI's, the usual one for ConvAI2)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text):
    """Lower-case, punctuation to spaces, drop articles, single spaces (ParlAI: "i'm" -> "i m")."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def unigram_f1(prediction, reference):
    """Token F1 (0-1) of one prediction; 0 when nothing overlaps, so also when both are empty (as ParlAI)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    return 2 * common / (len(pred) + len(ref)) if common else 0.0  # = 2PR / (P + R)

# -----------------------------------------------------------------------------
# corpus BLEU-4 on mteval-v13a tokens (sacrebleu's default), computed by nltk

_13A_RULES = [
    (re.compile(r'([!"#$%&()*+/:;<=>?@\[\\\]^_`{|}~])'), r" \1 "),  # ASCII symbols except ' - . ,
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period, comma not preceded by a digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period, comma not followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]
_13A_ENTITIES = [("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")]


def tokenize_13a(text):
    """Split text as the mteval-v13a script does (the "13a" tokenizer of WMT and sacrebleu)."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _13A_ENTITIES:
        text = text.replace(entity, char)
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def _standard_bleu_precisions(hypotheses):
    """nltk smoothing hook that makes nltk's corpus_bleu equal the standard (sacrebleu) BLEU:
    nltk counts one phantom n-gram for every hypothesis shorter than n, removed here, and an order
    with no match gets 1 / (2^k * count), the NIST geometric smoothing (sacrebleu's default "exp")."""
    lengths = [len(h) for h in hypotheses]

    def smooth(p_n, *args, **kwargs):
        precisions, halvings = [], 1
        for n, p in enumerate(p_n, start=1):
            total = p.denominator - sum(length < n for length in lengths)
            if p.numerator == 0:
                halvings *= 2
                precisions.append(1 / (halvings * total))
            else:
                precisions.append(p.numerator / total)
        return precisions

    return smooth


def bleu(predictions, references):
    """Corpus BLEU-4 (0-100), one reference per prediction, case-sensitive, 13a tokens."""
    hypotheses = [tokenize_13a(p) for p in predictions]
    refs = [[tokenize_13a(r)] for r in references]
    if all(len(h) < 4 for h in hypotheses):
        return 0.0  # no 4-gram in the whole corpus: the standard BLEU-4 is 0
    return 100.0 * corpus_bleu(refs, hypotheses, smoothing_function=_standard_bleu_precisions(hypotheses))

# -----------------------------------------------------------------------------
# ROUGE-1/2/L F-measure (Lin 2004), tokenised like the rouge_score package, no stemming

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text):
    """Lower-case; every run of characters other than ASCII a-z, 0-9 separates tokens."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(pred_tokens, ref_tokens, n):
    """ROUGE-N F-measure (0-1): 2 * overlap / (pred n-grams + ref n-grams)."""
    pred, ref = _ngrams(pred_tokens, n), _ngrams(ref_tokens, n)
    overlap = sum((pred & ref).values())
    return 2 * overlap / (sum(pred.values()) + sum(ref.values())) if overlap else 0.0


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists, one DP row at a time."""
    row = [0] * (len(b) + 1)  # row[j] = LCS of the prefix of a seen so far and b[:j]
    for x in a:
        diagonal = 0  # the previous row's row[j - 1]
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(pred_tokens, ref_tokens):
    """ROUGE-L F-measure (0-1): 2 * LCS / (len(pred) + len(ref))."""
    lcs = lcs_length(pred_tokens, ref_tokens)
    return 2 * lcs / (len(pred_tokens) + len(ref_tokens)) if lcs else 0.0

# -----------------------------------------------------------------------------
# diversity


def distinct_n(predictions, n):
    """DIST-n (0-100): distinct n-grams / all n-grams over all predictions; n-grams never cross two
    predictions; tokens are whitespace-separated after lower-casing (punctuation stays attached)."""
    counts = Counter()
    for p in predictions:
        counts.update(_ngrams(p.lower().split(), n))
    total = sum(counts.values())
    return 100.0 * len(counts) / total if total else 0.0

# -----------------------------------------------------------------------------
# BERTScore (Table 1's BERT F1 / P / R), with the bert_score package


def bert_scores(predictions, references):
    """BERTScore F1/P/R (0-100) with BERTSCORE_MODEL, downloaded into the Hugging Face cache on first use
    (llm_loader.hub_folder: a progress bar; a local folder is taken as it is), at BERTSCORE_LAYER, no idf, no
    baseline rescaling. When it cannot be computed: bertscore None and a one-line bertscore_note saying what to run.

    bert-score 0.3.13 (its last release) fails under transformers 5 in two ways, mended here so that the scores
    are those it gives under transformers 4: it truncates at the tokenizer's model_max_length, which for a tokenizer
    config without one (deberta-xlarge-mnli's) is the placeholder 10^30, an OverflowError in transformers 5's
    tokenizers (capped at BERTSCORE_MAX_TOKENS); and it encodes an empty sentence with a tokenizer method
    transformers 5 dropped (bert_score scores a pair with an empty side 0, so such pairs get 0 unencoded).
    """
    try:
        import bert_score
        import huggingface_hub
        from llm_loader import hub_folder  # here: it imports torch, which the other metrics do without
    except ImportError:
        return {"bertscore": None, "bertscore_note": f"bert_score is not installed: {BERTSCORE_INSTALL}"}
    try:
        folder = BERTSCORE_MODEL if os.path.isdir(BERTSCORE_MODEL) else str(hub_folder(BERTSCORE_MODEL))
    except OSError as e:  # not cached, and offline or the download failed
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if huggingface_hub.constants.HF_HUB_OFFLINE
               else f"downloading it failed ({str(e).split('; ')[0]})")
        note = (f"{BERTSCORE_MODEL} is not in the Hugging Face cache and {why}: run "
                f"`python metrics.py --bertscore PREDICTIONS.jsonl` once with network access (HF_HUB_OFFLINE unset)")
        return {"bertscore": None, "bertscore_note": note}
    scorer = bert_score.BERTScorer(model_type=folder, num_layers=BERTSCORE_LAYER)
    scorer._tokenizer.model_max_length = min(  # the tokenizer bert_score encodes with (bert-score is pinned)
scorer._tokenizer.model_max_length, BERTSCORE_MAX_TOKENS)
    both = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    sums = [0.0, 0.0, 0.0]  # P, R, F summed over the pairs; 0 for a pair with an empty side
    if both:
        scores = scorer.score([predictions[i] for i in both], [references[i] for i in both], batch_size=64)
        sums = [s.sum().item() for s in scores]
    n = len(predictions)
    return {"bertscore": 100.0 * sums[2] / n, "bertscore_precision": 100.0 * sums[0] / n,
            "bertscore_recall": 100.0 * sums[1] / n}

# -----------------------------------------------------------------------------
# all together


def persona_text(persona):
    """A persona as one string: its sentences joined by spaces (a str is taken as it is)."""
    return persona if isinstance(persona, str) else " ".join(persona)


def compute_metrics(predictions, references, personas=None, bertscore=False):
    """Table 1 metrics of the predictions against the references, the Table 5 BLEU of the predictions
    against their persona text when personas (list[str] or str per example) are given, and BERTScore
    when bertscore is True (else a bertscore_note saying how to ask for it)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; give one reference each")
    if not predictions:
        raise ValueError("no predictions to score")
    n = len(predictions)
    pred_tokens = [rouge_tokens(p) for p in predictions]
    ref_tokens = [rouge_tokens(r) for r in references]
    out = {
        "f1": 100.0 * sum(unigram_f1(p, r) for p, r in zip(predictions, references)) / n,
        "bleu": bleu(predictions, references),
        "rouge1": 100.0 * sum(rouge_n(p, r, 1) for p, r in zip(pred_tokens, ref_tokens)) / n,
        "rouge2": 100.0 * sum(rouge_n(p, r, 2) for p, r in zip(pred_tokens, ref_tokens)) / n,
        "rougeL": 100.0 * sum(rouge_l(p, r) for p, r in zip(pred_tokens, ref_tokens)) / n,
        "dist1": distinct_n(predictions, 1),
        "dist2": distinct_n(predictions, 2),
    }
    if personas is not None:
        if len(personas) != n:
            raise ValueError(f"{len(personas)} personas for {n} predictions; give one persona each")
        out["persona_bleu"] = bleu(predictions, [persona_text(p) for p in personas])
    out.update(bert_scores(predictions, references) if bertscore else
               {"bertscore": None, "bertscore_note": f"pass --bertscore to score with {BERTSCORE_MODEL} "
                                                     "(3 GB, downloaded into the Hugging Face cache once)"})
    return out

# -----------------------------------------------------------------------------
# prompt usage by conversation turn (Figure 2)


def prompt_usage_by_turn(turns, chosen_prompts, k):
    """How often each of the k soft prompts was chosen at each turn (the paper's Figure 2):
    {turn: [count_0, ..., count_k-1]}, turns ascending (only the turns that occur)."""
    if len(turns) != len(chosen_prompts):
        raise ValueError(f"{len(turns)} turns but {len(chosen_prompts)} chosen prompts; give one per example")
    table = {}
    for turn, i in zip(turns, chosen_prompts):
        if not 0 <= i < k:
            raise ValueError(f"chosen prompt {i} is outside 0..{k - 1}; pass the K the model was trained with")
        table.setdefault(turn, [0] * k)[i] += 1
    return dict(sorted(table.items()))


def routing_purity(kinds, chosen_prompts):
    """How cleanly a retriever routes contexts of known kinds: (purity, {kind: share}, {kind: prompt}).

    Each kind is given a prompt of its own, the one-to-one map that keeps the most contexts on their
    kind's prompt (all maps tried; kinds without a prompt left map to None); purity is the share of all
    contexts on their kind's prompt, share[kind] that share within one kind. 1 when every kind has a
    prompt to itself; the largest kind's share of the contexts when every context goes to one prompt.
    """
    if len(kinds) != len(chosen_prompts):
        raise ValueError(f"{len(kinds)} kinds but {len(chosen_prompts)} chosen prompts; give one per example")
    names = sorted(set(kinds))
    counts = {(kind, prompt): 0 for kind in names for prompt in set(chosen_prompts)}
    for kind, prompt in zip(kinds, chosen_prompts):
        counts[kind, prompt] += 1
    prompts = sorted(set(chosen_prompts)) + [None] * len(names)  # None: a kind left without a prompt
    best = max(itertools.permutations(prompts, len(names)),
               key=lambda m: sum(counts.get((kind, prompt), 0) for kind, prompt in zip(names, m)))
    assignment = dict(zip(names, best))
    share = {kind: counts.get((kind, assignment[kind]), 0) / kinds.count(kind) for kind in names}
    return sum(counts.get((k, assignment[k]), 0) for k in names) / len(kinds), share, assignment


def format_prompt_usage(table):
    """The usage table as text: one row per turn, one column per prompt, with row and column totals."""
    k = len(next(iter(table.values())))
    width = max(6, len(str(sum(map(sum, table.values())))) + 1)

    def cell(x):
        return f"{x:>{width}}"

    lines = ["turn" + "".join(cell(f"sp{i}") for i in range(k)) + cell("total")]
    for turn, counts in table.items():
        lines.append(f"{turn:>4}" + "".join(cell(c) for c in counts) + cell(sum(counts)))
    totals = [sum(col) for col in zip(*table.values())]
    lines.append("all " + "".join(cell(c) for c in totals) + cell(sum(totals)))
    return "\n".join(lines)


def plot_prompt_usage(table, path):
    """Figure 2 as a PNG (times each prompt is chosen vs turn). Returns what happened, as a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return f"matplotlib is not installed, {path} not written (pip install matplotlib)"
    turns = list(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, counts in enumerate(zip(*table.values())):
        ax.plot(turns, counts, marker="o", label=f"sp{i}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("conversation turn")
    ax.set_ylabel("times chosen")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"

# -----------------------------------------------------------------------------
# Table-1-style report

COLUMNS = [("F1", "f1"), ("BLEU", "bleu"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"),
           ("DIST-1", "dist1"), ("DIST-2", "dist2"), ("persona-BLEU", "persona_bleu"), ("BERT-F1", "bertscore"),
           ("BERT-P", "bertscore_precision"), ("BERT-R", "bertscore_recall")]
# Table 1's AVG: mean relative change over its metrics; persona-BLEU (Table 5, lower = less parroting) is out
AVG_KEYS = ["f1", "bleu", "rouge1", "rouge2", "rougeL", "bertscore", "bertscore_precision", "bertscore_recall",
            "dist1", "dist2"]


def _cells(values, name, name_width):
    """A report line: the name left-aligned, then each value right-aligned under its column header."""
    headers = [h for h, _ in COLUMNS] + ["AVG"]
    return f"{name:<{name_width}}" + "".join(f" {v:>{max(8, len(h))}}" for v, h in zip(values, headers))


def table_header(name_width=12):
    return _cells([h for h, _ in COLUMNS] + ["AVG"], "model", name_width)


def table_row(metrics, name="", name_width=12, avg=None):
    """One Table-1-style line: the metrics to 2 decimals, '-' where absent, AVG (in %) when given."""
    values = [f"{metrics[key]:.2f}" if metrics.get(key) is not None else "-" for _, key in COLUMNS]
    return _cells(values + ["-" if avg is None else f"{avg:+.2f}%"], name, name_width)


def relative_change(base, new):
    """Per metric (new - base) / base in %; None where a value is missing or the base is 0."""
    change = {}
    for key in dict.fromkeys([key for _, key in COLUMNS] + AVG_KEYS):
        a, b = base.get(key), new.get(key)
        change[key] = None if a is None or b is None or a == 0 else 100.0 * (b - a) / a
    return change


def average_improvement(base, new):
    """Table 1's AVG: the mean relative change (%) over the AVG_KEYS both results have."""
    change = relative_change(base, new)
    values = [change[key] for key in AVG_KEYS if change.get(key) is not None]
    if not values:
        raise ValueError("no metric is present (and non-zero) in both results; nothing to average")
    return sum(values) / len(values)


def change_row(base, new, name="change", name_width=12):
    """The relative change per metric as a Table-1-style line, AVG at the end."""
    values = [f"{v:+.2f}%" if v is not None else "-" for v in (relative_change(base, new)[key] for _, key in COLUMNS)]
    return _cells(values + [f"{average_improvement(base, new):+.2f}%"], name, name_width)

# -----------------------------------------------------------------------------
# predictions files and the command line


def _record_problem(record):
    """What is wrong with one predictions record, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in ("prediction", "reference"):
        if not isinstance(record.get(key), str):
            return f"'{key}' must be a string (got {record.get(key)!r})"
    persona = record.get("persona")
    sentences = persona if isinstance(persona, list) else [persona]
    if persona is not None and not all(isinstance(p, str) for p in sentences):
        return f"'persona' must be a string or a list of strings (got {persona!r})"
    if record.get("chosen_prompt") is not None:
        if not isinstance(record["chosen_prompt"], int):
            return f"'chosen_prompt' must be an integer prompt index (got {record['chosen_prompt']!r})"
        if not isinstance(record.get("turn"), int):
            return f"a record with a chosen_prompt needs an integer 'turn' (got {record.get('turn')!r})"
    return None


def read_predictions(path):
    """The records of a predictions JSONL file; a ValueError names the file and line of any bad record."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg}); one JSON object per line") from None
            problem = _record_problem(record)
            if problem:
                raise ValueError(f"{path} line {line_no}: {problem}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records; expected one JSON object per line")
    return records


def metrics_of_records(records, bertscore=False):
    """compute_metrics on the records; persona-BLEU when every record has a persona."""
    personas = [r["persona"] for r in records] if all(r.get("persona") for r in records) else None
    return compute_metrics([r["prediction"] for r in records], [r["reference"] for r in records], personas, bertscore)


def usage_of_records(records, k=None):
    """The prompt usage table of the records (k prompts; default: how many scores a record has), or None
    when they carry no chosen_prompt (no retriever)."""
    if any(r.get("chosen_prompt") is None for r in records):
        return None
    chosen = [r["chosen_prompt"] for r in records]
    k = k or (len(records[0]["scores"]) if records[0].get("scores") else max(chosen) + 1)  # scores: one per prompt
    return prompt_usage_by_turn([r["turn"] for r in records], chosen, k)


def report(records, k=None, name="predictions", bertscore=False):
    """What `python metrics.py FILE` prints: the Table-1-style row, the prompt usage by turn when the
    records carry chosen_prompt (see usage_of_records for k), and why BERTScore is missing if it is."""
    result = metrics_of_records(records, bertscore)
    width = max(len(name), 5) + 2
    lines = [table_header(width), table_row(result, name, width)]
    table = usage_of_records(records, k)
    if table is not None:
        lines += ["", f"prompt usage by turn ({len(records)} responses)", format_prompt_usage(table)]
    if result.get("bertscore_note"):
        lines.append(f"BERTScore not computed: {result['bertscore_note']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score a predictions JSONL (Table 1 metrics, prompt usage).")
    parser.add_argument("predictions", nargs="?", help="predictions JSONL written by generate.py")
    parser.add_argument("--compare", nargs=2, metavar=("BASE", "NEW"), help="two predictions files: rows and change")
    parser.add_argument("--plot", metavar="FILE.png", help="write the prompt usage by turn plot (Figure 2)")
    parser.add_argument("--bertscore", action="store_true",
                        help=f"add BERTScore F1/P/R with {BERTSCORE_MODEL} (needs {BERTSCORE_INSTALL}; "
                             "downloads the model into the Hugging Face cache on first use)")
    args = parser.parse_args(argv)
    if (args.predictions is None) == (args.compare is None):
        parser.error("give either one predictions file or --compare BASE NEW")
    if args.compare and args.plot:
        parser.error("--plot works with a single predictions file")
    try:
        if args.compare:
            base_path, new_path = args.compare
            base, new = (metrics_of_records(read_predictions(p), args.bertscore) for p in args.compare)
            names = [base_path, new_path, "change"]
            width = max(map(len, names)) + 2
            print(table_header(width))
            print(table_row(base, names[0], width))
            print(table_row(new, names[1], width, avg=average_improvement(base, new)))
            print(change_row(base, new, names[2], width))
            for note in {m.get("bertscore_note") for m in (base, new)} - {None}:
                print(f"BERTScore not computed: {note}")
        else:
            records = read_predictions(args.predictions)
            print(report(records, name=os.path.basename(args.predictions), bertscore=args.bertscore))
            if args.plot:
                table = usage_of_records(records)
                if table is None:
                    raise ValueError(f"{args.predictions} has no chosen_prompt in every record; nothing to plot")
                print(plot_prompt_usage(table, args.plot))
    except (OSError, ValueError) as e:
        sys.exit(f"metrics.py: {e}")


if __name__ == "__main__":
    main()
