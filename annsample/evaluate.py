"""Full-ranking evaluation: rank each target against every item, history and padding masked.

Scores are streamed over user chunks and item chunks, so memory stays bounded at any catalog size.

**Ties are broken at random, in expectation.** For each target the evaluation counts the allowed
items that score strictly higher (``higher``) and those that tie with it (``ties``); the target's
rank is then uniform over ``higher .. higher + ties`` and HR@k / NDCG@k are their expected values
under that random tie-breaking. A model whose scores are all equal therefore ranks at chance
(HR@k = k / n_allowed), neither in the target's favour nor against it. Two scores tie when they
differ by less than the float32 rounding error of a d-term dot product (the chunked matmul and a
single dot product round differently, so exact equality would split genuine ties).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

KS = (5, 10, 20)


class Ranks(NamedTuple):
    """Where each target lands: ``higher`` allowed items score above it, ``ties`` score the same.

    Both are (C,) int64 arrays (numpy or torch). The 0-based rank under random tie-breaking is
    uniform over ``higher .. higher + ties``; :attr:`expected` is its mean.
    """

    higher: np.ndarray
    ties: np.ndarray

    @property
    def expected(self) -> np.ndarray:
        """(C,) float64 expected 0-based rank under random tie-breaking."""
        return np.asarray(self.higher, dtype=np.float64) + 0.5 * np.asarray(self.ties)


def _split(ranks) -> tuple[np.ndarray, np.ndarray]:
    """(higher, ties) float64 arrays from :class:`Ranks` or plain 0-based ranks (no ties)."""
    if isinstance(ranks, Ranks):
        return np.asarray(ranks.higher, dtype=np.float64), np.asarray(ranks.ties, dtype=np.float64)
    higher = np.asarray(ranks, dtype=np.float64)
    return higher, np.zeros_like(higher)


def hit_rate(ranks, k: int) -> float:
    """HR@k: expected share of targets ranked in the top k (0-based ranks, or :class:`Ranks`)."""
    higher, ties = _split(ranks)
    return float(np.mean(np.clip(k - higher, 0.0, ties + 1.0) / (ties + 1.0)))


def _gain_prefix(k: int) -> np.ndarray:
    """G[r] = sum of 1 / log2(i + 2) for i < r, r = 0..k."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])


