"""SPT's training losses, Eq. 2-6 of the paper, as small functions of gathered log-probabilities.

Shapes: B examples, K soft prompts, T target positions. `target_logprobs` (B, K, T) holds
log p_i(y_t), prompt i's log-probability of the true next token; `target_mask` (B, T) marks
real target tokens. Eq. 2 and Eq. 5 need only these values (the average of the K predicted
distributions, evaluated at y_t, is the average of the K probabilities of y_t), so no
(B, K, T, V) tensor is ever kept.
"""
import math

import torch
import torch.nn.functional as F
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu


def masked_token_mean(values, target_mask):
    """Mean of values (..., T) over the real target tokens of each example -> (...)."""
    mask = target_mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def soft_prompt_losses(target_logprobs, target_mask):
    """Eq. 2: L[b, i] = mean NLL of example b's target tokens given concat(sp_i, c_b). -> (B, K)"""
    return -masked_token_mean(target_logprobs, target_mask[:, None, :])


def fusion_loss(target_logprobs, target_mask):
    """Eq. 5: NLL of p_fused = (1/K) sum_i p_i, in log space; per-example token mean, then batch mean."""
    K = target_logprobs.shape[1]
    fused = torch.logsumexp(target_logprobs, dim=1) - math.log(K)  # (B, T)
    return fused_nll(fused, target_mask)


def fused_nll(fused_logprobs, target_mask):
    """NLL of a fused prediction, fused_logprobs (B, T) = log p_fused(y_t): per-example token mean, then batch mean."""
    return -masked_token_mean(fused_logprobs, target_mask).mean()


def score_logits_logprobs(logits, weights, targets):
    """The authors' fusion (their public code, not Eq. 5): log softmax(sum_k s_k * logits_k)[y].

    logits (K, N, V) of the K prompts at N target positions, weights (N, K) the retriever scores s
    of each position's example, targets (N,) -> (N,). Unlike Eq. 5's uniform average, the scores
    weight the prompts, so this term's gradient reaches the retriever and favours the prompts it
    scores high; fused_nll of these values is the loss.
    """
    fused = torch.einsum("nk,knv->nv", weights.to(logits.dtype), logits)  # (N, V)
    return fused.gather(-1, targets[:, None]).squeeze(-1) - fused.logsumexp(-1)


def pooled_nll(target_logprobs, target_mask):
    """The authors' NLL term (their public code, not Eq. 6's sum over prompts): one mean over the
    target tokens of all K prompted copies of the batch. target_logprobs (B, K, T) -> scalar."""
    K = target_logprobs.shape[1]
    mask = target_mask[:, None, :].to(target_logprobs.dtype)
    return -(target_logprobs * mask).sum() / (K * mask.sum()).clamp(min=1.0)


def llm_feedback(prompt_losses, tau_g=1.0):
    """q of Eq. 3: softmax(-L / tau_g) over the K prompts, a fixed target (no gradient); prompt_losses (B, K)."""
    return F.softmax(-prompt_losses.detach().float() / tau_g, dim=-1)


def selection_loss(scores, prompt_losses, tau_g=1.0, feedback_noise=0.0, tau_s=1.0):
    """Eq. 3: KL(q || p), q = softmax(-L / tau_g) the LLM's feedback (a fixed target), p = softmax(s / tau_s).
    (The paper writes KL(S, L_normed) without saying which side is the target; the retriever learns to match q.)

    scores, prompt_losses: (B, K). tau_s is the authors' `tau_sim` (1 leaves Eq. 3 as printed): with s in
    [0, 1], p can put at most e^(1/tau_s) / (e^(1/tau_s) + K - 1) on one prompt. feedback_noise adds
    alpha * N(0, 1) to q (A.8); the noisy q is clamped at 0 and renormalised so the KL stays defined.
    Mean over the batch.
    """
    q = llm_feedback(prompt_losses, tau_g)
    if feedback_noise > 0:
        q = (q + feedback_noise * torch.randn_like(q)).clamp(min=0)
        q = q / q.sum(-1, keepdim=True).clamp(min=1e-12)
    log_p = F.log_softmax(scores.float() / tau_s, dim=-1)
    return (torch.xlogy(q, q) - q * log_p).sum(-1).mean()


