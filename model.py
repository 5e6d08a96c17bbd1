"""A frozen decoder-only LLM, Llama or OPT, written from scratch in plain PyTorch.

Parameter names equal the Hugging Face names (`model.layers.0.self_attn.q_proj.weight`,
`model.decoder.layers.0.fc1.weight`, ...) so a checkpoint loads by a name-for-name copy.
The forward takes token ids or embeddings (SPT prepends soft prompts as embeddings), an
attention mask with padding on either side, and an optional KV cache for decoding.
There is no dropout: the LLM stays frozen and deterministic (paper 3.2).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    arch: str  # "llama" or "opt"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # grouped-query attention (Llama); None means num_heads
    head_dim: int | None = None  # None means hidden_size // num_heads
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama
    rope_scaling: dict | None = None  # Llama 3.1+ rope: factor, low/high_freq_factor, original_max_position_embeddings
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama q/k/v/o biases
    mlp_bias: bool = False  # Llama gate/up/down biases
    do_layer_norm_before: bool = True  # OPT: pre-LN; False is post-LN (opt-350m)
    word_embed_proj_dim: int | None = None  # OPT: token embedding width when != hidden_size

    def __post_init__(self):
        if self.arch not in ("llama", "opt"):
            raise ValueError(f"arch must be 'llama' or 'opt', got {self.arch!r}")
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_heads
        self.word_embed_proj_dim = self.word_embed_proj_dim or self.hidden_size
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


class KVCache:
    """Keys and values of every layer seen so far, for decoding (no gradients flow through it).

    Each layer keeps (B, H_kv, capacity, hd) buffers. They start with room for initial_capacity
    positions (give the prompt length plus the tokens to come, and they never move) and double when
    full, so a decoding step writes its entries in place instead of copying the whole cache;
    attention reads the first `length`.
    """

    def __init__(self, num_layers, initial_capacity=64):
        self.buffers = [None] * num_layers  # (keys, values) per layer
        self.sizes = [0] * num_layers
        self.initial_capacity = initial_capacity

    @property
    def length(self):
        return self.sizes[0]

    def reserve(self, layer, like, batch_size, size):
        """Make layer's buffers hold at least `size` positions of batch_size rows shaped like `like`."""
        old = self.buffers[layer]
        if old is not None and old[0].shape[2] >= size:
            return
        _, heads, _, head_dim = like.shape
        capacity = max(size, self.initial_capacity if old is None else 2 * old[0].shape[2])
        new = tuple(like.new_zeros(batch_size, heads, capacity, head_dim) for _ in range(2))
        if old is not None:
            for new_buffer, old_buffer in zip(new, old):
                new_buffer[:, :, :self.sizes[layer]] = old_buffer[:, :, :self.sizes[layer]]
        self.buffers[layer] = new

    def update(self, layer, k, v):
        """Append this step's (B, H_kv, T, hd) keys and values; return all of them so far."""
        start, end = self.sizes[layer], self.sizes[layer] + k.shape[2]
        self.reserve(layer, k, k.shape[0], end)
        keys, values = self.buffers[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self.sizes[layer] = end
        return keys[:, :, :end], values[:, :, :end]

    def place(self, rows, part, batch_size, length):
        """Copy a cache filled for some rows of a left-padded batch into those rows, right-aligned.

        part holds (len(rows), H_kv, n, hd) per layer; here every layer gets `length` positions, and
        the n of `rows` are the last n (positions before them are padding, masked by attention).
        """
        for layer, ((keys, values), n) in enumerate(zip(part.buffers, part.sizes)):
            self.reserve(layer, keys, batch_size, length)
            self.buffers[layer][0][rows, :, length - n:length] = keys[:, :, :n]
            self.buffers[layer][1][rows, :, length - n:length] = values[:, :, :n]
            self.sizes[layer] = length


# On CPU in bf16/fp16, SDPA's flash kernel runs small problems slowly: a decoding step's one query over 200 keys
# took 860 us against 160 us as two matmuls, a training step's 96 x 96 forward and backward 52 ms against 27 ms;
# from about 200 x 200 on the flash kernel wins (SmolLM2's shapes, torch 2.13, AMD EPYC; float32 is best with SDPA).
SMALL_ATTENTION = 192 * 192


# bf16 on a CPU without bf16 matmul kernels (oneDNN's need AVX-512; on an AMD EPYC of ours with AVX2 only, torch's
# fallback loops ran bf16 matmuls at 0.88 GFLOP/s against 127 in float32): the product of two bf16 numbers is exact
# in float32, so a float32 matmul of the bf16 operands, rounded to bf16, is what a bf16 kernel that accumulates in
# float32 computes, at float32 speed. Linear takes this path there, and attention runs in float32 on the bf16
# q, k, v (finer than a bf16 kernel, which rounds the scores); activations stay bf16.
CPU_HAS_BF16_MATMUL = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_matmul_in_float32(device):
    """True on a CPU without fast bf16 matmuls: there, bf16 matmuls run in float32 on the bf16 operands."""
    return device.type == "cpu" and not CPU_HAS_BF16_MATMUL


def attend(q, k, v, mask, layer, kv_cache):
    """Scaled dot-product attention of q (B, H, T, hd) over cached + new k, v (B, H_kv, S, hd); mask None: causal only."""
    if kv_cache is not None:
        k, v = kv_cache.update(layer, k, v)
    if q.dtype == torch.bfloat16 and bf16_matmul_in_float32(q.device):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=k.shape[1] != q.shape[1]).to(q.dtype)
    elif q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[2] * k.shape[2] <= SMALL_ATTENTION:
        y = attention_by_matmul(q, k, v, mask)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1])
    B, H, T, hd = y.shape
    return y.transpose(1, 2).reshape(B, T, H * hd)


