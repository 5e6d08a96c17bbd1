"""Benchmark SPT training and decoding against a transformers + peft reference on the same frozen LLM.

    python bench.py --quick                   # tiny random Llama, under a minute on an idle machine
    python bench.py --model smollm2           # SmolLM2-135M, about 9 minutes on 2 CPU cores
    python bench.py --model smollm2 --parts decode --json runs/decode.json

Both sides get the same weights (a transformers LlamaForCausalLM loaded with our state dict, whose
names are Hugging Face's), the same batches (a seeded selection of ConvAI2 examples, or the demo set),
the same initial soft prompts and retriever, and the same dtype: --dtype, 'auto' resolved once as train.py
resolves it (bf16 weights run under autocast on both sides; soft prompts, retriever and losses float32).

Training step (forward + backward; the optimizer step is excluded on both sides):
  ours       train.step_loss: one forward of the K*B prompted sequences, split only into groups of
             similar length, LM head at target positions only, no weight gradients.
  reference  the way the paper's public code runs SPT: K peft prompt-tuning adapters on one frozen
             model, one forward per prompt (set_adapter) over the batch padded to its longest example,
             full logits (B, L+T, V), log-softmax, then the same four losses (losses.total_loss) on
             the gathered target log-probabilities; the retriever (Eq. 1) scores the adapters' prompts.
  Before any timing, both sides' total loss on the first batch must agree within 1e-4 and the
  gradients of the soft prompts and the retriever within 1e-4 (relative, for gradients above 1),
  in float32 (bf16 rounding would hide a real difference), or the script exits with an error. Each side is then timed in a fresh process (one warm-up step, --steps timed),
  whose peak memory above the loaded model is its peak RSS (Linux VmHWM, reset after loading) or,
  on CUDA, torch.cuda.max_memory_allocated.
Decoding: greedy, KV cache, a batch of contexts with their retriever-chosen prompts, exactly
  --new-tokens tokens on both sides (no EOS stop): our model loop (the calls generate.generate makes)
  versus transformers' generate(inputs_embeds=..., eos_token_id=None); each side in a fresh process,
  the median of --decode-repeats runs after a warm-up.
Efficiency: useful FLOPs of the training step (train_step_flops) per second, as a percentage of the
  matmul rate in the same dtype measured in the same run.
Host syncs: calls that make the host wait for a CUDA device (SyncCounter), per micro-batch of train.py's
  own loop (train.train, 4 steps of --batch-size on --model), counted on CPU.
"""
import argparse
import collections
import copy
import ctypes
import gc
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
import transformers
from torch.overrides import TorchFunctionMode
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

import data
import losses
import train
from generate import decode_steps, insert_prompts, select_prompts
from llm_loader import load_llm
from retriever import SPT

CONVAI2_VALID = Path(__file__).resolve().parent.parent / "shared" / "data" / "convai2" / "valid_self_original_no_cands.txt"
LOSS_ARGS = train.parse_args([])  # train.py's defaults: the paper recipe, all lambdas 1, tau_g 1, Gamma 20, no noise
TOLERANCE = 1e-4
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a deprecated transformers API


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', a Llama Hugging Face folder or .gguf file, or 'tiny'")
    p.add_argument("--quick", action="store_true", help="the tiny random Llama (same as --model tiny)")
    p.add_argument("--data", default=str(CONVAI2_VALID), help="ConvAI2 *_self_original_no_cands.txt, or 'demo' (also used when the file is absent)")
    p.add_argument("--parts", default="train,decode", help="comma-separated: train (with efficiency), decode")
    p.add_argument("--num-prompts", "-K", type=int, default=4, help="K soft prompts")
    p.add_argument("--prompt-len", "-L", type=int, default=1, help="L virtual tokens per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="examples per training step and contexts per decode")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per side (after one warm-up step)")
    p.add_argument("--max-len", type=int, default=512, help="text tokens per example (train.py's default)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per context")
    p.add_argument("--decode-repeats", type=int, default=5, help="timed decodes per side (after one warm-up)")
    p.add_argument("--seed", type=int, default=0, help="seeds the example selection and the soft prompts")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="both sides' LLM weights and autocast; 'auto' picks as train.py does (for decoding: as generate.py does "
                        "for --batch-size rows)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of both sides")
    p.add_argument("--json", default="runs/bench.json", help="where to write the numbers (runs/ is git-ignored)")
    args = p.parse_args(argv)
    if args.quick:
        args.model = "tiny"
    args.parts = set(args.parts.split(","))
    if not args.parts <= {"train", "decode"}:
        p.error(f"--parts takes train and/or decode, got {','.join(sorted(args.parts))}")
    if min(args.steps, args.decode_repeats, args.new_tokens, args.batch_size, args.num_prompts, args.prompt_len) < 1:
        p.error("--steps, --decode-repeats, --new-tokens, --batch-size, --num-prompts and --prompt-len must be at least 1")
    return args


