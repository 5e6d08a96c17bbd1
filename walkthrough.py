# %% [markdown]
# # SPT, one batch at a time
#
# One real batch of three demo examples goes through Selective Prompt Tuning (Huang et al.), step by step:
# the template (3.1), the retriever's scores (Eq. 1), the K prompted inputs, each prompt's loss (Eq. 2), the
# selection loss (Eq. 3), the contrastive loss (Eq. 4), the fusion loss (Eq. 5), their sum (Eq. 6), one Adam
# step, and prompt selection at inference (Eq. 7). Every value comes from the project's own functions; where
# a value can be recomputed by hand in a line, an `assert` does it.
#
# Run it as a script (`python walkthrough.py`, under 2 minutes on 2 CPU cores) or open it as a notebook
# (Jupyter with jupytext, or VS Code: the `# %%` lines are cells). It uses SmolLM2-135M, or the tiny random
# model when SmolLM2 is not installed (then the numbers mean nothing, but every step still runs).

# %%
import torch
import torch.nn.functional as F

import data
import generate
import losses
import train
from llm_loader import load_llm
from retriever import SPT, prompted_inputs

torch.manual_seed(0)
torch.set_printoptions(precision=3, sci_mode=False, linewidth=120)
try:
    llm, tok = load_llm("smollm2")
    model_name = "smollm2"
except FileNotFoundError:
    llm, tok = load_llm("tiny")
    model_name = "tiny (SmolLM2 is not installed)"
print(f"frozen LLM: {model_name}, {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M parameters, "
      f"embedding width E = {llm.embed_dim}; any weight gradients? {any(p.requires_grad for p in llm.parameters())}")

# %% [markdown]
# ## 3.1: the context C = {P, U} as text, and its tokens
#
# A context is the speaker's persona P and the dialogue so far U = [h1, m1, ..., hn]; the target is the
# next machine turn r = mn. The template is the one of the authors' code. `encode_example` tokenizes the
# prompt and the target apart, so the loss can be taken on the target tokens only.

# %%
demo = data.demo_examples()
examples = [demo[0], demo[5], demo[9]]  # first turns of three dialogues: a beekeeper, a firefighter, a runner
encoded = [data.encode_example(ex, tok, max_len=128) for ex in examples]
for ex, enc in zip(examples, encoded):
    print(repr(data.prompt_text(ex)))
    print(f"   target {data.target_text(ex)!r}: {len(enc.prompt_ids)} prompt tokens + {len(enc.target_ids)} target tokens (eos last)")
batch = data.collate(encoded, tok.pad_id)
B, T = batch.input_ids.shape
print(f"input_ids {tuple(batch.input_ids.shape)}, target_mask {tuple(batch.target_mask.shape)} "
      f"({int(batch.target_mask.sum())} target tokens), context_ids {tuple(batch.context_ids.shape)}")

# %% [markdown]
# ## Eq. 1: the retriever scores every prompt against every context
#
# $v_C = \mathrm{Avg}(\mathrm{lin}_C(emb_C))$, $v_{sp,i} = \mathrm{Avg}(\mathrm{lin}_{sp}(sp_i))$,
# $s_{C,i} = \mathrm{Softplus}(\cos(v_C, v_{sp,i}))$, in [0, 1]. K = 4 prompts of L = 1 virtual token
# (the paper's Llama setting), started from a standard Gaussian (4.2). These and the two linear layers are all
# that trains.

# %%
K, L = 4, 1
spt = SPT(K, L, llm.embed_dim)
scores = spt.scores(llm.embed(batch.context_ids), batch.context_mask)  # (B, K)
print(f"soft prompts {tuple(spt.soft_prompts.shape)}; trainable parameters {sum(p.numel() for p in spt.parameters())}")
print("scores s (B, K):\n", scores.detach())
assert scores.shape == (B, K) and bool(((scores >= 0) & (scores <= 1)).all())

# %% [markdown]
# ## The K prompted inputs: concat(sp_i, c_n)
#
# Every prompt goes in front of every context, and all K x B rows go through the frozen LLM in one forward
# (train.py runs them in groups of similar length). Row k*B + b is prompt k before example b.

