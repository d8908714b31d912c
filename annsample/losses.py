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