# ----------------------------------------------------------------------------- shared setup

def hf_llama(llm):
    """transformers' LlamaForCausalLM (SDPA attention) holding llm's weights, frozen, on llm's device."""
    c = llm.config
    if c.arch != "llama":
        raise ValueError(f"bench.py compares Llama models only; {c.arch!r} needs another transformers class: "
                         "pass --model smollm2, tiny, or a Llama checkpoint")
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias,
        mlp_bias=c.mlp_bias, attn_implementation="sdpa")
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(llm.state_dict())
    return hf.to(llm.lm_head.weight.device, llm.dtype).eval().requires_grad_(False)


def bench_batches(tok, args, device):
    """steps + 1 batches of a seeded selection of examples (the first is the warm-up and the loss check)."""
    spec = args.data
    if spec != "demo" and not Path(spec).exists():
        print(f"no ConvAI2 file at {spec}: benchmarking on the built-in demo set (pass --data FILE)")
        spec = "demo"
    examples = data.load_examples(spec)
    count, rng = (args.steps + 1) * args.batch_size, random.Random(args.seed)
    chosen = rng.sample(examples, count) if count <= len(examples) else rng.choices(examples, k=count)
    encoded = [data.encode_example(ex, tok, args.max_len) for ex in chosen]
    return [data.collate(encoded[i:i + args.batch_size], tok.pad_id).to(device) for i in range(0, count, args.batch_size)]


def make_spt(args, embed_dim, device):
    """The soft prompt group and retriever both sides start from (standard Gaussian prompts, seeded)."""
    torch.manual_seed(args.seed)
    return SPT(args.num_prompts, args.prompt_len, embed_dim).to(device)


def peft_prompts(hf, spt):
    """One PeftModel with K prompt-tuning adapters 'prompt_0'.. whose (L, E) prompts are spt's initial prompts."""
    K, L, E = spt.soft_prompts.shape

    def prompt_config():
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L, token_dim=E, num_transformer_submodules=1,
                                       num_attention_heads=hf.config.num_attention_heads, num_layers=hf.config.num_hidden_layers)

    model = peft.get_peft_model(hf, prompt_config(), adapter_name="prompt_0")
    for k in range(1, K):
        model.add_adapter(f"prompt_{k}", prompt_config())
    with torch.no_grad():
        for k in range(K):
            model.prompt_encoder[f"prompt_{k}"].embedding.weight.copy_(spt.soft_prompts[k])
    return model


def adapter_prompts(peft_model):
    """The adapters' prompt parameters stacked -> (K, L, E), differentiable."""
    return torch.stack([encoder.embedding.weight for encoder in peft_model.prompt_encoder.values()])


# ----------------------------------------------------------------------------- the two training steps

def ours_loss(llm, spt, batch):
    """Eq. 6 for one batch with train.step_loss (one grouped forward of K*B sequences)."""
    return train.step_loss(llm, spt, batch, LOSS_ARGS, world=1)[:2]