def ndcg(ranks, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 2) if rank < k else 0, in expectation over
    random tie-breaking, averaged over targets."""
    higher, ties = _split(ranks)
    prefix = _gain_prefix(k)
    lo = np.minimum(higher, k).astype(np.int64)
    hi = np.minimum(higher + ties + 1.0, k).astype(np.int64)
    return float(np.mean((prefix[hi] - prefix[lo]) / (ties + 1.0)))


def metrics_from_ranks(ranks, ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@k and NDCG@k for every k, keyed like ``{"hr@10": ..., "ndcg@10": ...}``.

    ``ranks`` is a :class:`Ranks` (expected metrics under random tie-breaking) or plain 0-based ranks.
    """
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
) -> Ranks:
    """How many allowed items score above each target, and how many tie with it.

    Args:
        h: (C, d) query hidden states.
        item_embeddings: (N+1, d), row 0 padding.
        targets: (C,) int64 target ids in 1..N.
        history: (C, H) int64 items to mask per row (values outside 1..N are ignored). The target
            itself is never masked, even if it occurs in the history.
    Returns:
        :class:`Ranks` of (C,) int64 tensors ``higher`` and ``ties`` (the target not counted).
    """
    C, d = h.shape
    N = item_embeddings.shape[0] - 1
    rows = torch.arange(C, device=h.device)
    target_emb = item_embeddings[targets]
    # The target's score in float64; the chunked float32 matmul is within gamma_d * |h| * |e_j| of
    # the exact score (gamma_d = d * u / (1 - d * u), u = 2^-24), so scores that close are ties.
    target_score = (h.double() * target_emb.double()).sum(dim=1)  # (C,)
    unit = 2.0**-24
    gamma = d * unit / (1.0 - d * unit)
    max_norm = (
        item_embeddings[1:].norm(dim=1).max().double()
        if N
        else h.new_zeros((), dtype=torch.float64)
    )
    tolerance = 2.0 * gamma * h.double().norm(dim=1) * max_norm  # (C,)
    lower = (target_score - tolerance).float()[:, None]
    upper = (target_score + tolerance).float()[:, None]
    higher = torch.zeros(C, dtype=torch.int64, device=h.device)
    within = torch.zeros(C, dtype=torch.int64, device=h.device)
    history = torch.where(history == targets[:, None], 0, history)
    for start in range(1, N + 1, item_chunk):
        end = min(start + item_chunk, N + 1)
        scores = h @ item_embeddings[start:end].T  # (C, chunk)
        inside = (history >= start) & (history < end)
        scores[rows[:, None].expand_as(history)[inside], history[inside] - start] = float("-inf")
        in_chunk = (targets >= start) & (targets < end)
        scores[rows[in_chunk], targets[in_chunk] - start] = float("-inf")
        above = scores > upper
        higher += above.sum(dim=1)
        within += ((scores >= lower) & ~above).sum(dim=1)
    return Ranks(higher, within)


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
) -> tuple[dict[str, float], Ranks]:
    """Full-ranking HR@k / NDCG@k of next-item prediction from the last position (ties broken at
    random, in expectation: see the module docstring).

    Args:
        encode: maps (B, T) int64 ids to (B, T, d) hidden states (e.g. ``model.encode``, in eval mode).
        item_embeddings: (N+1, d).
        inputs: (U, T) int64 right-aligned input sequences; targets: (U,) int64.
        history_indptr, history_items: CSR of items to mask for each user.
        users: rows to evaluate (default all), e.g. a fixed random subset on huge catalogs.
    Returns:
        metrics dict and the :class:`Ranks` (numpy) of the evaluated rows, in ``users`` order.
    """
    from tqdm.auto import tqdm

    from annsample.data import pad_rows

    n_items = item_embeddings.shape[0] - 1
    users = np.arange(inputs.shape[0]) if users is None else np.asarray(users)
    higher = np.zeros(inputs.shape[0], dtype=np.int64)
    ties = np.zeros(inputs.shape[0], dtype=np.int64)
    # the (users, items) score block of one chunk: ~4 MB on CPU, where a 64-134 MB block ran 5x
    # slower (cache misses and fresh pages: 10.1 against 2.3 s for 500 users x 1M items, one
    # thread); large on a GPU
    block = 1 << 25 if torch.device(device).type == "cuda" else 1 << 20
    item_chunk = max(1024, block // max(min(batch_size, len(users)), 1))
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
        counts = rank_targets(h, item_embeddings, tgt, hist, item_chunk)
        higher[rows] = counts.higher.cpu().numpy()
        ties[rows] = counts.ties.cpu().numpy()
    ranks = Ranks(higher[users], ties[users])
    return metrics_from_ranks(ranks, ks), ranks


def eval_users(n_users: int, count: int, seed: int) -> np.ndarray | None:
    """A fixed random subset of ``count`` users to evaluate (None = all users)."""
    if not count or count >= n_users:
        return None
    return np.sort(np.random.default_rng(seed + 3).choice(n_users, size=count, replace=False))


def evaluate_model(
    model: Any,
    prepared: Any,
    stage: str,
    config: Any,
    device: torch.device,
    user_count: int | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of a SASRec ``model`` on the validation or test targets of
    ``prepared`` (:class:`annsample.prepare.Prepared`), in eval mode and without gradients.

    ``user_count`` overrides ``train.eval_users`` (the fixed user subset; 0 = all users).
    """
    from annsample import data as data_mod

    split = prepared.split
    inputs, targets = data_mod.eval_tensors(split, stage, config.data.max_len)
    indptr, items = data_mod.history_csr(split, stage)
    was_training = model.training
    model.eval()
    try:
        metrics, _ = evaluate_ranking(
            model.encode,
            model.item_embeddings,
            inputs,
            targets,
            indptr,
            items,
            batch_size=config.train.eval_batch_size,
            device=device,
            users=eval_users(
                split.n_users,
                config.train.eval_users if user_count is None else user_count,
                config.seed,
            ),
        )
    finally:
        model.train(was_training)
    return metrics


def oracle_results(prepared: Any, config: Any, test: dict[str, float]) -> dict[str, Any]:
    """The synthetic catalog's oracle on the same test users, and the model's share of it."""
    from annsample import data as data_mod
    from annsample.synthetic import oracle_metrics

    split = prepared.split
    inputs, targets = data_mod.eval_tensors(split, "test", config.data.max_len)
    indptr, items = data_mod.history_csr(split, "test")
    users = eval_users(split.n_users, config.train.eval_users, config.seed)
    oracle, _ = oracle_metrics(prepared.catalog, inputs, targets, indptr, items, users)
    fraction = {
        key: (test[key] / oracle[key] if oracle[key] else 0.0) for key in ("ndcg@10", "hr@10")
    }
    logger.info(
        "oracle: ndcg@10 %.4f hr@10 %.4f; the model reaches %.2f / %.2f of it",
        oracle["ndcg@10"],
        oracle["hr@10"],
        fraction["ndcg@10"],
        fraction["hr@10"],
    )
    return {"oracle": oracle, "fraction_of_oracle": fraction}