def attention_by_matmul(q, k, v, mask):
    """What F.scaled_dot_product_attention computes, as two batched matmuls and a float32 softmax.

    q (B, H, T, hd), k and v (B, H_kv, S, hd) with H a multiple of H_kv (grouped-query attention: each key
    head serves H / H_kv query heads, which are stacked instead of repeating k and v); mask (B, 1, T, S)
    True where a query may look, or None for causal (the last T of S positions are the queries) -> (B, H, T, hd).
    """
    B, H, T, hd = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = q.reshape(B, H_kv, H // H_kv * T, hd) @ k.transpose(-1, -2) * hd ** -0.5  # (B, H_kv, H/H_kv * T, S)
    scores = scores.view(B, H_kv, H // H_kv, T, S).masked_fill(~mask.reshape(-1, 1, 1, T, S), float("-inf"))
    weights = scores.float().softmax(-1).to(v.dtype).view(B, H_kv, H // H_kv * T, S)
    return (weights @ v).view(B, H, T, hd)


def split_heads(x, num_heads):
    """(B, T, H * hd) -> (B, H, T, hd)"""
    B, T, _ = x.shape
    return x.view(B, T, num_heads, -1).transpose(1, 2)


class Linear(nn.Linear):
    """nn.Linear that runs an input of a few rows, like a decoding step, as (W @ x^T)^T on CPU.

    Same product, other operand order: for 2 to 8 rows MKL streams the weight about 1.4x faster
    this way (SmolLM2, batch 8: 33 instead of 46 ms of matmuls per decoding step). One row goes in
    twice, because MKL's one-row kernel uses a single core (SmolLM2 chat: 44 -> 23 ms per token).
    bf16 on a CPU without bf16 kernels goes through float32 (see bf16_matmul_in_float32). More rows, other
    devices and bf16/fp16 take the usual path (in bf16 it is the faster one: SmolLM2's
    batch-8 greedy decoding ran 115 instead of 86 tokens/s on an AMD EPYC with avx512_bf16).
    """

    def forward(self, x):
        if self.weight.dtype == torch.bfloat16 and bf16_matmul_in_float32(x.device):
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.to(torch.bfloat16).float(), self.weight.float(), bias).to(torch.bfloat16)
        rows = x.shape[:-1].numel()
        if x.device.type != "cpu" or rows > 8 or x.dtype != torch.float32:
            return super().forward(x)
        flat = x.reshape(rows, -1)  # (rows, in)
        if rows == 1:
            flat = torch.cat([flat, flat])
        y = (self.weight @ flat.T)[:, :rows].T.contiguous().reshape(*x.shape[:-1], -1)  # (..., out)
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------- Llama

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in float32: in bf16 it loses the small components
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_inverse_frequencies(c):
    """Rotary inverse frequencies (hd/2,), float32 on CPU; with c.rope_scaling, Llama 3.1's rescaling.

    llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are divided
    by factor, shorter than .. / high_freq_factor kept, and those between interpolated smoothly.
    """
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device="cpu").float() / c.head_dim)
    if c.rope_scaling is None:
        return inv_freq
    s = c.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope(positions, inv_freq):
    """Rotary cos and sin for positions (B, T) and inv_freq (hd/2,): each (B, 1, T, hd), halves duplicated."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos(), angles.sin()


class LlamaAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads, self.num_kv_heads = c.num_heads, c.num_kv_heads
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, mask, cos_sin, layer, kv_cache):
        cos, sin = cos_sin
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        q = q * cos.to(q.dtype) + rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
        return self.o_proj(attend(q, k, v, mask, layer, kv_cache))


class LlamaMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x, mask, cos_sin, layer, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), mask, cos_sin, layer, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.inv_freq = rope_inverse_frequencies(c)  # not a buffer: stays float32 whatever dtype the weights take

    def forward(self, x, mask, positions, kv_cache, grad_checkpoint):
        """x (B, T, D) embeddings -> (B, T, D) final hidden states."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        cos_sin = rope(positions, self.inv_freq)
        for i, block in enumerate(self.layers):
            x = run_block(block, x, mask, cos_sin, i, kv_cache, grad_checkpoint)
        return self.norm(x)