def reference_loss(peft_model, retriever, batch):
    """Eq. 6 for one batch the peft way: K adapter forwards, full logits, the same losses.

    retriever is an SPT whose linear layers score the adapters' prompts (its own soft_prompts are unused).
    """
    L = peft_model.active_peft_config.num_virtual_tokens
    context_embeds = peft_model.get_input_embeddings()(batch.context_ids)  # (B, Tc, E)
    _, scores = torch.func.functional_call(retriever, {"soft_prompts": adapter_prompts(peft_model)},
                                           (context_embeds, batch.context_mask))  # (B, K)
    per_prompt = []
    for name in peft_model.prompt_encoder:
        peft_model.set_adapter(name)
        with reference_autocast(peft_model):
            logits = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, L+T, V)
        logprobs = F.log_softmax(logits[:, L - 1:-1].float(), dim=-1)  # (B, T, V): position L+t-1 predicts token t
        target = logprobs.gather(-1, batch.input_ids[..., None]).squeeze(-1)  # (B, T)
        per_prompt.append(target.masked_fill(~batch.target_mask, 0.0))
    target_logprobs = torch.stack(per_prompt, dim=1)  # (B, K, T)
    return losses.total_loss(target_logprobs, batch.target_mask, scores, losses.bleu_matrix(batch.context_texts),
                             tau_g=LOSS_ARGS.tau_g, threshold=LOSS_ARGS.gamma)


def reference_autocast(hf):
    """The reference's mixed precision, as ours: autocast to its weights' dtype (a no-op in float32)."""
    weight = hf.get_input_embeddings().weight
    return torch.autocast(weight.device.type, dtype=weight.dtype, enabled=weight.dtype != torch.float32)


def check_agreement(llm, hf, args, batch):
    """Total loss, its parts and the gradients of both sides on one batch; result["agree"] says whether they match."""
    spt = make_spt(args, llm.embed_dim, batch.input_ids.device)
    ref_retriever = copy.deepcopy(spt)
    peft_model = peft_prompts(hf, spt)
    ours_total, ours_parts = ours_loss(llm, spt, batch)
    ours_total.backward()
    ref_total, ref_parts = reference_loss(peft_model, ref_retriever, batch)
    ref_total.backward()
    ref_prompt_grad = torch.stack([encoder.embedding.weight.grad for encoder in peft_model.prompt_encoder.values()])
    grads = {"soft_prompts": (spt.soft_prompts.grad, ref_prompt_grad)}
    grads.update({name: (p.grad, ref_retriever.get_parameter(name).grad) for name, p in spt.named_parameters() if name != "soft_prompts"})
    result = {
        "loss_ours": ours_total.item(), "loss_reference": ref_total.item(),
        "loss_abs_diff": abs(ours_total.item() - ref_total.item()),
        "parts_abs_diff": {k: abs(ours_parts[k].item() - ref_parts[k].item()) for k in ours_parts},
        "grad_max_abs_diff": {name: (a - b).abs().max().item() for name, (a, b) in grads.items()},
        "grad_max_abs": {name: a.abs().max().item() for name, (a, _) in grads.items()},
    }
    bad_grads = [name for name, diff in result["grad_max_abs_diff"].items() if diff > TOLERANCE * max(1.0, result["grad_max_abs"][name])]
    result["agree"] = result["loss_abs_diff"] <= TOLERANCE and not bad_grads
    return result


def load_in_child(args):
    """What each fresh process starts with: the thread count, then the model, its tokenizer, the batches and the device."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    llm, tok = load_llm(args.model, device=device, dtype=getattr(torch, args.dtype))  # resolved by main()
    return llm, tok, bench_batches(tok, args, device), device


def agreement_side(args):
    """check_agreement on the first batch, in a fresh process: its autograd graphs hold gigabytes
    that the allocator would keep in this process's memory while the timed children run. Always in
    float32: the check is that both sides compute the same thing, which bf16 rounding would blur."""
    llm, _, batches, _ = load_in_child(argparse.Namespace(**{**vars(args), "dtype": "float32"}))
    return check_agreement(llm, hf_llama(llm), args, batches[0])


# ----------------------------------------------------------------------------- timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_baseline(device):
    """Reset the peak-memory counter; return the memory in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reused pages count as new use
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM, the peak RSS, to the current RSS
    except OSError as e:
        raise RuntimeError(f"cannot reset the peak RSS ({e}): CPU memory is measured with Linux /proc; "
                           "run bench.py on Linux or with --device cuda") from e
    return proc_status_kb("VmRSS") * 1024