# %%
token_embeds = llm.embed(batch.input_ids)  # (B, T, E)
embeds, mask = prompted_inputs(spt.soft_prompts, token_embeds, batch.attention_mask)
print(f"token embeddings {tuple(token_embeds.shape)} -> prompted inputs {tuple(embeds.shape)}, mask {tuple(mask.shape)}")
k, b = 2, 1
assert torch.equal(embeds[k * B + b, :L], spt.soft_prompts[k].detach()) and torch.equal(embeds[k * B + b, L:], token_embeds[b])

# %% [markdown]
# ## Eq. 2: each prompt's loss on each example
#
# $\mathcal{L}^{LLM}_i = \mathrm{NLL}(\mathrm{LLM}(\mathrm{concat}(sp_i, c_n)), target_n)$: the mean negative
# log-likelihood of the target tokens. `spt_forward` (Algorithm 1, lines 5-9) returns log p_i(y_t) at the
# target tokens only (the LM head never sees the other positions) and the scores of Eq. 1.

# %%
target_logprobs, scores, _ = train.spt_forward(llm, spt, batch)  # (B, K, T), (B, K)
prompt_losses = losses.soft_prompt_losses(target_logprobs, batch.target_mask)  # (B, K)
print(f"target log-probabilities {tuple(target_logprobs.shape)}; per-prompt NLL L (B, K):\n", prompt_losses.detach())

# %% [markdown]
# ## Eq. 3: the selection loss, KL(q || p)
#
# The LLM's feedback $q = \mathrm{Softmax}(-\mathcal{L}^{LLM} / \tau_g)$ says which prompt predicts each target
# best; the retriever's $p = \mathrm{Softmax}(s / \tau_s)$ says which it would pick. The loss pulls p toward q
# (q is a fixed target: no gradient flows into it). With s in [0, 1] and $\tau_s$ = 1, p is never sharp.

# %%
q = F.softmax(-prompt_losses.detach() / 1.0, dim=-1)
p = F.softmax(scores.detach() / 1.0, dim=-1)
selection = losses.selection_loss(scores, prompt_losses)
print("q (B, K):\n", q, "\np (B, K):\n", p, f"\nKL(q || p), batch mean: {selection.item():.5f}")
assert torch.isclose(selection, (q * (q.log() - p.log())).sum(-1).mean(), atol=1e-6)

# %% [markdown]
# ## Eq. 4: the contrastive loss over pairs of contexts
#
# M is sentence BLEU between two context texts. Pairs with $M > \Gamma$ = 20 pull their score vectors
# together ($1 - \cos$), the others push them apart ($\max(0, \cos)$). Algorithm 1 adds the terms of all ordered
# pairs, as it adds each example's terms; with the per-example terms taken as means over the B examples, the
# pair sum is divided by the same B (`--con-reduction pair-sum`, the paper recipe's default).
# At the start every context's score vector points nearly the same way (the mean token embeddings of two
# contexts are nearly parallel), so each pair pushed apart costs close to 1.

# %%
bleu = losses.bleu_matrix(batch.context_texts)  # (B, B)
cos = F.cosine_similarity(scores[:, None].detach(), scores[None].detach(), dim=-1)  # (B, B)
print("BLEU M(c_i, c_j), 0-100:\n", bleu)
terms = []
for i in range(B):
    for j in range(B):
        if i != j:
            similar = bool(bleu[i, j] > 20)
            terms.append(1 - cos[i, j] if similar else cos[i, j].clamp(min=0))
            print(f"pair ({i}, {j}): M = {bleu[i, j]:5.1f} -> {'similar, 1 - cos' if similar else 'apart, max(0, cos)'} = {terms[-1]:.5f}")
contrastive = losses.contrastive_loss(scores, bleu, threshold=20.0)
print(f"contrastive loss: {contrastive.item():.5f}")
assert torch.isclose(contrastive, torch.stack(terms).sum() / B, atol=1e-6)

