"""Which chat decoding loops least: an 8-message scripted dialogue per setting (RESULTS.md, "Chat decoding").

    python train.py --data demo --out runs/demo && python results/chat_decoding.py runs/demo
"""
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import generate  # noqa: E402
from llm_loader import load_llm  # noqa: E402
from train import load_checkpoint  # noqa: E402

spt, config = load_checkpoint(sys.argv[1])
spt.eval()
llm, tok = load_llm(config["model"])
persona = ["i love hiking.", "i have two dogs."]
messages = ["hi! how are you today?", "what do you like to do on weekends?", "do you have any pets?",
            "where do you like to hike?", "what are your dogs' names?", "i like cooking. do you cook?",
            "what music do you listen to?", "what is your job?"]
settings = {"greedy": dict(top_p=0.0, temperature=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0),
            "greedy rp1.2": dict(top_p=0.0, temperature=1.0, repetition_penalty=1.2, no_repeat_ngram_size=0),
            "p0.9 t0.7": dict(top_p=0.9, temperature=0.7, repetition_penalty=1.0, no_repeat_ngram_size=0),
            "p0.9 t0.7 rp1.2": dict(top_p=0.9, temperature=0.7, repetition_penalty=1.2, no_repeat_ngram_size=0),
            "p0.9 t0.7 rp1.1": dict(top_p=0.9, temperature=0.7, repetition_penalty=1.1, no_repeat_ngram_size=0),
            "p0.9 t0.7 ng3": dict(top_p=0.9, temperature=0.7, repetition_penalty=1.0, no_repeat_ngram_size=3)}


def loops(text):
    """Whether a word trigram occurs twice in the answer."""
    w = text.split()
    grams = list(zip(w, w[1:], w[2:]))
    return len(grams) != len(set(grams))


def echo(text, history):
    """Whether the answer repeats an earlier turn word for word."""
    return any(text and text == h for h in history)


for name, s in settings.items():
    for seed in ([0, 1] if name == "p0.9 t0.7" else [0]):
        args = SimpleNamespace(selection_noise=0.0, prompt=None, max_new_tokens=32, **s)
        g = torch.Generator().manual_seed(seed)
        history, n_loop, n_long, n_echo, n_empty, outs = [], 0, 0, 0, 0, []
        t = time.time()
        for m in messages:
            history.append(m)
            ex = data.Example(persona, list(history), "", len(history) // 2 + 1, "chat")
            (r,), _, _ = generate.respond(llm, tok, spt, [data.encode_example(ex, tok, config["max_len"])], args, g)
            n_loop, n_echo, n_empty = n_loop + loops(r), n_echo + echo(r, history[:-1]), n_empty + (not r)
            n_long += len(tok.encode(r)) >= 30
            history.append(r)
            outs.append(r)
        print(f"== {name} seed {seed}: {n_loop}/8 with a repeated word trigram, {n_echo} repeat an earlier turn, "
              f"{n_empty} empty, {n_long} run to ~max tokens ({time.time() - t:.0f}s)", flush=True)
        for m, r in zip(messages, outs):
            print(f"   {m!r} -> {r!r}")