def memory_peak(device):
    """Peak memory (bytes) since memory_baseline."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_kb("VmHWM") * 1024


def proc_status_kb(field):
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def train_side(side, args):
    """One side's training steps in this (fresh) process: step times (s) and peak memory above the loaded model (MB)."""
    llm, tok, batches, device = load_in_child(args)
    spt = make_spt(args, llm.embed_dim, device)
    if side == "ours":
        step, params = partial(ours_loss, llm, spt), list(spt.parameters())
    else:
        peft_model = peft_prompts(hf_llama(llm), spt)
        del llm
        step = partial(reference_loss, peft_model, spt)
        params = [p for p in [*peft_model.parameters(), *spt.parameters()] if p.requires_grad]
    baseline = memory_baseline(device)
    times = []
    for batch in batches:
        sync(device)
        start = time.perf_counter()
        step(batch)[0].backward()
        sync(device)
        times.append(time.perf_counter() - start)
        for p in params:
            p.grad = None
    return {"times": times[1:], "warmup": times[0], "peak_mb": (memory_peak(device) - baseline) / 2**20}


def run_in_fresh_process(function, *args):
    """function(*args) in a spawned child, so each side's peak memory is its own and none stays behind."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


# ----------------------------------------------------------------------------- host syncs

SYNC_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__index__, torch.Tensor.__format__, torch.Tensor.numpy, torch.Tensor.cpu}
SYNC_SHAPES = {torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.masked_select,
               torch.Tensor.masked_select, torch.bincount, torch.Tensor.bincount, torch.unique, torch.Tensor.unique,
               torch.unique_consecutive, torch.repeat_interleave, torch.Tensor.repeat_interleave}
PROJECT = Path(__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
OVERRIDES = torch.overrides.__file__


class SyncCounter(TorchFunctionMode):
    """Counts the calls of the project's code that make the host wait for a CUDA device, on any device.

    Such a call reads a tensor's values on the host (SYNC_READS: .item(), .tolist(), int(), float(), bool(),
    f-strings, .cpu()) or makes a tensor whose size depends on values (SYNC_SHAPES: nonzero, bincount,
    masked_select, ..., and indexing with a boolean tensor). Counted are only calls made from this
    project's files (not PyTorch's own, e.g. Adam reading its step count, which lives on the host) and
    none made inside the functions in `host` (work on host tensors by design). Copies between host and
    device cannot be seen on CPU, where every tensor is a host tensor. sites: (file:line function) of each.
    """

    def __init__(self, host=()):
        super().__init__()
        self.host = {f.__code__ for f in host}
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNC_READS or func in SYNC_SHAPES or (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__)
                                                           and boolean_index(args[1])):
            site = self.project_caller()
            if site:
                self.sites.append(f"{site} {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))

    def project_caller(self):
        """'file:line' of the project code that made the current call, or None (PyTorch's own call, or host work).

        A call of a Python-level torch function (F.normalize, Tensor.__format__) arrives through
        torch/overrides.py and that function's own frame; a C function's (.item()) comes straight from its caller.
        """
        frame = sys._getframe(2)
        if frame.f_code.co_filename == OVERRIDES:
            while frame.f_code.co_filename == OVERRIDES:
                frame = frame.f_back
            frame = frame.f_back
        path = Path(frame.f_code.co_filename).resolve()
        if not path.is_relative_to(PROJECT) or path.is_relative_to(TORCH):
            return None
        site = f"{path.name}:{frame.f_lineno}"
        while frame is not None:
            if frame.f_code in self.host:
                return None
            frame = frame.f_back
        return site


def boolean_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def count_step_syncs(args):
    """Host syncs per micro-batch of train.py's own loop, on args' model and data, B = args.batch_size.

    train.train runs 4 steps (logging at steps 1 and 4 only) under a SyncCounter; the calls are split
    at each step_loss call. Returns {"plain": sites of step 2 (no log line), "logging": sites of step 1}.
    The data pipeline (train.micro_batches: collate, shard, and what the step needs from the CPU batch)
    runs on the host by design and is not counted.
    """
    torch.set_num_threads(args.threads)
    counter, marks = SyncCounter(host=[train.micro_batches]), []
    step_loss = train.step_loss

    def marking_step_loss(*a, **k):
        marks.append(len(counter.sites))
        return step_loss(*a, **k)

    spec = args.data if args.data == "demo" or Path(args.data).exists() else "demo"
    with tempfile.TemporaryDirectory() as out:
        flags = ["--model", args.model, "--data", spec, "--max-examples", str(5 * args.batch_size), "--batch-size",
                 str(args.batch_size), "-K", str(args.num_prompts), "-L", str(args.prompt_len), "--max-len", str(args.max_len),
                 "--max-steps", "4", "--log-every", "1000", "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed),
                 "--out", out]
        train.step_loss = marking_step_loss
        try:
            with open(os.devnull, "w") as quiet, redirect_stdout(quiet), counter:
                train.train(train.parse_args(flags))
        finally:
            train.step_loss = step_loss
    return {"logging": counter.sites[marks[0]:marks[1]], "plain": counter.sites[marks[1]:marks[2]]}


# ----------------------------------------------------------------------------- efficiency

def train_step_flops(config, batch, num_prompts, prompt_len):
    """Useful floating-point operations of one SPT training step, forward + backward.

    Counted per prompted sequence (K per example, n = L + its real tokens), no padding:
      matmuls   2 P n forward + 2 P n backward (input gradients only; the LLM's weights get none),
                P = non-embedding matmul parameters = layers x (q, k, v, o, gate, up, down);
      attention a query at position i (1-based) does 4 i d (QK^T and AV, d = heads x head_dim):
                2 d n (n + 1) per layer forward (causal), twice that backward (dQ, dK, dV, dP);
      LM head   at target tokens only: 2 V E forward + 2 V E backward (to the hidden state) per target.
    Norms, activations, rotary, softmax and the retriever are left out (well under 1%).
    """
    c = config
    d = c.num_heads * c.head_dim
    attn = c.hidden_size * d * 2 + c.hidden_size * c.num_kv_heads * c.head_dim * 2  # q, o, k, v
    P = c.num_layers * (attn + 3 * c.hidden_size * c.intermediate_size)
    n = batch.attention_mask.sum(1).double() + prompt_len  # (B,) prompted sequence lengths
    per_sequence = 4 * P * n + 3 * c.num_layers * 2 * d * n * (n + 1)  # (B,)
    lm_head = 4 * c.vocab_size * c.word_embed_proj_dim * batch.target_mask.sum().item()
    return num_prompts * (per_sequence.sum().item() + lm_head)


def matmul_gflops(device, dtype=torch.float32, size=4096, repeats=3):
    """Best rate (GFLOP/s) of a (size x size) @ (size x size) matmul in dtype on this machine now."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ----------------------------------------------------------------------------- decoding

def greedy_ours(llm, embeds, mask, new_tokens):
    """generate.py's KV-cache loop for exactly new_tokens tokens -> (B, new_tokens).

    generate() also decodes each row's text every step and stops at EOS or a speaker marker; here
    nothing stops, so both sides produce the same number of tokens.
    """
    return torch.stack(list(decode_steps(llm, embeds, mask, new_tokens)), dim=1)


@torch.no_grad()
def greedy_reference(hf, embeds, mask, new_tokens, pad_id):
    """transformers' greedy generate with its KV cache on the same embeddings; no EOS -> (B, new_tokens)."""
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=pad_id)
    with reference_autocast(hf):
        return hf.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)