NLL_WEIGHTS = ("uniform", "feedback", "retriever", "picked")


def prompt_nll_weights(which, prompt_losses, scores, tau_g=1.0, tau_s=1.0):
    """How much each example's NLL under each prompt counts in Eq. 6 -> (B, K), detached, each row summing to K.

    "uniform": 1 each, Eq. 6 as printed (every prompt learns from every example). "feedback": K q, the LLM's
    feedback of Eq. 3, so each example trains mainly the prompts that already suit it best (an EM step for a
    mixture of prompts). "retriever": K p, the retriever's distribution of Eq. 3, so each prompt trains mainly
    on the contexts the retriever sends it, as Eq. 7 will at inference. "picked": K on Eq. 7's pick (argmax s)
    and 0 elsewhere, so each prompt learns only from the contexts it is picked for (with s in [0, 1], tau_s = 1 and
    K = 4, K p stays between 0.44 and 1.90: every prompt still learns from every example). prompt_losses, scores: (B, K).
    """
    K = prompt_losses.shape[1]
    if which == "uniform":
        return torch.ones_like(prompt_losses)
    if which == "feedback":
        return K * llm_feedback(prompt_losses, tau_g)
    if which == "retriever":
        return K * F.softmax(scores.detach().float() / tau_s, dim=-1)
    if which == "picked":
        return K * F.one_hot(scores.detach().argmax(-1), K).to(prompt_losses.dtype)
    raise ValueError(f"NLL weights {which!r}: use one of {', '.join(NLL_WEIGHTS)}")


CON_REDUCTIONS = ("pair-sum", "pair-mean")


def contrastive_loss(scores, bleu, threshold=20.0, reduction="pair-sum"):
    """Eq. 4 over the ordered pairs (i, j), i != j, of the B rows of scores: B (B - 1) pairs, Eq. 6's double sum
    (each unordered pair twice, once with M(c_i, c_j) and once with M(c_j, c_i), which BLEU tells apart).

    scores (B, K) retriever scores; bleu (B, B) with bleu[i, j] = M(c_i, c_j) on the 0-100 scale.
    Similar pairs (M > threshold) pull their score vectors together: 1 - cos; others push them
    apart: max(0, cos). Zero for a batch of one. The rows are Algorithm 1's C_batch: one micro-batch,
    under data parallelism every process's micro-batch (train.step_loss gathers them). reduction:
    "pair-sum": Algorithm 1, line 26, adds L_con of every pair into L_con^batch, as line 14 adds each example's
    terms over the B examples. total_loss takes those per-example terms as means over the B examples (the
    printed sums / B), so the pair sum is divided by the same B: sum / B = (B - 1) x the mean over the pairs,
    and L_con keeps the weight against L^LLM that Algorithm 1 gives it.
    "pair-mean": the mean over the pairs, as the authors' code takes (over its unordered pairs); the form of
    every run whose checkpoint config has no con_reduction.
    """
    B = scores.shape[0]
    if B < 2:
        return scores.sum() * 0.0
    cos = F.cosine_similarity(scores[:, None, :].float(), scores[None, :, :].float(), dim=-1)  # (B, B)
    similar = bleu.to(cos.device) > threshold
    pair_loss = torch.where(similar, 1.0 - cos, cos.clamp(min=0.0))
    off_diagonal = pair_loss.flatten()[1:].view(B - 1, B + 1)[:, :B].reshape(-1)  # the pairs i != j, row by row
    # (a boolean mask would pick the same, but makes a GPU report its count to the host)
    if reduction == "pair-sum":
        return off_diagonal.sum() / B
    if reduction == "pair-mean":
        return off_diagonal.mean()
    raise ValueError(f"contrastive reduction {reduction!r}: use one of {', '.join(CON_REDUCTIONS)}")