# %% [markdown]
# ## Eq. 5: the fusion loss
#
# $p_{fused} = \frac{1}{K}\sum_i \mathrm{LLM}(\mathrm{concat}(sp_i, c_n))$: the NLL of the average of the K
# predicted distributions. At the true token that average is the average of the K probabilities, so the
# (B, K, T) log-probabilities are all it needs.

# %%
fusion = losses.fusion_loss(target_logprobs, batch.target_mask)
by_hand = -losses.masked_token_mean(target_logprobs.exp().mean(1).log(), batch.target_mask).mean()
print(f"fusion loss {fusion.item():.5f}; from the K probabilities by hand {by_hand.item():.5f}; "
      f"mean of the K prompts' own NLL {prompt_losses.mean().item():.5f}")
assert torch.isclose(fusion, by_hand, atol=1e-5)

# %% [markdown]
# ## Eq. 6: the total loss
#
# $\mathcal{L}_{Total} = \sum_i \mathcal{L}^{LLM}_i + \lambda_1 \mathcal{L}_{con} + \lambda_2 \mathcal{L}_{selection}
# + \lambda_3 \mathcal{L}_{fusion}$, all $\lambda$ = 1 (the paper's), each prompt's NLL averaged over the batch.

# %%
total, parts = losses.total_loss(target_logprobs, batch.target_mask, scores, bleu)
print(f"total {total.item():.4f} =", " + ".join(f"{name} {value.item():.4f}" for name, value in parts.items()))
assert torch.isclose(total, prompt_losses.mean(0).sum() + contrastive + selection + fusion, atol=1e-5)

# %% [markdown]
# ## One Adam step (Table 6: lr 0.01)
#
# The gradient reaches the soft prompts (through the frozen LLM, by Eq. 2 and 5) and the retriever (by Eq. 3
# and 4); the LLM's weights get none. Adam's first step moves every parameter with a gradient by about lr,
# whatever the gradient's size: a (576, 576) weight moves by about 0.01 x 576 = 5.76.

# %%
optimizer = torch.optim.Adam(spt.parameters(), lr=0.01)
before = {name: value.detach().clone() for name, value in spt.named_parameters()}
total.backward()
optimizer.step()
for name, value in spt.named_parameters():
    print(f"{name:20s} {tuple(value.shape)}: gradient norm {value.grad.norm():.4f}, moved by {(value.detach() - before[name]).norm():.4f}")
assert all(p.grad is None for p in llm.parameters())
with torch.no_grad():
    target_logprobs, scores, _ = train.spt_forward(llm, spt, batch)
    after, _ = losses.total_loss(target_logprobs, batch.target_mask, scores, bleu)
print(f"total loss on the same batch: {total.item():.4f} before the step, {after.item():.4f} after")

# %% [markdown]
# ## Eq. 7: inference picks one prompt per context
#
# $i^* = \arg\max_i s_{C,i}$; the LLM then continues concat(sp_{i*}, C), greedily as the authors decode. With
# A.7's noise, $\alpha \cdot N(0, 1)$ is added to the scores first.

# %%
spt.eval()
torch.set_grad_enabled(False)
for_decoding = [data.encode_example(ex, tok, max_len=128, new_tokens=16) for ex in examples]
context_ids, context_mask = data.left_pad_prompts(for_decoding, tok.pad_id)
chosen, scores = generate.select_prompts(llm, spt, context_ids, context_mask)
noisy, _ = generate.select_prompts(llm, spt, context_ids, context_mask, noise=0.1, generator=torch.Generator().manual_seed(0))
print("scores (B, K):\n", scores, f"\nchosen prompts {chosen.tolist()} (with A.7 noise 0.1: {noisy.tolist()})")
assert torch.equal(chosen, scores.argmax(-1))
responses = generate.generate(llm, tok, spt.soft_prompts[chosen], context_ids, context_mask, max_new_tokens=16)
for ex, prompt, response in zip(examples, chosen.tolist(), responses):
    print(f"prompt {prompt} | {ex.context[-1]!r} -> {response!r}   (reference {ex.response!r})")