def decode_side(side, args):
    """One side's greedy decoding in this (fresh) process: times (s) of --decode-repeats runs after a
    warm-up, and the tokens (B, new_tokens) as lists. The batch's contexts each get their
    retriever-chosen prompt (Eq. 7), laid out as generate() lays them out."""
    llm, tok, batches, device = load_in_child(args)
    batch = batches[0]
    spt = make_spt(args, llm.embed_dim, device)
    encoded = [data.encode_example(ex, tok, args.max_len) for ex in batch.examples]
    ids, mask = (t.to(device) for t in data.left_pad_prompts(encoded, tok.pad_id))  # (B, T) left-padded
    chosen, _ = select_prompts(llm, spt, ids, mask)
    with torch.no_grad():  # generate()'s layout: left padding, then each row's prompt and context
        embeds, mask = insert_prompts(spt.soft_prompts[chosen], llm.embed(ids), mask)  # (B, L+T, E), (B, L+T)
    if side == "ours":
        run = partial(greedy_ours, llm, embeds, mask, args.new_tokens)
    else:
        hf = hf_llama(llm)
        del llm
        run = partial(greedy_reference, hf, embeds, mask, args.new_tokens, tok.pad_id)
    run()  # warm-up
    times = []
    for _ in range(args.decode_repeats):
        sync(device)
        start = time.perf_counter()
        tokens = run()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"times": times, "tokens_per_s": tokens.numel() / statistics.median(times), "tokens": tokens.tolist()}