def bleu_matrix(texts, rows=None):
    """M of Eq. 4: (B, B) sentence BLEU (0-100, nltk, smoothing method 1), hypothesis i vs reference j.

    rows (a range of i) computes only those rows -> (len(rows), B), so processes can share the work.
    """
    tokens = [text.lower().split() for text in texts]
    smooth = SmoothingFunction().method1
    B = len(texts)
    rows = range(B) if rows is None else rows
    bleu = torch.zeros(len(rows), B)
    for r, i in enumerate(rows):
        for j in range(B):
            if i != j:
                bleu[r, j] = 100.0 * sentence_bleu([tokens[j]], tokens[i], smoothing_function=smooth)
    return bleu


def total_loss(target_logprobs, target_mask, scores=None, bleu=None, tau_g=1.0, threshold=20.0,
               lambda_con=1.0, lambda_sel=1.0, lambda_fusion=1.0, feedback_noise=0.0, pair_scores=None,
               tau_s=1.0, nll_reduction="sum", fused_logprobs=None, con_reduction="pair-sum", nll_weights="uniform",
               uniform_share=0.0):
    """Eq. 6: sum_i mean_b L[b, i] + lambda1 L_con + lambda2 L_sel + lambda3 L_fusion.

    Algorithm 1 sums each example's terms over the batch (line 14) and L_con over the pairs (line 26). Here
    the per-example terms are means over the batch: Algorithm 1's L_Total divided by B, which Adam does not
    see (its step m / sqrt(v) is the same for any constant scale of the loss, up to its eps) and which keeps
    logged values comparable across batch sizes. con_reduction "pair-sum" divides the pair sum by the same
    B, so L_con keeps Algorithm 1's weight; "pair-mean" weighs it B - 1 times less (contrastive_loss).
    pair_scores (B', K) with bleu (B', B') are what Eq. 4 pairs over: by default the batch's own scores;
    under data parallelism, every process's scores (B' = B x processes: DDP's gradient mean makes the
    per-example terms means over those B' examples, and the pair sum is divided by B').
    A term whose lambda is 0 is skipped (the ablations of Table 2; the PT baseline sets all three to 0 and
    needs no scores). The authors' code differs in more places, each an option: nll_reduction="mean"
    replaces the sum over prompts by pooled_nll, fused_logprobs (B, T) from score_logits_logprobs replaces
    Eq. 5's average, con_reduction="pair-mean". nll_weights (prompt_nll_weights) weighs each prompt's NLL per
    example in the sum over prompts (not Eq. 6; an option of the routed recipe); uniform_share F mixes Eq. 6's
    uniform weights back in, (1 - F) w + F, so every prompt still learns a little from every example. Returns (total, parts) with parts the detached scalar terms.
    """
    if lambda_con is None or lambda_sel is None:
        raise ValueError("lambda_con and lambda_sel are unset: the authors' recipe sets them for the model's family "
                         "once the model is loaded (train.resolve_recipe)")
    prompt_losses = soft_prompt_losses(target_logprobs, target_mask)  # (B, K)
    if nll_reduction == "sum":
        weights = prompt_nll_weights(nll_weights, prompt_losses, scores, tau_g, tau_s)  # (B, K)
        weights = (1 - uniform_share) * weights + uniform_share
        total = (weights * prompt_losses).mean(0).sum()
    elif nll_weights == "uniform":  # mixing uniform weights with uniform weights changes nothing
        total = pooled_nll(target_logprobs, target_mask)
    else:
        raise ValueError(f"nll_weights {nll_weights!r} weighs Eq. 6's sum over prompts: it needs nll_reduction 'sum'")
    parts = {"nll": total.detach()}
    if lambda_con:
        parts["con"] = contrastive_loss(scores if pair_scores is None else pair_scores, bleu, threshold, con_reduction)
        total = total + lambda_con * parts["con"]
    if lambda_sel:
        parts["sel"] = selection_loss(scores, prompt_losses, tau_g, feedback_noise, tau_s)
        total = total + lambda_sel * parts["sel"]
    if lambda_fusion:
        if fused_logprobs is None:
            parts["fusion"] = fusion_loss(target_logprobs, target_mask)
        else:
            parts["fusion"] = fused_nll(fused_logprobs, target_mask)
        total = total + lambda_fusion * parts["fusion"]
    return total, {name: value.detach() for name, value in parts.items()}
