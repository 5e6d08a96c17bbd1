"""Decode with a trained SPT checkpoint: the retriever picks a prompt per context (Eq. 7), the frozen
LLM continues the prompted context greedily (default, as the authors decode) or with top-p sampling.

    python generate.py --ckpt runs/spt --data convai2/valid_self_original_no_cands.txt --holdout 100 [--bertscore]
    python generate.py --ckpt runs/spt --chat --persona "i love hiking." --persona "i have two dogs."

Evaluation writes a JSONL of predictions (OUT/predictions.jsonl) and prints the Table-1 style report.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import metrics
from train import dtype_name, length_groups, load_checkpoint, load_frozen_llm, resolve_device, run_cli

STOP_MARKERS = (" Q:", " R:", "\n")  # the next speaker of the template, or a line break, ends a response
CHAT_DECODING = {"top_p": 0.9, "temperature": 0.7, "no_repeat_ngram_size": 3}  # --chat's defaults (RESULTS.md, "Chat decoding": why these)


def select_prompts(llm, spt, context_ids, context_mask, noise=0.0, force=None, generator=None):
    """Eq. 7: i* = argmax_i s_i -> (chosen (B,), scores (B, K)).

    noise adds alpha * N(0, 1) to the scores first (A.7); force picks one prompt for every context.
    """
    scores = spt.scores(llm.embed(context_ids), context_mask).float()  # (B, K)
    noisy = scores + noise * torch.randn(scores.shape, generator=generator, device=scores.device) if noise else scores
    chosen = noisy.argmax(-1) if force is None else torch.full_like(noisy[:, 0], force, dtype=torch.long)
    return chosen, scores


def next_tokens(logits, top_p, temperature, generator):
    """Greedy when top_p is 0; else nucleus sampling. logits (B, V) -> (B,)"""
    if top_p <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # tokens after the nucleus is full
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    picks = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1)
    return order.gather(-1, picks).squeeze(-1)


def penalize_repeats(logits, ids, mask, repetition_penalty=1.0, no_repeat_ngram_size=0):
    """Hugging Face generate's repetition_penalty and no_repeat_ngram_size, each row over its own real tokens.

    logits (B, V); ids (B, T) the prompt's token ids then the tokens generated so far (as HF does for a
    decoder-only model; soft prompts have no ids), mask (B, T) 0 at padding, which never counts -> (B, V).
    A seen token's logit is divided by the penalty (multiplied when negative); a token that would
    complete an n-gram the row already holds is banned (-inf).
    """
    V = logits.shape[1]
    real = mask.bool()
    logits = F.pad(logits, (0, 1))  # (B, V+1): column V takes padding and non-n-grams, and is dropped
    if repetition_penalty != 1.0:
        seen = torch.where(real, ids.clamp(max=V), V)  # (B, T)
        score = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(score < 0, score * repetition_penalty, score / repetition_penalty))
    n = no_repeat_ngram_size
    if n and ids.shape[1] >= n:
        windows = ids.unfold(1, n, 1)  # (B, W, n): every n-gram; a window with padding in it is no n-gram
        prefix = ids[:, ids.shape[1] - n + 1:]  # (B, n-1) the last tokens, which the next one would extend
        completes = (windows[..., :-1] == prefix[:, None]).all(-1) & real.unfold(1, n, 1).all(-1)  # (B, W)
        logits.scatter_(1, torch.where(completes, windows[..., -1].clamp(max=V), V), float("-inf"))
    return logits[:, :V]


def cut_at_stop(text):
    """The response text up to the first stop marker; and whether one was found."""
    cuts = [text.find(m) for m in STOP_MARKERS if m in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class StreamedText:
    """A response's text, grown by decoding only its newest tokens (the offsets of vLLM's incremental
    detokenizer): decode(ids[prefix:]) less decode(ids[prefix:read]), a token of context keeping a word's
    leading space; nothing is added while the tokens end inside a character (U+FFFD)."""

    def __init__(self):
        self.text, self.prefix, self.read = "", 0, 0

    def extend(self, tok, ids):
        """ids: the response's tokens so far, the newest last; returns the text so far."""
        before, after = tok.decode(ids[self.prefix:self.read]), tok.decode(ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(ids)
        return self.text


def insert_prompts(soft_prompts, token_embeds, mask):
    """Put each row's soft prompt right before its first real token: [pad .., sp_b, tokens_b].

    soft_prompts (B, L, E); token_embeds (B, T, E) and mask (B, T) left-padded
    -> inputs_embeds (B, L+T, E) and mask (B, L+T), still left-padded (real content right-aligned).
    """
    B, L, E = soft_prompts.shape
    T = mask.shape[1]
    pads = T - mask.sum(1, keepdim=True)  # (B, 1)
    cols = torch.arange(L + T, device=mask.device)[None]  # (1, L+T)
    combined = torch.cat([soft_prompts.to(token_embeds.dtype), token_embeds], dim=1)  # (B, L+T, E): [sp, pad .., tokens]
    source = torch.where(cols < pads + L, (cols - pads).clamp(min=0), cols)  # (B, L+T): the pads move to the front
    return combined.gather(1, source[..., None].expand(B, L + T, E)), (cols >= pads).to(mask.dtype)


def prefill(llm, embeds, mask, new_tokens=0):
    """KV cache and next-token logits (B, V) of left-padded prompted inputs embeds (B, T, E), mask (B, T).

    Rows run in groups of similar length (padding is work for nothing) and their keys and values
    are laid side by side, right-aligned, in one cache for the batched decoding steps, with room
    for new_tokens more.
    """
    B, T, E = embeds.shape
    cache = llm.new_kv_cache(initial_capacity=T + new_tokens)
    last_hidden = embeds.new_empty(B, E)  # (B, E) the states the next tokens come from
    lengths = mask.sum(1).cpu()  # one read from the device for the whole grouping
    for rows in length_groups(lengths):
        n = int(lengths[rows].max())
        rows = rows.to(embeds.device)
        part = llm.new_kv_cache()
        hidden = llm(inputs_embeds=embeds[rows, T - n:], attention_mask=mask[rows, T - n:], kv_cache=part, return_hidden=True)
        last_hidden[rows] = hidden[:, -1]
        cache.place(rows, part, B, T)
    return cache, llm.lm_head(last_hidden).float()  # the LM head only where the next token comes from


@torch.no_grad()
def decode_steps(llm, embeds, mask, max_new_tokens, top_p=0.0, temperature=1.0, generator=None,
                 ids=None, ids_mask=None, repetition_penalty=1.0, no_repeat_ngram_size=0):
    """Yield the next tokens (B,) one step at a time, with the KV cache; the caller stops when it likes.

    embeds (B, T, E) and mask (B, T) are the whole prompted inputs, left-padded. With repetition_penalty != 1
    or no_repeat_ngram_size > 0, ids and ids_mask (B, T') are the prompt's token ids that penalize_repeats
    counts, left-padded; the generated tokens join them.
    """
    cache, logits = prefill(llm, embeds, mask, max_new_tokens)
    penalize = repetition_penalty != 1.0 or no_repeat_ngram_size > 0
    for step in range(max_new_tokens):
        if penalize:
            logits = penalize_repeats(logits, ids, ids_mask, repetition_penalty, no_repeat_ngram_size)
        token = next_tokens(logits, top_p, temperature, generator)  # (B,)
        yield token
        if step == max_new_tokens - 1:
            return
        if penalize:
            ids = torch.cat([ids, token[:, None]], dim=1)
            ids_mask = torch.cat([ids_mask, ids_mask.new_ones(ids_mask.shape[0], 1)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = llm(input_ids=token[:, None], attention_mask=mask, kv_cache=cache)[:, -1]


def generate(llm, tok, soft_prompts, prompt_ids, prompt_mask, max_new_tokens=32, top_p=0.0, temperature=1.0, generator=None,
             repetition_penalty=1.0, no_repeat_ngram_size=0):
    """Decode a batch; row b continues concat(soft_prompts[b], its prompt).

    soft_prompts (B, L, E) the chosen prompt of each row; prompt_ids, prompt_mask (B, T) left-padded.
    repetition_penalty and no_repeat_ngram_size count the prompt's tokens and the generated ones (penalize_repeats).
    Returns the B response strings (cut at EOS or at the template's next speaker marker).
    A step reads its B tokens from the device once and decodes only the new ones (StreamedText, to find
    stop markers); each response is decoded whole once, at the end.
    """
    B = prompt_ids.shape[0]
    with torch.no_grad():
        embeds, mask = insert_prompts(soft_prompts, llm.embed(prompt_ids), prompt_mask)
    generated = [[] for _ in range(B)]
    texts = [StreamedText() for _ in range(B)]
    done = [False] * B
    for token in decode_steps(llm, embeds, mask, max_new_tokens, top_p, temperature, generator,
                              prompt_ids, prompt_mask, repetition_penalty, no_repeat_ngram_size):
        for b, token_id in enumerate(token.tolist()):
            if done[b]:
                continue
            if token_id == tok.eos_id:
                done[b] = True
                continue
            generated[b].append(token_id)
            done[b] = cut_at_stop(texts[b].extend(tok, generated[b]))[1]
        if all(done):
            break
    return [cut_at_stop(tok.decode(ids))[0].strip() for ids in generated]


def respond(llm, tok, spt, encoded, args, generator=None):
    """Pick prompts (Eq. 7) and decode a batch of EncodedExamples -> (responses, chosen (B,), scores (B, K))."""
    device = llm.lm_head.weight.device
    context_ids, context_mask = data.left_pad_prompts(encoded, tok.pad_id)
    context_ids, context_mask = context_ids.to(device), context_mask.to(device)
    chosen, scores = select_prompts(llm, spt, context_ids, context_mask, args.selection_noise, args.prompt, generator)
    responses = generate(llm, tok, spt.soft_prompts[chosen], context_ids, context_mask, args.max_new_tokens,
                         args.top_p, args.temperature, generator, args.repetition_penalty, args.no_repeat_ngram_size)
    return responses, chosen.tolist(), scores.tolist()


def progress(done, total, start):
    elapsed = time.time() - start
    eta = elapsed / done * (total - done) if done else 0.0
    bar = "#" * int(30 * done / total)
    print(f"\r[{bar:<30}] {done}/{total} examples, {elapsed:.0f}s elapsed, ETA {eta:.0f}s", end="", file=sys.stderr, flush=True)


def evaluate(llm, tok, spt, config, args):
    examples = data.load_examples(args.data)
    if args.holdout:
        examples = data.split_by_dialogue(examples, args.holdout, shuffle=False)[1]
    if args.max_examples:
        examples = examples[:args.max_examples]
    encoded = [data.encode_example(ex, tok, config["max_len"], args.max_new_tokens) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt_ids))  # similar lengths share a batch
    generator = torch.Generator(device=llm.lm_head.weight.device).manual_seed(args.seed)
    records = [None] * len(encoded)
    start = time.time()
    for first in range(0, len(order), args.batch_size):
        rows = order[first:first + args.batch_size]
        responses, chosen, scores = respond(llm, tok, spt, [encoded[i] for i in rows], args, generator)
        for i, response, prompt, score in zip(rows, responses, chosen, scores):
            ex = encoded[i].example
            records[i] = {"dialogue_id": ex.dialogue_id, "turn": ex.turn, "persona": ex.persona, "context": ex.context,
                          "reference": ex.response, "prediction": response, "chosen_prompt": prompt,
                          "scores": [round(s, 5) for s in score]}
        progress(min(first + args.batch_size, len(order)), len(order), start)
    print(file=sys.stderr)
    out = Path(args.out or Path(args.ckpt) / "predictions.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} predictions in {time.time() - start:.0f}s -> {out}")
    print(metrics.report(records, spt.num_prompts, bertscore=args.bertscore))


def chat(llm, tok, spt, config, args):
    persona = list(args.persona)
    if args.persona_file:
        persona += [line.strip() for line in Path(args.persona_file).read_text().splitlines() if line.strip()]
    history = []
    generator = torch.Generator(device=llm.lm_head.weight.device).manual_seed(args.seed)
    print(f"decoding: {decoding_settings(args)} (set with --top-p, --temperature, --repetition-penalty, --no-repeat-ngram-size)")
    print(f"persona: {' '.join(persona) or '(none)'}")
    print("type a message; commands: 'exit', 'clear' (forget the dialogue), 'persona' (show it), 'persona TEXT' (replace it)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line == "exit":
            break
        if line == "clear":
            history = []
            print("(dialogue cleared)")
            continue
        if line == "persona" or line.startswith("persona "):
            if line != "persona":
                persona = [s.strip() + "." for s in line[len("persona "):].split(".") if s.strip()]
                history = []
            print(f"persona: {' '.join(persona) or '(none)'}")
            continue
        if not line:
            continue
        history.append(line)
        example = data.Example(persona, list(history), "", len(history) // 2 + 1, "chat")
        (response,), (prompt,), _ = respond(llm, tok, spt, [data.encode_example(example, tok, config["max_len"], args.max_new_tokens)], args, generator)
        history.append(response)
        print(f"bot [prompt {prompt}]> {response}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="runs/spt",
                   help="checkpoint folder written by train.py (its config.json names the base model)")
    p.add_argument("--model", default=None,
                   help="override the base model named in the checkpoint (must have the same embedding width)")
    p.add_argument("--data", default=None,
                   help="evaluate on this data (ConvAI2 .txt, DailyDialog dialogues_*.txt, .jsonl or 'demo'); "
                        "default: the checkpoint's training data")
    p.add_argument("--holdout", type=int, default=None,
                   help="evaluate on the LAST N dialogues of --data (default: the checkpoint's --holdout; 0 = all)")
    p.add_argument("--max-examples", type=int, default=0, help="evaluate on the first N examples only (0: all)")
    p.add_argument("--out", default=None, help="predictions JSONL (default: CKPT/predictions.jsonl)")
    p.add_argument("--bertscore", action="store_true",
                   help=f"add BERTScore F1/P/R to the report, with {metrics.BERTSCORE_MODEL} as the paper "
                        f"(needs {metrics.BERTSCORE_INSTALL}; downloads the model into the Hugging Face cache once)")
    p.add_argument("--chat", action="store_true",
                   help="talk to the model in the terminal instead of evaluating; its decoding defaults: "
                        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in CHAT_DECODING.items()))
    p.add_argument("--persona", action="append", default=[], help="a persona sentence for --chat (repeat the flag)")
    p.add_argument("--persona-file", default=None, help="a file with one persona sentence per line, for --chat")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest response in tokens")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold; 0 decodes greedily")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --top-p)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="as in Hugging Face generate: logits of tokens already in the context or response are divided by it (1: off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help="as in Hugging Face generate: never repeat an n-gram of this many tokens of the context or response (0: off)")
    p.add_argument("--selection-noise", type=float, default=0.0,
                   help="alpha of Gaussian noise on the retriever scores before the argmax (A.7)")
    p.add_argument("--prompt", type=int, default=None, help="force soft prompt i for every context (Figure 3 analyses)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts decoded together")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and selection noise")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="the LLM's weights and autocast; 'auto' measures on CPU which of bfloat16 and float32 runs matmuls of "
                        "this decoding's rows (--batch-size contexts; one for --chat) faster, and takes bfloat16 on CUDA "
                        "(float16 on GPUs without native bfloat16)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    args = p.parse_args(argv)
    if args.chat:  # sampling that does not loop; greedy stays the evaluation default; flags given still win
        p.set_defaults(**CHAT_DECODING)
        args = p.parse_args(argv)
    return args


def decoding_settings(args):
    """How responses are decoded, in words: 'top-p 0.9, temperature 0.7, repetition penalty 1.2'."""
    parts = [f"top-p {args.top_p}, temperature {args.temperature}" if args.top_p > 0 else "greedy"]
    if args.repetition_penalty != 1.0:
        parts.append(f"repetition penalty {args.repetition_penalty}")
    if args.no_repeat_ngram_size:
        parts.append(f"no repeated {args.no_repeat_ngram_size}-grams")
    return ", ".join(parts)


def main(argv=None):
    args = parse_args(argv)
    if args.top_p > 0 and args.temperature <= 0:
        raise ValueError(f"--top-p {args.top_p} samples at --temperature {args.temperature}, which must be above 0: "
                         f"raise --temperature, or drop --top-p to decode greedily")
    if args.repetition_penalty <= 0 or args.no_repeat_ngram_size < 0:
        raise ValueError("--repetition-penalty must be above 0 (1: off) and --no-repeat-ngram-size at least 0 (0: off)")
    device = resolve_device(args.device)
    spt, config = load_checkpoint(args.ckpt, device=device)
    model = args.model or config["model"]
    llm, tok, dtype, why = load_frozen_llm(model, device, args.dtype, rows=1 if args.chat else args.batch_size)
    print(f"model {model} on {device} in {dtype_name(dtype)} ({why})", flush=True)
    if llm.embed_dim != spt.embed_dim:
        raise ValueError(f"checkpoint {args.ckpt} was trained on {config['model']} (embedding width {spt.embed_dim}), "
                         f"but {args.model} has width {llm.embed_dim}: drop --model or pass a model of the same family and size")
    if args.prompt is not None and not 0 <= args.prompt < spt.num_prompts:
        raise ValueError(f"--prompt {args.prompt} is out of range: this checkpoint has prompts 0..{spt.num_prompts - 1}")
    spt.eval()
    if args.chat:
        chat(llm, tok, spt, config, args)
        return
    args.data = args.data or config["data"]
    args.holdout = config["holdout"] if args.holdout is None else args.holdout
    evaluate(llm, tok, spt, config, args)


if __name__ == "__main__":
    run_cli(main)
