"""Training losses over real (non-padding) positions.

Every sampled loss takes the positive logits (P,) and the negative logits (P, k) of the P real
positions of a batch, so padding never contributes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bce_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """SASRec / GenNi binary cross-entropy: -log σ(s+) - Σ_k log(1 - σ(s-_k)), averaged over positions.

    Args:
        pos_logits: (P,) float32.
        neg_logits: (P, k) float32.
    """
    loss = F.softplus(-pos_logits) + F.softplus(neg_logits).sum(dim=1)
    return loss.mean()


def sampled_softmax_loss(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    neg_log_q: torch.Tensor | None = None,
    pos_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy over {positive} ∪ k sampled negatives, with optional logQ correction.

    With the correction, each negative's logit s_j becomes s_j - log(k·q(j)) (Bengio & Senécal; Jean et
    al. 2015): then exp(s+) + Σ_j exp(s_j)/(k·q(j)) estimates the full partition function without bias
    when the k negatives are drawn from q. The positive is never drawn (samplers exclude it), so it is
    left uncorrected unless ``pos_log_q`` is given.

    Args:
        pos_logits: (P,) float32.
        neg_logits: (P, k) float32.
        neg_log_q: (P, k) log proposal probability of each negative, or None for no correction.
        pos_log_q: (P,) log q of the positive under the same proposal (None: no correction on it).
    """
    if neg_log_q is not None:
        neg_logits = neg_logits - neg_log_q - math.log(neg_logits.shape[1])
    if pos_log_q is not None:
        pos_logits = pos_logits - pos_log_q
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)  # (P, 1 + k)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def corrected_logq_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_log_q: torch.Tensor
) -> torch.Tensor:
    """Sampled softmax with the corrected logQ of Khrylchenko et al. (RecSys 2025, "Correcting the
    LogQ Correction: Revisiting Sampled Softmax for Large-Scale Retrieval", arXiv 2507.09331).

    The full-softmax gradient is -(1 - p₊)·∇s₊ + Σ_{j≠+} p_j·∇s_j, p the softmax over every item.
    The standard correction estimates it with the positive inside a Monte-Carlo denominator, but
    the positive is always present, never sampled. Splitting it out, Σ_{j≠+} p_j·∇s_j is
    (1 - p₊) times an expectation over the negatives, which self-normalised importance sampling
    from q estimates; per position the loss is

        w · (-s₊ + log Σ_j exp(s_j - log(k·q_j))),   w = stopgrad(1 - p̂₊),
        p̂₊ = exp(s₊) / (exp(s₊) + Σ_j exp(s_j - log(k·q_j))),

    over the k negatives j: the positive is not in the denominator, and the weight w is the
    model's estimated probability of ranking something else first (its sum over j/k·q_j is the
    unbiased estimate of the partition function without the positive). The authors' code
    (github.com/NonameUntitled/logq, ``train_in_batch_logq_new.py``) has this form; there the
    denominator's sum takes s_j - log q_j, which differs from the log(k·q_j) here by the
    constant log k (same gradient, loss shifted by w·log k). The value can be negative, since
    the positive is not in the denominator.

    Args:
        pos_logits: (P,) float32.
        neg_logits: (P, k) float32.
        neg_log_q: (P, k) log proposal probability of each negative (it must be the probability
            the negative was drawn with: the correction is meaningless without it).
    """
    corrected = neg_logits - neg_log_q - math.log(neg_logits.shape[1])  # (P, k)
    log_negatives = torch.logsumexp(corrected, dim=1)  # (P,)
    with torch.no_grad():
        # 1 - p̂₊ = σ(log Σ_j exp(s_j - log(k q_j)) - s₊), computed without cancellation
        weight = torch.sigmoid(log_negatives - pos_logits)
    return (weight * (log_negatives - pos_logits)).mean()


def scaled_ce_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, scale: float
) -> torch.Tensor:
    """Scaled cross-entropy (SCE) of Xu et al. 2024 ("Understanding the Role of Cross-Entropy Loss
    in Fairly Evaluating Large Language Model-based Recommendation", arXiv 2408.14238).

    Softmax cross-entropy over {positive} ∪ k negatives whose sum is multiplied by α = ``scale``:
    -s₊ + log(exp(s₊) + α·Σ_j exp(s_j)), i.e. every negative logit is shifted by log α. With
    uniform negatives over N allowed items this is the logQ-corrected sampled softmax with the
    constant N/k replaced by α; the paper shows α > 1 tightens the bound sampled softmax gives on
    full cross-entropy. The authors' runs (github.com/MTandHJ/CE-SCE-LLMRec, SASRec on Beauty)
    use α = 100 with 500 negatives drawn uniformly from the whole catalog; here they come from the
    configured sampler, which never draws the positive or (by default) the user's history. No
    proposal probability is read.

    Args:
        pos_logits: (P,) float32.
        neg_logits: (P, k) float32.
        scale: α > 0.
    """
    logits = torch.cat([pos_logits[:, None], neg_logits + math.log(scale)], dim=1)  # (P, 1 + k)
    return (torch.logsumexp(logits, dim=1) - pos_logits).mean()


def gbce_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, n_items: int, t: float = 0.75
) -> torch.Tensor:
    """gSASRec's generalised BCE (Petrov & Macdonald, 2023).

    The positive probability is raised to β = α(t(1 - 1/α) + 1/α) with α = k / (N - 1), which counteracts
    the overconfidence BCE learns from few negatives. ``log σ(s)^β = β · log σ(s)``.

    Args:
        pos_logits: (P,), neg_logits: (P, k), n_items: catalog size N, t: calibration in [0, 1].
    """
    k = neg_logits.shape[1]
    alpha = k / max(n_items - 1, 1)
    beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
    loss = beta * F.softplus(-pos_logits) + F.softplus(neg_logits).sum(dim=1)
    return loss.mean()


def full_ce_loss(
    h: torch.Tensor, item_embeddings: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Full softmax cross-entropy over every item (the quality ceiling on small catalogs).

    Padding (row 0) is excluded from the softmax. Positions are processed in chunks so the
    (P, N) logit matrix never exceeds ``chunk_size`` rows at a time.

    Args:
        h: (P, d) hidden states of real positions.
        item_embeddings: (N+1, d) item table, row 0 padding.
        targets: (P,) int64 target ids in 1..N.
    """
    items = item_embeddings[1:]  # (N, d)
    total = h.new_zeros(())
    for start in range(0, h.shape[0], chunk_size):
        logits = h[start : start + chunk_size] @ items.T  # (p, N)
        total = total + F.cross_entropy(
            logits, targets[start : start + chunk_size] - 1, reduction="sum"
        )
    return total / max(h.shape[0], 1)