def bench_decode(args):
    """Both sides' decoding, each in a fresh process, and the share of greedy tokens they agree on."""
    result = {side: run_in_fresh_process(decode_side, side, args) for side in ("ours", "reference")}
    ours, reference = (torch.tensor(result[side].pop("tokens")) for side in ("ours", "reference"))
    if ours.shape != reference.shape:
        sys.exit(f"error: ours produced {tuple(ours.shape)} tokens, the reference {tuple(reference.shape)}; "
                 "fix greedy_reference in bench.py")
    result["tokens_equal"] = (ours == reference).double().mean().item()
    return result


# ----------------------------------------------------------------------------- report

def markdown_table(rows):
    """rows: (label, ours, reference) -> a Markdown table with an ours/reference column."""
    def fmt(x):
        return "" if x is None else f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"

    lines = ["| | ours | reference | ours / reference |", "| --- | ---: | ---: | ---: |"]
    for label, ours, ref in rows:
        ratio = ours / ref if ours is not None and ref else None
        lines.append(f"| {label} | {fmt(ours)} | {fmt(ref)} | {fmt(ratio)} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    print("$ " + shlex.join(["python", *sys.argv]))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    llm, tok = load_llm(args.model, device=device)
    hf_llama(llm)  # refuses a non-Llama model before any work
    batches = bench_batches(tok, args, device)
    c = llm.config
    dtypes = {part: train.resolve_dtype(args.dtype, device, c, rows) for part, rows in (("train", 256), ("decode", args.batch_size))}
    print(f"model {args.model} ({sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M, {c.num_layers} layers, "
          f"hidden {c.hidden_size}, vocab {c.vocab_size}) on {device}, {torch.get_num_threads()} threads; "
          f"K={args.num_prompts} L={args.prompt_len} batch {args.batch_size}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, peft {peft.__version__}")
    for part, (dtype, why) in dtypes.items():
        print(f"{part} in {train.dtype_name(dtype)} ({why})")
    results = {"command": shlex.join(["python", *sys.argv]), "args": {**vars(args), "parts": sorted(args.parts)},
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
               "dtypes": {part: train.dtype_name(dtype) for part, (dtype, _) in dtypes.items()}}
    in_dtype = {part: argparse.Namespace(**{**vars(args), "dtype": train.dtype_name(dtype)}) for part, (dtype, _) in dtypes.items()}
    rows = []
    if "decode" in args.parts:  # first: timed after the 15 GB reference training child, ours ran 10-40% slower
        print(f"decoding {args.batch_size} contexts x {args.new_tokens} tokens, {args.decode_repeats} times per side, each side in a fresh process ...", flush=True)
        results["decode"] = decode = bench_decode(in_dtype["decode"])
        print(f"greedy tokens equal: {100 * decode['tokens_equal']:.1f}%")
    if "train" in args.parts:
        results["agreement"] = agreement = run_in_fresh_process(agreement_side, args)
        if not agreement["agree"]:
            sys.exit(f"error: ours and the reference disagree on the first batch (loss {agreement['loss_ours']:.6f} vs "
                     f"{agreement['loss_reference']:.6f}, gradient differences {agreement['grad_max_abs_diff']}); no speed "
                     "is reported for different computations: fix train.py/model.py or reference_loss in bench.py")
        print(f"first batch: loss ours {agreement['loss_ours']:.6f}, reference {agreement['loss_reference']:.6f} "
              f"(|diff| {agreement['loss_abs_diff']:.1e}); max |grad diff| "
              + ", ".join(f"{name} {diff:.1e}" for name, diff in agreement["grad_max_abs_diff"].items()))
        results["syncs"] = syncs = run_in_fresh_process(count_step_syncs, in_dtype["train"])
        print(f"host syncs per micro-batch of train.py's loop: {len(syncs['plain'])} ({len(syncs['logging'])} on a step that "
              f"prints its log line); counted on CPU by bench.SyncCounter (reads of tensor values such as .item(), .tolist(), "
              f"int(), and value-dependent shapes such as nonzero, called by train.py, losses.py, ...; host-device copies "
              f"are not visible on CPU): " + ", ".join(f"{n} x {site}" for site, n in collections.Counter(syncs["plain"]).items()))
        timed = batches[1:]
        tokens = sum(args.num_prompts * int(b.attention_mask.sum() + b.input_ids.shape[0] * args.prompt_len) for b in timed)
        flops = sum(train_step_flops(c, b, args.num_prompts, args.prompt_len) for b in timed)
        results["matmul_gflops"] = matmul = matmul_gflops(device, dtypes["train"][0])
        timing = {}
        for side in ("ours", "reference"):
            print(f"timing the {side} training step in a fresh process ({args.steps} steps after a warm-up) ...", flush=True)
            run = run_in_fresh_process(train_side, side, in_dtype["train"])
            seconds = sum(run["times"])
            timing[side] = {**run, "median_s": statistics.median(run["times"]), "tokens_per_s": tokens / seconds,
                            "gflops": flops / seconds / 1e9, "efficiency_pct": 100 * flops / seconds / 1e9 / matmul}
        results["train"] = timing
        results["train_flops_per_step"] = flops / len(timed)
        rows += [("train step, median (s)", timing["ours"]["median_s"], timing["reference"]["median_s"]),
                 ("train tokens/s", timing["ours"]["tokens_per_s"], timing["reference"]["tokens_per_s"]),
                 ("train peak memory (MB)", timing["ours"]["peak_mb"], timing["reference"]["peak_mb"]),
                 ("efficiency (% of matmul GFLOP/s)", timing["ours"]["efficiency_pct"], timing["reference"]["efficiency_pct"])]
    if "decode" in args.parts:
        rows.append(("decode tokens/s", decode["ours"]["tokens_per_s"], decode["reference"]["tokens_per_s"]))
    if "train" in args.parts:
        rows.append((f"{results['dtypes']['train']} matmul GFLOP/s (4096^3)", results["matmul_gflops"], None))
    print()
    print(markdown_table(rows))
    print("\nratios are ours / reference: below 1 is better for time and memory, above 1 for rates")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nnumbers in {args.json}")


if __name__ == "__main__":
    main()
