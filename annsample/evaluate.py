"""Full-ranking evaluation: rank each target against every item, history and padding masked.

Scores are streamed over user chunks and item chunks, so memory stays bounded at any catalog size.
A target's rank is the number of allowed items that score strictly higher than it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

KS = (5, 10, 20)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """HR@k: share of targets ranked in the top k (ranks are 0-based)."""
    return float(np.mean(np.asarray(ranks) < k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) if rank < k else 0, averaged."""
    ranks = np.asarray(ranks, dtype=np.float64)
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(np.mean(gains))


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@k and NDCG@k for every k, keyed like ``{"hr@10": ..., "ndcg@10": ...}``."""
    out = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    return out


@torch.no_grad()
def rank_targets(
    h: torch.Tensor,
    item_embeddings: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor,
    item_chunk: int = 1 << 16,
) -> torch.Tensor:
    """0-based rank of each target among all items, padding and history masked to -inf.

    Args:
        h: (C, d) query hidden states.
        item_embeddings: (N+1, d), row 0 padding.
        targets: (C,) int64 target ids in 1..N.
        history: (C, H) int64 items to mask per row (values outside 1..N are ignored). The target
            itself is never masked, even if it occurs in the history.
    Returns:
        (C,) int64 ranks.
    """
    C = h.shape[0]
    N = item_embeddings.shape[0] - 1
    rows = torch.arange(C, device=h.device)
    target_emb = item_embeddings[targets]
    target_score = (h * target_emb).sum(dim=1)  # (C,)
    # The chunked matmul and this dot product round differently; scores within float noise of
    # the target's count as ties (not higher), so items tied with the target never outrank it.
    noise = 1e-5 * h.norm(dim=1) * target_emb.norm(dim=1)
    threshold = target_score + noise
    rank = torch.zeros(C, dtype=torch.int64, device=h.device)
    history = torch.where(history == targets[:, None], 0, history)
    for start in range(1, N + 1, item_chunk):
        end = min(start + item_chunk, N + 1)
        scores = h @ item_embeddings[start:end].T  # (C, chunk)
        inside = (history >= start) & (history < end)
        scores[rows[:, None].expand_as(history)[inside], history[inside] - start] = float("-inf")
        in_chunk = (targets >= start) & (targets < end)
        scores[rows[in_chunk], targets[in_chunk] - start] = float("-inf")
        rank += (scores > threshold[:, None]).sum(dim=1)
    return rank


@torch.no_grad()
def evaluate_ranking(
    encode: Callable[[torch.Tensor], torch.Tensor],
    item_embeddings: torch.Tensor,
    inputs: np.ndarray,
    targets: np.ndarray,
    history_indptr: np.ndarray,
    history_items: np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    ks: Sequence[int] = KS,
    show_progress: bool = False,
    users: np.ndarray | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Full-ranking HR@k / NDCG@k of next-item prediction from the last position.

    Args:
        encode: maps (B, T) int64 ids to (B, T, d) hidden states (e.g. ``model.encode``, in eval mode).
        item_embeddings: (N+1, d).
        inputs: (U, T) int64 right-aligned input sequences; targets: (U,) int64.
        history_indptr, history_items: CSR of items to mask for each user.
        users: rows to evaluate (default all), e.g. a fixed random subset on huge catalogs.
    Returns:
        metrics dict and the ranks of the evaluated rows (in ``users`` order).
    """
    from tqdm.auto import tqdm

    from annsample.data import pad_rows

    n_items = item_embeddings.shape[0] - 1
    users = np.arange(inputs.shape[0]) if users is None else np.asarray(users)
    ranks = np.empty(inputs.shape[0], dtype=np.int64)
    item_chunk = max(1024, (1 << 25) // max(batch_size, 1))
    # users in order of length, so each chunk can drop its common left padding
    lengths = np.maximum((inputs[users] > 0).sum(axis=1), 1)
    by_length = users[np.argsort(lengths, kind="stable")]
    starts = range(0, len(users), batch_size)
    for start in tqdm(starts, desc="evaluate", leave=False, disable=not show_progress):
        rows = by_length[start : start + batch_size]
        width = int(max((inputs[rows] > 0).sum(axis=1).max(), 1))
        seq = torch.as_tensor(inputs[rows, -width:], device=device)
        h = encode(seq)[:, -1, :]  # (C, d)
        hist = torch.as_tensor(
            pad_rows(history_indptr, history_items, rows, n_items + 1), device=device
        )
        tgt = torch.as_tensor(targets[rows], device=device)
        ranks[rows] = rank_targets(h, item_embeddings, tgt, hist, item_chunk).cpu().numpy()
    ranks = ranks[users]
    return metrics_from_ranks(ranks, ks), ranks