# ----------------------------------------------------------------------------- OPT

class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in float32 and returned in the input's dtype, as RMSNorm does.

    Autocast would decide otherwise by device (float32 out on CUDA, bf16 on CPU), and OPT's post-LN
    blocks feed that output into the residual stream: done here, the stream keeps the weights' dtype
    on every device, in training and in decoding alike.
    """

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class OPTAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_heads
        self.q_proj = Linear(c.hidden_size, c.hidden_size)
        self.k_proj = Linear(c.hidden_size, c.hidden_size)
        self.v_proj = Linear(c.hidden_size, c.hidden_size)
        self.out_proj = Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, mask, layer, kv_cache):
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        return self.out_proj(attend(q, k, v, mask, layer, kv_cache))


class OPTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre_ln = c.do_layer_norm_before
        self.self_attn = OPTAttention(c)
        self.self_attn_layer_norm = LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = Linear(c.intermediate_size, c.hidden_size)
        self.final_layer_norm = LayerNorm(c.hidden_size, eps=c.norm_eps)

    def forward(self, x, mask, layer, kv_cache):
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), mask, layer, kv_cache)
            return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, mask, layer, kv_cache))
        return self.final_layer_norm(x + self.fc2(F.relu(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(c.max_position_embeddings + 2, c.hidden_size)  # OPT offsets positions by 2
        projected = c.word_embed_proj_dim != c.hidden_size
        self.project_in = Linear(c.word_embed_proj_dim, c.hidden_size, bias=False) if projected else None
        self.project_out = Linear(c.hidden_size, c.word_embed_proj_dim, bias=False) if projected else None
        self.layers = nn.ModuleList(OPTBlock(c) for _ in range(c.num_layers))
        self.final_layer_norm = LayerNorm(c.hidden_size, eps=c.norm_eps) if c.do_layer_norm_before else None

    def forward(self, x, mask, positions, kv_cache, grad_checkpoint):
        """x (B, T, E) embeddings -> (B, T, E) final hidden states."""
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + 2).to(x.dtype)
        for i, block in enumerate(self.layers):
            x = run_block(block, x, mask, None, i, kv_cache, grad_checkpoint)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x


class OPTModel(nn.Module):
    """Holds the decoder so that parameter names read `model.decoder.*` as in Hugging Face."""

    def __init__(self, c):
        super().__init__()
        self.decoder = OPTDecoder(c)

    @property
    def embed_tokens(self):
        return self.decoder.embed_tokens

    def forward(self, *args):
        return self.decoder(*args)


# ----------------------------------------------------------------------------- shared

def run_block(block, x, mask, cos_sin, layer, kv_cache, grad_checkpoint):
    """One decoder block; with grad_checkpoint its activations are recomputed in the backward pass."""
    args = (x, mask, cos_sin, layer, kv_cache) if cos_sin is not None else (x, mask, layer, kv_cache)
    if grad_checkpoint and torch.is_grad_enabled() and kv_cache is None:
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def attention_mask_4d(key_mask, num_queries):
    """Boolean (B, 1, T, T_all) mask: causal and no padded keys.

    key_mask (B, T_all) is 1 for real tokens; the last num_queries positions are the queries.
    Each query may always see itself, so a padded query never has an empty row (no NaN).
    """
    T_all = key_mask.shape[1]
    query_pos = torch.arange(T_all - num_queries, T_all, device=key_mask.device)[:, None]  # (T, 1)
    key_pos = torch.arange(T_all, device=key_mask.device)[None, :]  # (1, T_all)
    causal = key_pos <= query_pos
    mask = causal & key_mask.bool()[:, None, None, :]
    return mask | (key_pos == query_pos)


class LLM(nn.Module):
    """Decoder-only causal LM; `config.arch` picks Llama or OPT blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config) if config.arch == "llama" else OPTModel(config)
        self.lm_head = Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings or config.arch == "opt":
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpoint = False

    @property
    def embed_dim(self):
        """Width E of token embeddings, i.e. of `inputs_embeds` and of soft prompts."""
        return self.config.word_embed_proj_dim

    @property
    def dtype(self):
        """The frozen weights' dtype: float32, or the bfloat16 / float16 that the blocks autocast to."""
        return self.lm_head.weight.dtype

    def embed(self, input_ids):
        """(B, T) token ids -> (B, T, E) token embeddings."""
        return self.model.embed_tokens(input_ids)

    def new_kv_cache(self, initial_capacity=64):
        return KVCache(self.config.num_layers, initial_capacity)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, kv_cache=None, return_hidden=False,
                right_padded=False):
        """Logits (B, T, V) in float32, or final hidden states (B, T, E) in the weights' dtype when return_hidden.

        attention_mask (B, T_past + T): 1 for real tokens, 0 for padding (either side); positions
        count real tokens only, so left padding gives the same result as no padding.
        Mixed precision: with bfloat16 or float16 weights the blocks run under torch.autocast to that
        dtype on the input's device (CPU and CUDA alike), here, so that training, evaluation and
        decoding all compute the same way; float32 inputs such as soft prompts are cast by it.
        right_padded: every row's padding comes after its real tokens (train.py's batches). Then, with no
        cache, the causal mask alone gives every real position the same result (none of them sees a later
        pad), and SDPA's causal kernel skips the masked blocks: a SmolLM2 training step in bf16 on CPU took
        7% less. Only the outputs at padded positions change, and nothing reads them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, E)
        B, T, _ = x.shape
        past = 0 if kv_cache is None else kv_cache.length
        causal_only = kv_cache is None and (right_padded or attention_mask is None)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        attention_mask = attention_mask.long()
        positions = (attention_mask.cumsum(1) * attention_mask - 1)[:, past:]  # (B, T), -1 at padding
        mask = None if causal_only else attention_mask_4d(attention_mask, T)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            hidden = self.model(x.to(self.dtype), mask, positions, kv_cache, self.grad_checkpoint)
        return hidden if return_hidden else self.lm_head(hidden).float()
