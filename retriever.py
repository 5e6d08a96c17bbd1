"""The soft prompt group SP and the dense retriever Ret of Eq. 1 (paper 3.2-3.3).

These are SPT's only trainable parts: K soft prompts of L virtual tokens each, and two
Linear(E, E) layers that score every prompt against a context. The frozen LLM supplies the
context's token embeddings and receives the prompted inputs built here.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_mean(x, mask):
    """Mean of x (B, T, E) over T where mask (B, T) is 1 -> (B, E)."""
    mask = mask.to(x.dtype)[..., None]
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class SPT(nn.Module):
    """Soft prompt group (K, L, E) and the dense retriever that scores it against contexts."""

    def __init__(self, num_prompts, prompt_len, embed_dim, center_contexts=False, detach_prompts_in_scores=False):
        super().__init__()
        self.detach_prompts_in_scores = detach_prompts_in_scores  # not in the paper: --detach-prompts-in-scores
        self.soft_prompts = nn.Parameter(torch.randn(num_prompts, prompt_len, embed_dim))  # standard Gaussian (4.2)
        self.lin_context = nn.Linear(embed_dim, embed_dim)  # lin_C of Eq. 1
        self.lin_prompt = nn.Linear(embed_dim, embed_dim)  # lin_sp of Eq. 1
        if center_contexts:  # not in the paper: the routed recipe's --center-contexts (set_context_center)
            self.register_buffer("context_center", torch.zeros(embed_dim))

    @property
    def num_prompts(self):
        return self.soft_prompts.shape[0]

    @property
    def prompt_len(self):
        return self.soft_prompts.shape[1]

    @property
    def embed_dim(self):
        return self.soft_prompts.shape[2]

    @torch.no_grad()
    def init_from_vocab(self, token_embeddings, generator=None):
        """Initialise each virtual token from a random row of the LLM's (V, E) embedding table."""
        K, L, _ = self.soft_prompts.shape
        rows = torch.randint(token_embeddings.shape[0], (K * L,), generator=generator)
        self.soft_prompts.copy_(token_embeddings[rows].view(K, L, -1))

    def forward(self, context_embeds, context_mask):
        """The soft prompts (K, L, E) and their scores (B, K); a forward, so data parallelism can wrap it."""
        return self.soft_prompts, self.scores(context_embeds, context_mask)

    @torch.no_grad()
    def set_context_center(self, context_means):
        """Store the training contexts' mean token embedding: context_means (N, E), one row per context."""
        self.context_center.copy_(context_means.float().mean(0))

    def context_vectors(self, context_embeds, context_mask):
        """v_C (B, E) = mean over the real tokens of lin_C(emb_C); context_embeds (B, Tc, E), context_mask (B, Tc).

        With a context_center mu (the routed recipe): lin_C(mean emb_C) - lin_C(mu) = W (mean emb_C - mu), so
        what every context shares, lin_C's bias included, cannot make all v_C one vector and send every context
        to the same prompt.
        """
        context_embeds = context_embeds.to(self.lin_context.weight.dtype)  # a bf16 LLM feeds a float32 retriever
        v_context = masked_mean(self.lin_context(context_embeds), context_mask)
        if hasattr(self, "context_center"):
            v_context = v_context - self.lin_context(self.context_center)
        return v_context

    def scores(self, context_embeds, context_mask):
        """Eq. 1: s (B, K) = Softplus_10(cos(mean lin_C(emb_C), mean lin_sp(sp_i))), in [0, 1].

        context_embeds (B, Tc, E) are the frozen LLM's token embeddings of C = {P, U};
        context_mask (B, Tc) excludes padding from the mean. beta = 10 with threshold 1 keeps s in
        [0, 1] as the paper says (plain softplus gives [0.31, 1.31]); the authors' code uses the same.
        """
        v_context = self.context_vectors(context_embeds, context_mask)  # (B, E)
        soft_prompts = self.soft_prompts.detach() if self.detach_prompts_in_scores else self.soft_prompts
        v_prompts = self.lin_prompt(soft_prompts).mean(1)  # (K, E)
        raw = F.cosine_similarity(v_context[:, None, :], v_prompts[None, :, :], dim=-1)  # (B, K)
        return F.softplus(raw, beta=10, threshold=1)


def prompted_inputs(soft_prompts, token_embeds, attention_mask):
    """Prepend each of the K prompts to each of the B sequences, for ONE forward of the LLM.

    soft_prompts (K, L, E), token_embeds (B, T, E), attention_mask (B, T)
    -> inputs_embeds (K*B, L+T, E) and attention_mask (K*B, L+T); row k*B + b is concat(sp_k, c_b).
    """
    K, L, E = soft_prompts.shape
    B, T, _ = token_embeds.shape
    prompts = soft_prompts.to(token_embeds.dtype)[:, None].expand(K, B, L, E)
    tokens = token_embeds[None].expand(K, B, T, E)
    embeds = torch.cat([prompts, tokens], dim=2).reshape(K * B, L + T, E)
    prompt_mask = attention_mask.new_ones(B, L)
    mask = torch.cat([prompt_mask, attention_mask], dim=1).repeat(K, 1)  # (K*B, L+T)
    return embeds, mask
