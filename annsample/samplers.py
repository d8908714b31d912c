"""Negative samplers: uniform, popularity, the model-aware GenNi family (exact, pool, dns, ann), and
the batch's own positives (in_batch, mixed with uniform, and TRON's top-k of both).

Every sampler draws ``k`` negatives for each of P real positions and returns their ids with the log
proposal probability log q(j). Samplers take tensors (hidden states, the item table), never an
``nn.Module``, and all randomness comes from an explicit ``torch.Generator``.

Exclusions are never sampled: padding (id 0), the position's positive, and (by default) every item in
the user's training history. Model-aware samplers draw from p(j | h) ∝ exp(α · h·e_j) over the
allowed items (GenNi), exactly or through a proposal whose probabilities are known.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from annsample.config import SAMPLER_NAMES, SamplerConfig
from annsample.errors import SamplerError


@dataclass(frozen=True)
class Negatives:
    """Sampled negatives for P positions.

    Attributes:
        ids: (P, k) int64 item ids in 1..N.
        log_q: (P, k) float32 log proposal probability of each id for that position. Exact for
            ``uniform``, ``popularity``, ``exact`` and ``ann`` without a tail. ``ann`` with
            ``tail_samples``: log[(1-ε)·exp(α·s_j)/W + ε/n_allowed], W the call's normaliser (an
            unbiased estimate of the GenNi partition function Z from the shared tail draw):
            neither the conditional nor the marginal probability, but what keeps
            Σ exp(α·s_j)/q_j unbiased for Z (see :class:`AnnSampler`). ``pool``: conditional on
            the shared pool; ``in_batch``: conditional on the batch's positives; ``mixed``: the
            in-batch / uniform mixture (see :class:`MixedSampler`); ``dns`` and ``tron``: zeros
            (a top-k choice has no proposal probability).
    """

    ids: torch.Tensor
    log_q: torch.Tensor


class Exclusions:
    """The items each position may not draw: padding, its positive, and its row's history.

    Args:
        history: (R, H) int64, row r lists the items excluded for sequence r, in any order,
            repeats allowed; values outside 1..n_items (0, negatives, anything > n_items) are
            padding. ``H`` may be 0. Rows are normalised to sorted, unique, right-padded.
        row: (P,) int64, the history row of each position (which sequence it belongs to), in [0, R).
        positives: (P,) int64 positive item of each position, in 1..n_items.
        n_items: catalog size N.

    Raises:
        SamplerError: wrong shapes or dtypes, a row outside [0, R), a positive outside 1..N.
    """

    def __init__(
        self, history: torch.Tensor, row: torch.Tensor, positives: torch.Tensor, n_items: int
    ) -> None:
        _check_exclusion_inputs(history, row, positives, n_items)
        R, H = history.shape
        self.n_items = n_items
        self.row = row
        self.positives = positives
        self.n_rows = R
        device = history.device
        history = _normalise_history(history, n_items)
        if H == 0:
            history = torch.full((R, 1), n_items + 1, dtype=torch.int64, device=device)
            H = 1
        self.history = history
        self._width = H
        self._stride = n_items + 2
        base = torch.arange(R, device=device)[:, None] * self._stride
        # One globally sorted key array lets a single searchsorted answer per-row membership.
        self._keys = (base + history).reshape(-1)
        real = history <= n_items
        self.row_counts = real.sum(dim=1)  # (R,)
        # allowed items below history[r, i] = history[r, i] - 1 - i; padding maps past every rank.
        free_below = torch.where(
            real,
            history - 1 - torch.arange(H, device=device)[None, :],
            torch.full_like(history, n_items),
        )
        self._rank_keys = (base + free_below).reshape(-1)
        self.positive_in_history = self._in_history(positives[:, None], row)[:, 0]
        # number of distinct items in 1..N that position p may not draw
        self.counts = self.row_counts[row] + (~self.positive_in_history).long()

    @classmethod
    def from_positives(cls, positives: torch.Tensor, n_items: int) -> Exclusions:
        """Exclude only each position's positive (no history)."""
        P = positives.shape[0]
        history = torch.empty((P, 0), dtype=torch.int64, device=positives.device)
        return cls(history, torch.arange(P, device=positives.device), positives, n_items)

    def _in_history(self, ids: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        query = row[:, None] * self._stride + ids  # (P, m)
        found = torch.searchsorted(self._keys, query.reshape(-1)).clamp_(max=self._keys.numel() - 1)
        return (self._keys[found] == query.reshape(-1)).view_as(ids)

    def row_keys(self, ids: torch.Tensor) -> torch.Tensor:
        """(R, m) keys of per-row ids (R, m) in the order of the history keys: ascending overall
        when each row of ``ids`` is (ids below 1 count as 0, which no history holds)."""
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        return rows * self._stride + ids.clamp(min=0)

    def history_hits(self, sorted_keys: torch.Tensor) -> torch.Tensor:
        """(n,) bool: True where ``sorted_keys`` (ascending, from :meth:`row_keys`) is in its row's
        history. One look-up per history entry (R·H), not per key: cheaper when the keys outnumber
        the history, as a batch's candidates do."""
        out = torch.zeros(sorted_keys.shape, dtype=torch.bool, device=sorted_keys.device)
        if sorted_keys.numel():
            at = torch.searchsorted(sorted_keys, self._keys).clamp_(max=sorted_keys.numel() - 1)
            hit = sorted_keys[at] == self._keys
            out[at[hit]] = True  # a repeated key is marked once: callers pass distinct ids per row
        return out

    def contains(self, ids: torch.Tensor) -> torch.Tensor:
        """(P, m) bool: True where ``ids`` (P, m) are excluded for their position (padding included)."""
        return (
            (ids <= 0)
            | (ids > self.n_items)
            | (ids == self.positives[:, None])
            | self._in_history(ids, self.row)
        )

    @property
    def n_allowed(self) -> torch.Tensor:
        """(P,) int64 number of items each position may draw."""
        return self.n_items - self.counts

    def check_nonempty(self) -> None:
        """Raise a clear error if some position has no item left to draw."""
        empty = self.n_allowed <= 0
        if bool(empty.any()):
            count = int(empty.sum())
            raise SamplerError(
                f"{count} position(s) belong to users who have interacted with all {self.n_items} "
                "items, so no negative can be drawn; drop those users from the dataset or set "
                "sampler.exclude_history=false"
            )

    def _rank_to_item_in_row(self, rank: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """The rank-th (0-based) item of 1..N that is not in the row's history."""
        query = row[:, None] * self._stride + rank
        below = torch.searchsorted(self._rank_keys, query.reshape(-1), right=True).view_as(rank)
        below = below - row[:, None] * self._width  # history items lying below the answer
        return rank + 1 + below

    def rank_to_item(
        self, rank: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Map ranks (P, m) in [0, n_allowed) to the allowed items of each position, in id order.

        With ``positions`` (n,), rank is (n, m) and row i belongs to position ``positions[i]``.
        """
        row, positives, in_history = self.row, self.positives, self.positive_in_history
        if positions is not None:
            row, positives = row[positions], positives[positions]
            in_history = in_history[positions]
        item = self._rank_to_item_in_row(rank, row)
        # when the positive is not in the history, skip over it as well
        shift = (~in_history)[:, None] & (item >= positives[:, None])
        if bool(shift.any()):
            item = torch.where(shift, self._rank_to_item_in_row(rank + 1, row), item)
        return item

    def select(self, positions: torch.Tensor) -> Exclusions:
        """The exclusions of the positions ``positions`` (n,) only, in that order; the histories
        (one per row) are shared, not copied."""
        out = copy.copy(self)
        out.row = self.row[positions]
        out.positives = self.positives[positions]
        out.positive_in_history = self.positive_in_history[positions]
        out.counts = self.counts[positions]
        return out

    def dense_mask(self) -> torch.Tensor:
        """(P, N+1) bool, True where excluded. Only for small catalogs (tests, probes)."""
        P = self.row.shape[0]
        mask = torch.zeros(P, self.n_items + 2, dtype=torch.bool, device=self.row.device)
        mask.scatter_(1, self.history[self.row], True)
        mask[:, 0] = True
        mask[torch.arange(P, device=mask.device), self.positives] = True
        return mask[:, : self.n_items + 1]


def _check_exclusion_inputs(
    history: torch.Tensor, row: torch.Tensor, positives: torch.Tensor, n_items: int
) -> None:
    """Raise SamplerError unless the Exclusions inputs have the documented shapes and ranges."""
    for name, x, dim in (("history", history, 2), ("row", row, 1), ("positives", positives, 1)):
        if not isinstance(x, torch.Tensor) or x.dim() != dim or x.dtype != torch.int64:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise SamplerError(
                f"Exclusions {name} must be a {dim}-D int64 tensor, got {got}; convert with .long()"
            )
    if row.shape != positives.shape:
        raise SamplerError(
            f"Exclusions row {tuple(row.shape)} and positives {tuple(positives.shape)} must have "
            "one entry per position each"
        )
    if row.numel() and (int(row.min()) < 0 or int(row.max()) >= history.shape[0]):
        raise SamplerError(
            f"Exclusions row holds {int(row.min())}..{int(row.max())} but history has "
            f"{history.shape[0]} rows; each position's row must index history"
        )
    if positives.numel() and (int(positives.min()) < 1 or int(positives.max()) > n_items):
        raise SamplerError(
            f"Exclusions positives hold {int(positives.min())}..{int(positives.max())} but item ids "
            f"run from 1 to n_items={n_items} (0 is padding); pass only real positions"
        )


def _normalise_history(history: torch.Tensor, n_items: int) -> torch.Tensor:
    """(R, H) rows sorted ascending, each item once, padded on the right with n_items + 1."""
    pad = n_items + 1
    history = torch.where((history < 1) | (history > n_items), pad, history)
    if history.shape[1] < 2:
        return history
    history = history.sort(dim=1).values
    repeat = torch.zeros_like(history, dtype=torch.bool)
    repeat[:, 1:] = (history[:, 1:] == history[:, :-1]) & (history[:, 1:] <= n_items)
    if bool(repeat.any()):
        history = history.masked_fill(repeat, pad).sort(dim=1).values
    return history


def _rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` for int64 ids of any shape, (..., d). ``index_select`` is ~25x faster than
    advanced indexing (``aten::index``) on CPU for a 1M-row table (31 against 1.3 ms for 51k
    rows of 64 floats, one thread)."""
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.shape[1])


def _uniform_int(high: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """(P, m) int64 uniform in [0, high_p) for each row p."""
    u = torch.rand(high.shape[0], m, generator=generator, device=high.device, dtype=torch.float64)
    return torch.minimum((u * high[:, None]).long(), high[:, None] - 1)


def sample_from_logits(
    logits: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw k slots per row ∝ exp(logits) (inverse CDF; -inf slots are never drawn).

    Args:
        logits: (P, M) float, at least one finite entry per row.
    Returns:
        slots (P, k) int64 and their log probabilities (P, k) float32.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    cdf = log_p.double().exp().cumsum(dim=1)
    u = torch.rand(
        logits.shape[0], k, generator=generator, device=logits.device, dtype=torch.float64
    )
    slots = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=logits.shape[1] - 1)
    # float rounding can land on a zero-probability slot at the end; step back to the last real one
    chosen = log_p.gather(1, slots)
    if bool(torch.isinf(chosen).any()):
        last_real = (
            torch.isfinite(log_p) * torch.arange(1, logits.shape[1] + 1, device=logits.device)
        ).argmax(1)
        slots = torch.where(torch.isinf(chosen), last_real[:, None], slots)
        chosen = log_p.gather(1, slots)
    return slots, chosen


class Sampler(Protocol):
    """What the training loop needs from a sampler."""

    name: str
    model_aware: bool  # needs hidden states and item embeddings
    # optional, False when absent: a position's draws do not depend on the other positions of
    # the call (not so for the in-batch samplers), so a subset of positions may be sampled alone
    per_position: bool
    exact_log_q: bool  # log_q fits a logQ correction: Σ exp(α·s_j) / q_j is unbiased for Z

    def sample(
        self,
        queries: torch.Tensor,
        item_embeddings: torch.Tensor,
        exclusions: Exclusions,
        k: int,
        generator: torch.Generator,
        sequence_queries: torch.Tensor | None = None,
    ) -> Negatives: ...


class BlendSampler:
    """A gradual hand-over between two samplers: each negative comes from ``first`` with
    probability ``share`` and from ``second`` otherwise (one coin per negative).

    The trainer uses it after ``sampler.warmup_steps`` for ``sampler.warmup_blend_steps`` steps,
    lowering ``share`` from 1 to 0, so a model trained on warm-up negatives is not handed all at
    once to a model-aware sampler (docs/results.md measured such a switch drop validation NDCG@10).
    ``log_q`` of each negative is the log q of the sampler that drew it, not of the blend
    (``exact_log_q`` is False): fine for BCE and gBCE, which do not read it. The coins are
    tossed first, and a sampler whose draws for one position do not depend on the others
    (``per_position``) is called only for the positions that need it: at k = 1 and share 0.5 the
    costly sampler serves half the positions instead of all of them.

    Args:
        first, second: the samplers blended (e.g. popularity, then ann).
        share: probability in [0, 1] that a negative comes from ``first``.
    """

    name = "blend"
    exact_log_q = False

    def __init__(self, first: Sampler, second: Sampler, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise SamplerError(f"blend share must be in [0, 1], got {share}")
        self.first, self.second, self.share = first, second, share
        self.model_aware = first.model_aware or second.model_aware

    def sample(
        self,
        queries: torch.Tensor,
        item_embeddings: torch.Tensor,
        exclusions: Exclusions,
        k: int,
        generator: torch.Generator,
        sequence_queries: torch.Tensor | None = None,
    ) -> Negatives:
        exclusions.check_nonempty()
        P = exclusions.row.shape[0]
        from_first = torch.rand((P, k), generator=generator, device=generator.device) < self.share
        from_first = from_first.to(exclusions.row.device)
        ids = torch.zeros(P, k, dtype=torch.int64, device=exclusions.row.device)
        log_q = torch.zeros(P, k, device=exclusions.row.device)
        for sampler, take in ((self.first, from_first), (self.second, ~from_first)):
            needed = take.any(dim=1)  # positions with at least one negative from this sampler
            if not bool(needed.any()):
                continue
            if bool(needed.all()) or not getattr(sampler, "per_position", False):
                out = sampler.sample(
                    queries, item_embeddings, exclusions, k, generator, sequence_queries
                )
                ids, log_q = torch.where(take, out.ids, ids), torch.where(take, out.log_q, log_q)
                continue
            # only the positions that need this sampler pay for it (its draws for one position
            # do not depend on the others)
            at = needed.nonzero()[:, 0]
            out = sampler.sample(
                None if queries is None else queries[at],
                item_embeddings,
                exclusions.select(at),
                k,
                generator,
                sequence_queries,
            )
            ids[at] = torch.where(take[at], out.ids, ids[at])
            log_q[at] = torch.where(take[at], out.log_q, log_q[at])
        return Negatives(ids, log_q)


class UniformSampler:
    """Uniform over the allowed items (the SASRec baseline): q(j) = 1 / (N - |excluded|).

    Exact, with no rejection loop: a uniform rank among the allowed items is mapped to its item
    through the sorted history, so users who have seen most of the catalog cost nothing extra.
    """

    name = "uniform"
    model_aware = False
    exact_log_q = True
    per_position = True

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        n_allowed = exclusions.n_allowed
        ids = exclusions.rank_to_item(_uniform_int(n_allowed, k, generator))
        log_q = (-torch.log(n_allowed.float()))[:, None].expand(-1, k).contiguous()
        return Negatives(ids, log_q)

    def probabilities(self, queries, item_embeddings, exclusions) -> torch.Tensor:
        """(P, N+1) exact proposal probabilities (small catalogs only)."""
        allowed = ~exclusions.dense_mask()
        return allowed.float() / allowed.sum(1, keepdim=True)


class PopularitySampler:
    """q(j) ∝ (count_j + 1)^β over the allowed items (+1 keeps items unseen in training reachable).

    Draws from the catalog-wide distribution and redraws excluded picks; rows still rejected after a
    few rounds (users whose history holds most of the mass) are drawn exactly from their own row.

    Args:
        counts: (N+1,) training interaction count of each item (row 0 = padding, ignored).
        beta: popularity exponent (0 = uniform, 1 = proportional to popularity).
    """

    name = "popularity"
    model_aware = False
    exact_log_q = True
    per_position = True

    def __init__(self, counts: np.ndarray | torch.Tensor, beta: float = 1.0, max_rounds: int = 16):
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
        weights = (counts + 1.0) ** beta
        weights[0] = 0.0
        # one extra zero slot so history padding (id N+1) gathers weight 0
        self.weights = torch.cat([weights, weights.new_zeros(1)])
        self.total = float(weights.sum())
        self.max_rounds = max_rounds

    def _row_mass(self, exclusions: Exclusions) -> torch.Tensor:
        w = self.weights.to(exclusions.row.device)
        excluded = w[exclusions.history].sum(1)[exclusions.row]
        excluded = excluded + torch.where(
            exclusions.positive_in_history, 0.0, w[exclusions.positives]
        )
        return self.total - excluded  # (P,) float64

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        device = exclusions.row.device
        w = self.weights.to(device)
        P = exclusions.row.shape[0]
        ids = torch.zeros(P, k, dtype=torch.int64, device=device)
        todo = torch.ones(P, k, dtype=torch.bool, device=device)
        for _ in range(self.max_rounds):
            n = int(todo.sum())
            if n == 0:
                break
            draws = torch.multinomial(w, max(n, 2), replacement=True, generator=generator)[:n]
            ids[todo] = draws
            todo = todo & exclusions.contains(ids)
        if bool(todo.any()):
            rows = todo.any(1).nonzero()[:, 0]
            sub = Exclusions(
                exclusions.history,
                exclusions.row[rows],
                exclusions.positives[rows],
                exclusions.n_items,
            )
            row_w = w[: exclusions.n_items + 1].expand(rows.shape[0], -1).clone()
            row_w[sub.dense_mask()] = 0.0
            redraw = torch.multinomial(row_w, max(k, 2), replacement=True, generator=generator)[
                :, :k
            ]
            ids[rows] = torch.where(todo[rows], redraw, ids[rows])
        log_q = (torch.log(w[ids]) - torch.log(self._row_mass(exclusions))[:, None]).float()
        return Negatives(ids, log_q)

    def probabilities(self, queries, item_embeddings, exclusions) -> torch.Tensor:
        """(P, N+1) exact proposal probabilities (small catalogs only)."""
        w = (
            self.weights[: exclusions.n_items + 1]
            .to(exclusions.row.device)
            .expand(exclusions.row.shape[0], -1)
        )
        w = w.masked_fill(exclusions.dense_mask(), 0.0)
        return (w / w.sum(1, keepdim=True)).float()


def genni_log_probs(
    queries: torch.Tensor, item_embeddings: torch.Tensor, exclusions: Exclusions, alpha: float
) -> torch.Tensor:
    """Exact GenNi log p(j | h) ∝ α·h·e_j over allowed items, dense (P, N+1). Small catalogs / probes only."""
    logits = alpha * (queries @ item_embeddings.T)
    logits = logits.masked_fill(exclusions.dense_mask(), float("-inf"))
    return torch.log_softmax(logits.double(), dim=1)


class ExactSampler:
    """Exact GenNi: p(j | h) ∝ exp(α·h·e_j) over all allowed items, the oracle.

    One streaming pass over item chunks, never holding a (P × N) matrix: each chunk's mass W_c joins
    a running total W, and each of the k draws moves into the chunk with probability W_c / W, taking
    an item from it by inverse CDF (weighted reservoir sampling over chunks, exact). The running
    log-partition gives log q. Cost O(P·N·d) per call, with random numbers only per chunk.

    Args:
        alpha: inverse temperature α.
        chunk_elements: bound on the P × chunk score block (memory knob).
    """

    name = "exact"
    model_aware = True
    exact_log_q = True
    per_position = True

    def __init__(self, alpha: float = 1.0, chunk_elements: int = 1 << 24) -> None:
        self.alpha = alpha
        self.chunk_elements = chunk_elements

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        P = queries.shape[0]
        device = queries.device
        N = item_embeddings.shape[0] - 1
        chunk = max(1, self.chunk_elements // max(P, 1))
        ids = torch.zeros(P, k, dtype=torch.int64, device=device)
        running_max = torch.full((P,), float("-inf"), dtype=torch.float64, device=device)
        running_sum = torch.zeros(P, dtype=torch.float64, device=device)
        hist = exclusions.history[exclusions.row]  # (P, H)
        rows = torch.arange(P, device=device)
        for start in range(1, N + 1, chunk):
            end = min(start + chunk, N + 1)
            logits = self.alpha * (queries @ item_embeddings[start:end].T)  # (P, C)
            inside = (hist >= start) & (hist < end)
            logits[rows[:, None].expand_as(hist)[inside], hist[inside] - start] = float("-inf")
            pos_inside = (exclusions.positives >= start) & (exclusions.positives < end)
            logits[rows[pos_inside], exclusions.positives[pos_inside] - start] = float("-inf")
            chunk_max = logits.max(dim=1).values.double()  # (P,)
            has_mass = torch.isfinite(chunk_max)
            chunk_max = torch.where(has_mass, chunk_max, 0.0)
            # float32 is enough inside a chunk; the running total across chunks is float64
            cdf = torch.exp(logits - chunk_max[:, None].float()).cumsum_(dim=1)  # (P, C)
            chunk_sum = cdf[:, -1].double()
            new_max = torch.maximum(running_max, chunk_max.masked_fill(~has_mass, float("-inf")))
            old = running_sum * torch.exp(running_max - new_max).nan_to_num_(0.0)
            new = chunk_sum * torch.exp(chunk_max - new_max).masked_fill_(~has_mass, 0.0)
            running_sum, running_max = old + new, new_max
            # each draw moves into this chunk with probability (chunk mass) / (mass so far)
            move = torch.rand(P, k, generator=generator, device=device, dtype=torch.float64)
            move = move * running_sum[:, None] < new[:, None]
            if bool(move.any()):
                u = torch.rand(P, k, generator=generator, device=device)
                slot = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
                # rounding can point one past a zero-weight tail: clamp to the last positive slot
                last = (cdf < cdf[:, -1:]).sum(1, keepdim=True)
                ids = torch.where(move, torch.minimum(slot, last) + start, ids)
        log_z = running_max + torch.log(running_sum)
        scores = self.alpha * torch.einsum("pd,pkd->pk", queries, _rows(item_embeddings, ids))
        return Negatives(ids, (scores.double() - log_z[:, None]).float())

    def probabilities(self, queries, item_embeddings, exclusions) -> torch.Tensor:
        """(P, N+1) exact GenNi probabilities (small catalogs only)."""
        return genni_log_probs(queries, item_embeddings, exclusions, self.alpha).exp().float()


class PoolSampler:
    """The GenNi paper's efficient form: one uniform pool of M items shared by the batch.

    Each position draws ∝ exp(α·h·e_j) over the pool items it may use; a position whose pool holds
    no allowed item falls back to uniform. ``log_q`` is conditional on the pool.
    """

    name = "pool"
    model_aware = True
    exact_log_q = False
    per_position = True

    def __init__(self, alpha: float = 1.0, pool_size: int = 1000) -> None:
        self.alpha = alpha
        self.pool_size = pool_size

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        N = item_embeddings.shape[0] - 1
        P = queries.shape[0]
        pool = torch.randint(
            1, N + 1, (self.pool_size,), generator=generator, device=queries.device
        )
        logits = self.alpha * (queries @ _rows(item_embeddings, pool).T)  # (P, M)
        blocked = exclusions.contains(pool[None, :].expand(P, -1))
        return _draw_from_candidates(
            logits.masked_fill(blocked, float("-inf")),
            pool[None, :].expand(P, -1),
            exclusions,
            k,
            generator,
        )


class DNSSampler:
    """Dynamic negative sampling: the highest-scoring of M uniform candidates drawn per position.

    Candidates are drawn uniformly among the allowed items (with replacement); the k best
    candidates are returned. ``log_q`` is 0 (the choice is deterministic given the candidates).
    """

    name = "dns"
    model_aware = True
    exact_log_q = False
    per_position = True

    def __init__(self, candidates: int = 32, chunk_elements: int = 1 << 24) -> None:
        self.candidates = candidates
        self.chunk_elements = chunk_elements

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        if k > self.candidates:
            raise SamplerError(f"dns needs at least k={k} candidates; raise sampler.pool_size")
        cand = exclusions.rank_to_item(
            _uniform_int(exclusions.n_allowed, self.candidates, generator)
        )
        P, d = queries.shape
        step = max(1, self.chunk_elements // (self.candidates * d))
        scores = torch.empty(P, self.candidates, device=queries.device)
        for start in range(0, P, step):
            stop = start + step
            scores[start:stop] = torch.einsum(
                "pd,pmd->pm", queries[start:stop], _rows(item_embeddings, cand[start:stop])
            )
        top = scores.topk(k, dim=1).indices
        ids = cand.gather(1, top)
        return Negatives(ids, torch.zeros(ids.shape, device=ids.device))


def _draw_from_candidates(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    exclusions: Exclusions,
    k: int,
    generator: torch.Generator,
    epsilon: float | torch.Tensor = 0.0,
    tail: int = 0,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Negatives:
    """Draw k ids per row from the mixture (1-ε)·softmax(logits) over candidates + ε·uniform(allowed).

    Args:
        logits: (P, M) α-scaled scores with -inf on excluded or missing candidates.
        candidates: (P, M) int64 candidate ids (a repeated id's slots add up).
        epsilon: uniform mass, a float or (P,) per row; rows with no usable candidate use ε = 1.
        tail: the last ``tail`` slots are a random uniform tail whose logits carry the weight
            log(n_tail / M'), standing in for every item outside the first M - tail slots. Every
            drawn id gets exp(α·s_j) / W, W the slot normaliser (GenNi's probability with Z
            replaced by its estimate W), rather than its conditional mass, which would count each
            tail item once and make Σ exp(α·s_j) / q_j miss the mass outside the candidates.
        score: with ``tail``, ``score(rows, ids)`` -> the α-scaled scores of those (row, id) pairs.
    Returns:
        ids (P, k) and the log probability of each id under that mixture: exact without a tail.
    """
    P, M = logits.shape
    has_candidate = torch.isfinite(logits).any(dim=1)
    eps = torch.where(has_candidate, torch.as_tensor(epsilon, dtype=torch.float64), 1.0)  # (P,)
    safe_logits = torch.where(has_candidate[:, None], logits, torch.zeros_like(logits))
    slots, _ = sample_from_logits(safe_logits, k, generator)
    ids = candidates.gather(1, slots)
    n_allowed = exclusions.n_allowed.to(torch.float64)
    if bool((eps > 0).any()):
        use_uniform = (
            torch.rand(P, k, generator=generator, device=logits.device, dtype=torch.float64)
            < eps[:, None]
        )
        uniform_ids = exclusions.rank_to_item(_uniform_int(exclusions.n_allowed, k, generator))
        ids = torch.where(use_uniform, uniform_ids, ids)
    # probability of each drawn id under the mixture: look the id up among the candidates
    log_w = torch.logsumexp(safe_logits.double(), dim=1)  # (P,) log of the slot normaliser W
    p_slot = (safe_logits.double() - log_w[:, None]).exp().masked_fill(~torch.isfinite(logits), 0.0)
    p = _slot_mass(ids, candidates[:, : M - tail], p_slot[:, : M - tail])
    if tail:
        # scores only for the draws outside the candidates (a (P, k, d) gather of every draw
        # would double the memory traffic of the loss at k = 128)
        rows, cols = ((p == 0) & has_candidate[:, None]).nonzero(as_tuple=True)
        p = p.index_put((rows, cols), (score(rows, ids[rows, cols]).double() - log_w[rows]).exp())
    q = (1.0 - eps[:, None]) * p + eps[:, None] / n_allowed[:, None]
    return Negatives(ids, torch.log(q).float())


def _slot_mass(ids: torch.Tensor, slot_ids: torch.Tensor, slot_p: torch.Tensor) -> torch.Tensor:
    """(P, k) total probability of the slots holding each id, repeated ids included.

    Sorted slots and a running sum give it in O(k log M) per row (a (P, k, M) comparison costs too
    much at k = 128).
    """
    sorted_ids, order = slot_ids.sort(dim=1)
    cumulative = torch.nn.functional.pad(slot_p.gather(1, order).cumsum(dim=1), (1, 0))
    lo = torch.searchsorted(sorted_ids, ids, right=False)
    hi = torch.searchsorted(sorted_ids, ids, right=True)
    return (cumulative.gather(1, hi) - cumulative.gather(1, lo)).clamp_(min=0.0)


_PADDING_ID_MESSAGE = (
    "the index returns item id 0, which is padding: item ids run from 1 to N, so build it with "
    "ids=torch.arange(1, N + 1) (row r of item_embeddings[1:] is item r + 1)"
)


def _check_candidate_ids(I: torch.Tensor) -> torch.Tensor:
    """I (Q, K) unchanged, or SamplerError if the index speaks row numbers (id 0) not item ids."""
    if bool((I == 0).any()):
        raise SamplerError(_PADDING_ID_MESSAGE)
    return I


_DRAW_BLOCK = 32  # slots per block of _draw_slots


def _draw_slots(mass: torch.Tensor, k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k draws per row ∝ ``mass`` (P, n·B), B = ``_DRAW_BLOCK``, and each row's total (P,).

    Two levels instead of a cumulative sum over every slot: a block ∝ the block sums, then a slot
    within the drawn block; the same distribution (to float32 rounding) for a sum and a
    cumulative sum over B slots per draw instead of a sequential pass over them all. A rounding
    that lands on a zero-mass slot takes the row's last slot with mass."""
    P, width = mass.shape
    blocks = mass.view(P, width // _DRAW_BLOCK, _DRAW_BLOCK)
    sums = blocks.sum(dim=2)  # (P, n)
    cdf = sums.cumsum(dim=1)
    total = cdf[:, -1]
    u = torch.rand(P, k, generator=generator, device=mass.device, dtype=torch.float64)
    target = u.float() * total[:, None]
    block = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)  # (P, k)
    rest = target - (cdf.gather(1, block) - sums.gather(1, block))
    within = blocks[torch.arange(P, device=mass.device)[:, None], block].cumsum(dim=2)  # (P, k, B)
    at = torch.searchsorted(within, rest[..., None], right=True)[..., 0]
    slots = block * _DRAW_BLOCK + at.clamp_(max=_DRAW_BLOCK - 1)
    empty = mass.gather(1, slots) == 0
    if bool(empty.any()):
        last = ((mass > 0) * torch.arange(1, width + 1, device=mass.device)).argmax(1)
        slots = torch.where(empty, last[:, None], slots)
    return slots, total


class AnnSampler:
    """The product: GenNi negatives from an IVF index's candidates, rescored with current embeddings.

    Each query takes the index's top-K items (the index may be stale), rescores them with the current
    item table, and draws ∝ exp(α·h·e_j) over the allowed candidates, mixed with ε uniform mass so
    every allowed item keeps non-zero probability. ``log_q`` is exact for that mixture.

    Args:
        index: anything with ``search(xq (Q, d), k) -> (D, I)`` returning item ids (``-1`` = missing),
            e.g. an :class:`annsample.index.ItemIndex`, or an object with ``current()`` returning one.
        alpha: inverse temperature α; candidates: K; epsilon: uniform mass ε.
        tail_samples: M > 0 adds the GenNi tail the candidates miss: M uniform items shared by the
            batch, importance-weighted (n_tail / M each), join every query's candidates. Their
            softmax share estimates the GenNi mass outside the candidates, so the proposal tracks
            exact GenNi when its distribution is flat (early training) or the index is stale, and
            stays on the candidates when they hold the mass. The draws follow the proposal given
            the tail draw (:meth:`probabilities`). ``log_q`` is
            log[(1-ε)·exp(α·s_j)/W + ε/n_allowed] for every drawn j, candidate or tail, with W
            the call's slot normaliser: GenNi's probability with the partition function Z
            replaced by its tail estimate W. It is neither the conditional probability (a tail
            item's is n_tail/M' times larger) nor the marginal over tail draws (no closed form);
            it keeps Σ exp(α·s_j) / q_j unbiased for Z. At α = 1, ε = 0 every corrected logit
            s_j - log q_j equals log W, so the partition estimate of a sampled softmax is W and
            its variance (from the tail draw, shared by the batch) does not fall with k.
            With M = 0 ``log_q`` is exact outright.
        query: "position" (every position queries the index) or "sequence" (each sequence's last
            hidden state queries once; its candidates serve all its positions, rescored per position).
    """

    name = "ann"
    model_aware = True
    exact_log_q = True
    per_position = True

    def __init__(
        self,
        index,
        alpha: float = 1.0,
        candidates: int = 200,
        epsilon: float = 0.05,
        query: str = "position",
        tail_samples: int = 0,
        chunk_elements: int = 1 << 24,
    ) -> None:
        if query not in ("position", "sequence"):
            raise SamplerError(f"ann query mode {query!r} unknown; use 'position' or 'sequence'")
        if not 0.0 <= epsilon <= 1.0:
            raise SamplerError(f"ann epsilon must be in [0, 1], got {epsilon}")
        ids = getattr(index, "ids", None)  # an ItemIndex's ids, once built
        if isinstance(ids, torch.Tensor) and ids.numel() and int(ids.min()) < 1:
            raise SamplerError(_PADDING_ID_MESSAGE)
        self.index = index
        self.alpha = alpha
        self.candidates = candidates
        self.epsilon = epsilon
        self.query = query
        self.tail_samples = tail_samples
        self.chunk_elements = chunk_elements

    def current_index(self):
        """The index searched now: ``index``, or the one its refresher publishes."""
        return self.index.current() if hasattr(self.index, "current") else self.index

    def candidate_ids(self, queries, exclusions, sequence_queries=None) -> torch.Tensor:
        """(P, K) candidate ids for each position (-1 = none)."""
        index = self.current_index()
        if self.query == "sequence":
            if sequence_queries is None:
                raise SamplerError(
                    "ann query='sequence' needs sequence_queries (one hidden state per row)"
                )
            _, I = index.search(sequence_queries.float().contiguous(), self.candidates)
            return _check_candidate_ids(I).to(queries.device)[exclusions.row]
        _, I = index.search(queries.float().contiguous(), self.candidates)
        return _check_candidate_ids(I).to(queries.device)

    def rescore(self, queries, item_embeddings, candidates) -> torch.Tensor:
        """(P, K) α·h·e of each position's candidates (P, K) with the current item table."""
        P, d = queries.shape
        K = candidates.shape[1]
        step = max(1, self.chunk_elements // (K * d))
        scores = torch.empty(P, K, device=queries.device, dtype=queries.dtype)
        safe = candidates.clamp(min=0)
        for start in range(0, P, step):
            stop = start + step
            scores[start:stop] = torch.einsum(
                "pd,pkd->pk", queries[start:stop], _rows(item_embeddings, safe[start:stop])
            )
        return self.alpha * scores

    def candidate_logits(
        self, queries, item_embeddings, exclusions, sequence_queries=None, seq_candidates=None
    ):
        """((P, K) GenNi logits, -inf where excluded or missing; (P, K) candidate ids).

        ``seq_candidates`` (R, K): the sequences' search results, when already searched."""
        if self.query == "sequence" and sequence_queries is not None:
            if seq_candidates is None:
                seq_candidates = self._search_sequences(
                    exclusions, sequence_queries, queries.device
                )
            logits = self._rescore_sequences(
                queries, item_embeddings, exclusions.row, seq_candidates
            )
            blocked = self._sequence_blocked(exclusions, seq_candidates)
            logits = (self.alpha * logits).masked_fill(blocked, float("-inf"))
            return logits, seq_candidates[exclusions.row]
        candidates = self.candidate_ids(queries, exclusions, sequence_queries)
        logits = self.rescore(queries, item_embeddings, candidates)
        blocked = (candidates < 1) | exclusions.contains(candidates.clamp(min=0))
        return logits.masked_fill(blocked, float("-inf")), candidates

    def _search_sequences(self, exclusions, sequence_queries, device) -> torch.Tensor:
        """(R, K) candidate ids of each sequence's hidden state (-1 = none)."""
        _, I = self.current_index().search(sequence_queries.float().contiguous(), self.candidates)
        seq_candidates = _check_candidate_ids(I).to(device)
        if exclusions.n_rows != seq_candidates.shape[0]:
            raise SamplerError(
                f"ann query='sequence' got {seq_candidates.shape[0]} sequence_queries for "
                f"{exclusions.n_rows} exclusion rows; pass one hidden state per sequence (row of "
                "the history)"
            )
        return seq_candidates

    @staticmethod
    def _rescore_sequences(queries, item_embeddings, row, seq_candidates, out=None) -> torch.Tensor:
        """(P, K) h_p·e of the candidates of each position's sequence: the candidate vectors are
        gathered once per sequence, (R, K, d), and every position is scored with one batched
        matmul over its sequence's positions (a (P, K, d) gather per position moved ~12x more
        memory). ``out``: a (P, K) tensor (a view may do) to write them into."""
        R, K = seq_candidates.shape
        vectors = _rows(item_embeddings, seq_candidates.clamp(min=0))  # (R, K, d)
        # positions laid out (R, T, d) by row, T = the most positions any row has
        order = torch.argsort(row, stable=True)
        sorted_row = row[order]
        counts = torch.bincount(row, minlength=R)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(row.shape[0], device=row.device) - starts[sorted_row]
        width = int(counts.max()) if row.numel() else 0
        padded = queries.new_zeros(R, width, queries.shape[1])
        padded[sorted_row, slot] = queries[order]
        scores = torch.bmm(padded, vectors.transpose(1, 2))  # (R, T, K)
        if out is None:
            out = torch.empty(row.shape[0], K, device=queries.device, dtype=queries.dtype)
        out[order] = scores[sorted_row, slot]
        return out

    @staticmethod
    def _sequence_blocked(exclusions, seq_candidates) -> torch.Tensor:
        """(P, K) True where a position's candidate is missing or excluded for it."""
        R = seq_candidates.shape[0]
        rows = torch.arange(R, device=seq_candidates.device)
        row_blocked = (
            (seq_candidates < 1)
            | (seq_candidates > exclusions.n_items)
            | exclusions._in_history(seq_candidates.clamp(min=0), rows)
        )  # (R, K): the same for every position of sequence r
        return row_blocked[exclusions.row] | (
            seq_candidates[exclusions.row] == exclusions.positives[:, None]
        )

    def _sample_sequences(self, queries, item_embeddings, exclusions, k, generator, seq_candidates):
        """:meth:`sample` for sequence queries whose candidates hold each id once per sequence
        (any IVF or HNSW index): the same proposal as :meth:`_proposal` and the same log q as
        :func:`_draw_from_candidates`, for less work per position.

        - the tail's overlap with the candidates and its history exclusions are found once per
          sequence, (R, M), not per position (a (P, K) sort and (P, M) look-ups), by looking
          each sequence's history and candidates up among the distinct tail ids; the candidates'
          history exclusions by looking the history up among the candidates (R·H look-ups, not
          R·K);
        - a drawn slot's id j has p_j = exp(α·s_j) / W (W the slot normaliser), its own logit
          less the tail weight: no search of the drawn ids among the slots, no second softmax in
          float64; an ε-uniform id has the same with a tail, and without one its candidate mass
          (0 if it is not a candidate);
        - the ε-uniform ids are drawn and scored only where the ε coin falls;
        - the slots' logits and masses share one buffer, and the draw is two-level
          (:func:`_draw_slots`): no concatenation, and no cumulative sum over every slot.
        """
        device = queries.device
        row, positives = exclusions.row, exclusions.positives
        R, K = seq_candidates.shape
        P = row.shape[0]
        # the slots in ascending id order (the order of slots does not change the proposal):
        # membership tests then look up the few history and tail ids among the candidates
        seq_candidates = seq_candidates.sort(dim=1).values
        if K > 1 and bool(
            ((seq_candidates[:, 1:] == seq_candidates[:, :-1]) & (seq_candidates[:, 1:] > 0)).any()
        ):
            return None  # an id in two slots: the general path adds their masses
        M = self.tail_samples
        S = K + M
        # every slot's logit, then its mass, in one buffer padded to whole blocks of the draw
        n_blocks = -(-S // _DRAW_BLOCK)
        buffer = queries.new_empty(P, n_blocks * _DRAW_BLOCK)
        buffer[:, S:] = float("-inf")
        logits = buffer[:, :S]
        scores = self._rescore_sequences(
            queries, item_embeddings, row, seq_candidates, out=buffer[:, :K]
        )
        if self.alpha != 1.0:
            scores.mul_(self.alpha)
        row_blocked = (
            (seq_candidates < 1)
            | (seq_candidates > exclusions.n_items)
            | exclusions.history_hits(exclusions.row_keys(seq_candidates).view(-1)).view(R, K)
        )  # (R, K): the same for every position of sequence r
        blocked = row_blocked[row] | (seq_candidates[row] == positives[:, None])
        scores.masked_fill_(blocked, float("-inf"))
        n_candidates = K - blocked.sum(dim=1)  # (P,)
        has_slot = n_candidates > 0
        if M:
            N = item_embeddings.shape[0] - 1
            tail = torch.randint(1, N + 1, (M,), generator=generator, device=device)
            # a tail item that is a candidate of the sequence (usable there, or excluded for the
            # position anyway), or in its history, is not a tail slot: found per distinct tail
            # id, by looking the sequence's candidates and history up in the sorted tail
            distinct, inverse = torch.unique(tail, sorted=True, return_inverse=True)
            taken = torch.zeros(R, distinct.shape[0], dtype=torch.bool, device=device)
            for ids in (seq_candidates, exclusions.history):
                at = torch.searchsorted(distinct, ids).clamp_(max=distinct.shape[0] - 1)
                hit = distinct[at] == ids
                taken[torch.arange(R, device=device)[:, None].expand_as(ids)[hit], at[hit]] = True
            tail_blocked = taken[:, inverse][row] | (tail[None, :] == positives[:, None])  # (P, M)
            tail_logits, weight, tail_usable = self._tail_slots(
                queries, item_embeddings, exclusions, tail, tail_blocked, n_candidates
            )
            buffer[:, K:S] = tail_logits
            has_slot |= tail_usable
        eps = torch.where(has_slot, torch.as_tensor(self.epsilon, dtype=torch.float64), 1.0)
        if not bool(has_slot.all()):  # only ε's uniform draws serve those positions
            logits[~has_slot] = 0.0
        top = buffer.max(dim=1, keepdim=True).values
        mass = buffer.sub_(top).exp_()  # (P, blocks·B) in place, 0 on blocked slots, the largest 1
        slots, total = _draw_slots(mass, k, generator)
        log_w = (top[:, 0] + total.log()).double()  # (P,) log of the slot normaliser W
        # α·s_j, plus the tail weight on tail slots (a drawn slot's mass is never 0)
        chosen = mass.gather(1, slots).log_() + top
        ids = seq_candidates[row[:, None], slots.clamp(max=K - 1)]
        if M:
            in_tail = slots >= K
            chosen = torch.where(in_tail, chosen - weight[:, None], chosen)
            ids = torch.where(in_tail, tail[(slots - K).clamp_(min=0)], ids)
        log_p = chosen.double() - log_w[:, None]
        n_allowed = exclusions.n_allowed.double()
        use_uniform = (
            torch.rand(P, k, generator=generator, device=device, dtype=torch.float64) < eps[:, None]
        )
        if bool(use_uniform.any()):
            at_p, at_k = use_uniform.nonzero(as_tuple=True)
            rank = _uniform_int(exclusions.n_allowed[at_p], 1, generator)
            drawn = exclusions.rank_to_item(rank, at_p)[:, 0]
            ids = ids.index_put((at_p, at_k), drawn)
            s_u = self.alpha * (queries[at_p] * _rows(item_embeddings, drawn)).sum(dim=1)
            log_p_u = s_u.double() - log_w[at_p]
            if not M:  # without a tail the proposal holds only the candidates' mass
                own = seq_candidates[row[at_p]]  # (n, K), sorted
                at = torch.searchsorted(own, drawn[:, None]).clamp_(max=K - 1)
                is_candidate = own.gather(1, at)[:, 0] == drawn
                log_p_u = log_p_u.masked_fill(~is_candidate, float("-inf"))
            log_p = log_p.index_put((at_p, at_k), log_p_u)
        q = (1.0 - eps[:, None]) * log_p.exp() + eps[:, None] / n_allowed[:, None]
        return Negatives(ids, torch.log(q).float())

    def _tail_slots(self, queries, item_embeddings, exclusions, tail, blocked, n_candidates):
        """The tail's slots: ((P, M) logits α·s_u + log(n_tail / M'), -inf where ``blocked``;
        (P,) weight log(n_tail / M'); (P,) whether any tail slot is usable), M' the usable tail
        items of a position and n_tail its allowed items outside its n_candidates usable ones."""
        n_seen = (~blocked).sum(dim=1)
        n_tail = (exclusions.n_allowed - n_candidates).clamp(min=0)
        # -inf when nothing is left outside the candidates
        weight = torch.log(n_tail.double() / n_seen.clamp(min=1).double()).float()
        logits = self.alpha * (queries @ _rows(item_embeddings, tail).T) + weight[:, None]
        return logits.masked_fill(blocked, float("-inf")), weight, (n_seen > 0) & (n_tail > 0)

    def _proposal(
        self, queries, item_embeddings, exclusions, sequence_queries, generator, seq_candidates=None
    ):
        """Slots (P, K [+ M]) with their logits, and the uniform floor ε.

        With ``tail_samples`` = M, the M shared uniform items that are allowed and not among a
        query's candidates join its slots with logit α·s_u + log(n_tail / M'), M' of them usable:
        their softmax share is then the Monte-Carlo estimate of the GenNi mass outside the
        candidates, and within the tail they are drawn ∝ exp(α·s_u), as GenNi would.
        """
        logits, candidates = self.candidate_logits(
            queries, item_embeddings, exclusions, sequence_queries, seq_candidates
        )
        if self.tail_samples:
            P = queries.shape[0]
            N = item_embeddings.shape[0] - 1
            tail = torch.randint(
                1, N + 1, (self.tail_samples,), generator=generator, device=queries.device
            )
            tail_ids = tail[None, :].expand(P, -1)
            usable = torch.where(torch.isfinite(logits), candidates, -1).sort(dim=1).values
            slot = torch.searchsorted(usable, tail_ids.contiguous()).clamp_(max=usable.shape[1] - 1)
            blocked = (usable.gather(1, slot) == tail_ids) | exclusions.contains(tail_ids)
            n_candidates = torch.isfinite(logits).sum(1)
            tail_logits, _, _ = self._tail_slots(
                queries, item_embeddings, exclusions, tail, blocked, n_candidates
            )
            logits = torch.cat([logits, tail_logits], dim=1)
            candidates = torch.cat([candidates, tail_ids], dim=1)
        return logits, candidates, self.epsilon

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        seq_candidates = None
        if self.query == "sequence" and sequence_queries is not None:
            seq_candidates = self._search_sequences(exclusions, sequence_queries, queries.device)
            out = self._sample_sequences(
                queries, item_embeddings, exclusions, k, generator, seq_candidates
            )
            if out is not None:
                return out
        logits, slots, eps = self._proposal(
            queries, item_embeddings, exclusions, sequence_queries, generator, seq_candidates
        )

        def score(rows, ids):
            return self.alpha * (queries[rows] * _rows(item_embeddings, ids)).sum(dim=1)

        return _draw_from_candidates(
            logits, slots, exclusions, k, generator, eps, self.tail_samples, score
        )

    def probabilities(
        self, queries, item_embeddings, exclusions, sequence_queries=None, generator=None
    ) -> torch.Tensor:
        """(P, N+1) exact proposal probabilities (small catalogs only).

        With ``tail_samples`` they are conditional on the tail draw: a generator in the same
        state as the one given to :meth:`sample` gives the same tail.
        """
        generator = generator or torch.Generator(device=queries.device).manual_seed(0)
        logits, slots, eps = self._proposal(
            queries, item_embeddings, exclusions, sequence_queries, generator
        )
        has_candidate = torch.isfinite(logits).any(dim=1)
        eps = torch.where(has_candidate, eps, 1.0).double()
        p_slot = torch.softmax(torch.where(has_candidate[:, None], logits, 0.0).double(), dim=1)
        p_slot = p_slot.masked_fill(~torch.isfinite(logits), 0.0)
        allowed = (~exclusions.dense_mask()).double()
        probs = eps[:, None] * allowed / allowed.sum(1, keepdim=True)
        probs.scatter_add_(1, slots.clamp(min=0), (1.0 - eps[:, None]) * p_slot)
        return probs.float()

    def marginal_probabilities(
        self, queries, item_embeddings, exclusions, sequence_queries=None, draws=64, seed=0
    ) -> torch.Tensor:
        """(P, N+1) proposal averaged over ``draws`` tail draws (the marginal the sampler draws
        from, up to Monte-Carlo error); equal to :meth:`probabilities` without a tail."""
        if not self.tail_samples:
            return self.probabilities(queries, item_embeddings, exclusions, sequence_queries)
        generator = torch.Generator(device=queries.device).manual_seed(seed)
        total = torch.zeros(queries.shape[0], item_embeddings.shape[0], dtype=torch.float64)
        for _ in range(draws):
            total += self.probabilities(
                queries, item_embeddings, exclusions, sequence_queries, generator
            ).double()
        return (total / draws).float()


class BatchPositives:
    """The positives of a batch's P real positions as a pool of slots to draw negatives from.

    Slot s holds ``exclusions.positives[s]``; an item appears in as many slots as it is a positive
    in the batch (c_j times). For position p the allowed slots are those whose item p may draw (not
    its positive, not in its history); there are A_p = P - Σ_{j excluded for p} c_j of them.

    Args:
        exclusions: the batch's exclusions; its ``positives`` are the slots.
    """

    def __init__(self, exclusions: Exclusions) -> None:
        self.exclusions = exclusions
        self.slots = exclusions.positives  # (P,)
        self.sorted = self.slots.sort().values  # (P,) for counting by binary search
        P = self.slots.shape[0]
        # slots each history row excludes, then each position's own positive when not in it
        history_mass = self.counts(exclusions.history).sum(dim=1)  # (R,)
        own = torch.where(exclusions.positive_in_history, 0, self.counts(self.slots[:, None])[:, 0])
        self.allowed_slots = P - history_mass[exclusions.row] - own  # (P,) A_p

    def counts(self, ids: torch.Tensor) -> torch.Tensor:
        """c_j: how many slots hold each of ``ids`` (any shape), int64."""
        flat = ids.reshape(-1).contiguous()
        found = torch.searchsorted(self.sorted, flat, right=True)
        found = found - torch.searchsorted(self.sorted, flat, right=False)
        return found.view_as(ids)

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """(P, m) float32 log(c_j / A_p) of allowed ids (P, m): -inf where c_j = 0 or A_p = 0."""
        counts = self.counts(ids).double()
        return (counts / self.allowed_slots[:, None].double()).log().float()

    def draw(
        self,
        k: int,
        generator: torch.Generator,
        max_rounds: int = 16,
        chunk_elements: int = 1 << 24,
    ) -> torch.Tensor:
        """(P, k) items of slots drawn uniformly, with replacement, from each position's allowed
        slots. Rows with no allowed slot (A_p = 0) are left 0 (the caller fills them).

        Draws uniform slots and redraws the excluded ones; the few draws still excluded after
        ``max_rounds`` (a position whose history holds most of the batch) are drawn exactly from
        their row's allowed slots, which is the same conditional distribution.
        """
        ex, P = self.exclusions, self.slots.shape[0]
        device = self.slots.device
        has_slot = self.allowed_slots > 0
        full = torch.full((P,), P, dtype=torch.int64, device=device)
        ids = torch.zeros(P, k, dtype=torch.int64, device=device)
        todo = has_slot[:, None].expand(P, k).clone()  # draws still to make
        for _ in range(max_rounds):
            if not bool(todo.any()):
                break
            slots = _uniform_int(full, k, generator)
            ids = torch.where(todo, self.slots[slots], ids)
            todo = todo & ex.contains(ids)
        if bool(todo.any()):
            rows, cols = todo.nonzero(as_tuple=True)
            ids[rows, cols] = self._exact(rows, generator, chunk_elements)
        return ids

    def _exact(
        self, rows: torch.Tensor, generator: torch.Generator, chunk_elements: int
    ) -> torch.Tensor:
        """(len(rows),) one draw each from position rows[i]'s allowed slots, by inverse CDF over
        a (chunk, P) mask of allowed slots."""
        ex, P = self.exclusions, self.slots.shape[0]
        out = torch.empty_like(rows)
        step = max(1, chunk_elements // max(P, 1))
        for start in range(0, rows.shape[0], step):
            r = rows[start : start + step]
            items = self.slots[None, :].expand(r.shape[0], P)
            allowed = ~((items == ex.positives[r, None]) | ex._in_history(items, ex.row[r]))
            cdf = allowed.long().cumsum(dim=1)  # (c, P)
            rank = _uniform_int(self.allowed_slots[r], 1, generator)  # (c, 1) in [0, A_p)
            slot = torch.searchsorted(cdf, rank, right=True)[:, 0]
            out[start : start + step] = self.slots[slot]
        return out


class InBatchSampler:
    """In-batch negatives: each position draws from the positives of the batch's real positions.

    Each of the k draws picks one of the position's allowed slots uniformly, with replacement
    (:class:`BatchPositives`), so an item that is the positive of c_j positions of the batch is
    drawn with probability q(j) = c_j / A_p, A_p the position's allowed slots (P minus the slots
    holding its own positive or an item of its history). ``log_q`` is that probability exactly,
    *conditional on the batch*: an item that is not a positive in this batch has q = 0, so a
    logQ-corrected sampled softmax over in-batch negatives estimates the softmax over the
    batch's items (corrected for how often each appears), not over the catalog; ``mixed`` adds
    uniform negatives for that. A position with no allowed slot (a batch of one sequence whose
    positives all lie in its history) draws uniformly over its allowed items instead, and
    reports that q = 1 / n_allowed.
    """

    name = "in_batch"
    model_aware = False
    exact_log_q = False  # exact given the batch, but Σ exp(s_j)/q_j misses items not in it

    def __init__(self, max_rounds: int = 16, chunk_elements: int = 1 << 24) -> None:
        self.max_rounds = max_rounds
        self.chunk_elements = chunk_elements

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        pool = BatchPositives(exclusions)
        ids, log_q = _in_batch_draw(pool, k, generator, self.max_rounds, self.chunk_elements)
        return Negatives(ids, log_q)

    def probabilities(self, queries, item_embeddings, exclusions) -> torch.Tensor:
        """(P, N+1) exact proposal probabilities given the batch (small catalogs only)."""
        pool = BatchPositives(exclusions)
        allowed = ~exclusions.dense_mask()
        ids = torch.arange(exclusions.n_items + 1, device=allowed.device)
        counts = pool.counts(ids).double()[None, :] * allowed
        in_batch = counts / pool.allowed_slots.clamp(min=1).double()[:, None]
        uniform = allowed.double() / allowed.sum(1, keepdim=True)
        return torch.where((pool.allowed_slots > 0)[:, None], in_batch, uniform).float()


def _in_batch_draw(
    pool: BatchPositives, k: int, generator: torch.Generator, max_rounds: int, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, k) in-batch draws and their log q; rows without an allowed slot draw uniformly."""
    ex = pool.exclusions
    ids = pool.draw(k, generator, max_rounds, chunk_elements)
    log_q = pool.log_q(ids)
    empty = pool.allowed_slots <= 0
    if bool(empty.any()):
        uniform = ex.rank_to_item(_uniform_int(ex.n_allowed, k, generator))
        log_uniform = (-torch.log(ex.n_allowed.float()))[:, None].expand(-1, k)
        ids = torch.where(empty[:, None], uniform, ids)
        log_q = torch.where(empty[:, None], log_uniform, log_q)
    return ids, log_q


class MixedSampler:
    """Mixed negative sampling (Yang et al., WWW 2020, "Mixed Negative Sampling for Learning
    Two-tower Neural Networks in Recommendations"): of each position's k negatives,
    ``in_batch_negatives`` = k₁ come from the batch's positives (as :class:`InBatchSampler`) and
    k₂ = k - k₁ uniformly from the allowed catalog (as :class:`UniformSampler`).

    ``log_q`` of every negative, from either group, is the mixture proposal
    q(j) = (k₁·c_j/A_p + k₂/n_allowed) / k. The k draws are a stratified sample (k₁ from one
    proposal, k₂ from the other), and with this q the estimate (1/k)·Σ_i exp(s_i)/q(i) of the
    partition function is unbiased over the whole allowed catalog (the balance heuristic of
    multiple importance sampling: E = Σ_j exp(s_j)·(k₁ q_b(j) + k₂ q_u(j))/(k q(j))), so a
    logQ-corrected sampled softmax with these negatives is unbiased in the same sense as with
    uniform ones; a slot picked at random among the k is drawn from q. Positions with no allowed
    slot in the batch draw all k uniformly (q = 1/n_allowed).

    Args:
        in_batch_negatives: k₁ >= 1; every call's k must exceed it.
    """

    name = "mixed"
    model_aware = False
    exact_log_q = True

    def __init__(
        self, in_batch_negatives: int, max_rounds: int = 16, chunk_elements: int = 1 << 24
    ) -> None:
        if isinstance(in_batch_negatives, bool) or not isinstance(in_batch_negatives, int):
            raise SamplerError(f"in_batch_negatives must be an int, got {in_batch_negatives!r}")
        if in_batch_negatives < 1:
            raise SamplerError(
                f"mixed needs in_batch_negatives >= 1, got {in_batch_negatives}; use the "
                "uniform sampler for uniform negatives only"
            )
        self.in_batch_negatives = in_batch_negatives
        self.max_rounds = max_rounds
        self.chunk_elements = chunk_elements

    def _check_k(self, k: int) -> tuple[int, int]:
        k1 = self.in_batch_negatives
        if k <= k1:
            raise SamplerError(
                f"mixed draws in_batch_negatives={k1} of its k negatives from the batch and the "
                f"rest uniformly, so k must exceed {k1}, got k={k}; raise num_negatives or use "
                "the in_batch sampler"
            )
        return k1, k - k1

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        k1, k2 = self._check_k(k)
        pool = BatchPositives(exclusions)
        batch_ids, _ = _in_batch_draw(pool, k1, generator, self.max_rounds, self.chunk_elements)
        uniform_ids = exclusions.rank_to_item(_uniform_int(exclusions.n_allowed, k2, generator))
        ids = torch.cat([batch_ids, uniform_ids], dim=1)  # (P, k)
        return Negatives(ids, self._log_q(pool, ids, k1, k2))

    @staticmethod
    def _log_q(pool: BatchPositives, ids: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
        """(P, k) log of the mixture proposal (k₁·q_batch + k₂·q_uniform) / k at allowed ids."""
        n_allowed = pool.exclusions.n_allowed.double()[:, None]
        has_slot = (pool.allowed_slots > 0)[:, None]
        q_batch = pool.counts(ids).double() / pool.allowed_slots.clamp(min=1).double()[:, None]
        q_batch = torch.where(has_slot, q_batch, 1.0 / n_allowed)  # those rows drew uniformly
        return ((k1 * q_batch + k2 / n_allowed) / (k1 + k2)).log().float()

    def probabilities(self, queries, item_embeddings, exclusions, k: int) -> torch.Tensor:
        """(P, N+1) the mixture proposal given the batch, for k negatives (small catalogs)."""
        k1, k2 = self._check_k(k)
        in_batch = InBatchSampler().probabilities(queries, item_embeddings, exclusions).double()
        uniform = UniformSampler().probabilities(queries, item_embeddings, exclusions).double()
        return ((k1 * in_batch + k2 * uniform) / k).float()


class TronSampler:
    """TRON's top-k negatives (Wilm et al., RecSys 2023, "Scaling Session-Based Transformer
    Recommendations using Optimized Negative Sampling and Loss Functions"; otto-de/TRON).

    Candidates per position: ``in_batch_negatives`` draws from the batch's positives (as
    :class:`InBatchSampler`, with replacement; TRON draws them without) and ``uniform_candidates``
    items drawn uniformly from the catalog once per call and shared by the batch (TRON's
    "batchwise" uniform negatives). Every candidate is scored with the current hidden state and
    item table, the position's excluded items (positive, history) and repeated candidates are
    dropped, and the k best-scoring distinct candidates are the negatives. TRON keeps repeats
    (harmless on its catalogs of about a million items), but 16,384 draws from Beauty's 12,101
    items hold about 40% of them twice or more, so a top-100 over draws would keep the best
    items twice or more. A position with fewer than k allowed candidates fills the rest
    uniformly.

    A top-k selection has no tractable proposal probability: ``log_q`` is 0 and is not one, so
    the config refuses it with a logQ correction (TRON's loss is a plain sampled softmax).

    Args:
        in_batch_negatives: in-batch candidates per position (TRON: 127).
        uniform_candidates: shared uniform candidates per call (TRON: 16,384).
        chunk_elements: bound on the (positions x candidates) score block.
    """

    name = "tron"
    model_aware = True
    exact_log_q = False

    def __init__(
        self,
        in_batch_negatives: int = 127,
        uniform_candidates: int = 16384,
        max_rounds: int = 16,
        chunk_elements: int = 1 << 24,
    ) -> None:
        for key, value in (
            ("in_batch_negatives", in_batch_negatives),
            ("uniform_candidates", uniform_candidates),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SamplerError(f"tron {key} must be an int >= 0, got {value!r}")
        if in_batch_negatives + uniform_candidates < 1:
            raise SamplerError("tron needs at least one candidate (in-batch or uniform)")
        self.in_batch_negatives = in_batch_negatives
        self.uniform_candidates = uniform_candidates
        self.max_rounds = max_rounds
        self.chunk_elements = chunk_elements

    def candidates(self, exclusions, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """((P, m) in-batch candidate ids, each row sorted; (U,) the distinct shared uniform
        candidates, sorted)."""
        P, device = exclusions.positives.shape[0], exclusions.positives.device
        batch_ids = torch.empty(P, 0, dtype=torch.int64, device=device)
        if self.in_batch_negatives:
            pool = BatchPositives(exclusions)
            batch_ids, _ = _in_batch_draw(
                pool, self.in_batch_negatives, generator, self.max_rounds, self.chunk_elements
            )
        uniform = torch.randint(
            1, exclusions.n_items + 1, (self.uniform_candidates,), generator=generator,
            device=device,
        )  # fmt: skip
        return batch_ids.sort(dim=1).values, torch.unique(uniform)  # unique sorts

    def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
        exclusions.check_nonempty()
        if k > self.in_batch_negatives + self.uniform_candidates:
            raise SamplerError(
                f"tron keeps the k={k} best of in_batch_negatives + uniform_candidates = "
                f"{self.in_batch_negatives} + {self.uniform_candidates} candidates; raise them "
                "or lower k"
            )
        batch_ids, uniform = self.candidates(exclusions, generator)
        P, U = queries.shape[0], uniform.shape[0]
        row_blocked = exclusions._in_history(  # (R, U): each history row's excluded candidates
            uniform[None, :].expand(exclusions.n_rows, U),
            torch.arange(exclusions.n_rows, device=uniform.device),
        )
        # an in-batch candidate that repeats one before it in its row, or a uniform one, is dropped
        repeat = torch.zeros_like(batch_ids, dtype=torch.bool)
        repeat[:, 1:] = batch_ids[:, 1:] == batch_ids[:, :-1]
        if U:
            found = torch.searchsorted(uniform, batch_ids).clamp_(max=U - 1)
            repeat |= uniform[found] == batch_ids
        uniform_vectors = _rows(item_embeddings, uniform)  # (U, d)
        ids = torch.empty(P, k, dtype=torch.int64, device=queries.device)
        short = torch.zeros(P, k, dtype=torch.bool, device=queries.device)
        step = max(1, self.chunk_elements // max(U + batch_ids.shape[1], 1))
        for start in range(0, P, step):
            stop = min(start + step, P)
            h = queries[start:stop]  # (c, d)
            blocked = row_blocked[exclusions.row[start:stop]] | (
                uniform[None, :] == exclusions.positives[start:stop, None]
            )
            scores = torch.cat(
                [
                    (h @ uniform_vectors.T).masked_fill(blocked, float("-inf")),  # (c, U)
                    torch.einsum(
                        "cd,cmd->cm", h, _rows(item_embeddings, batch_ids[start:stop])
                    ).masked_fill(repeat[start:stop], float("-inf")),  # (c, m)
                ],
                dim=1,
            )
            pool = torch.cat([uniform[None, :].expand(stop - start, -1), batch_ids[start:stop]], 1)
            if pool.shape[1] < k:  # repeats left fewer distinct candidates than k
                missing = k - pool.shape[1]
                scores = torch.nn.functional.pad(scores, (0, missing), value=float("-inf"))
                pool = torch.nn.functional.pad(pool, (0, missing))
            top = scores.topk(k, dim=1)
            ids[start:stop] = pool.gather(1, top.indices)
            short[start:stop] = torch.isinf(top.values)
        if bool(short.any()):  # fewer than k allowed candidates: fill uniformly
            fill = exclusions.rank_to_item(_uniform_int(exclusions.n_allowed, k, generator))
            ids = torch.where(short, fill, ids)
        return Negatives(ids, torch.zeros(ids.shape, device=ids.device))


def make_sampler(
    name: str,
    *,
    alpha: float = 1.0,
    candidates: int = 200,
    epsilon: float = 0.05,
    query: str = "position",
    tail_samples: int = 0,
    pool_size: int = 1000,
    popularity: np.ndarray | torch.Tensor | None = None,
    beta: float = 1.0,
    precision: str = "fp32",
    index_source: object = None,
    in_batch_negatives: int = 127,
    uniform_candidates: int = 16384,
) -> Sampler:
    """The sampler registered as ``name`` (one of :data:`annsample.config.SAMPLER_NAMES`).

    ``popularity`` (N+1,) counts serve "popularity"; ``index_source`` (an ItemIndex, or an object
    whose ``current()`` returns one) serves "ann"; ``pool_size`` is M for "pool" and "dns";
    ``precision`` the matmul precision of "exact_gumbel"; ``in_batch_negatives`` the in-batch
    share of "mixed" and the in-batch candidates of "tron", ``uniform_candidates`` tron's
    shared uniform candidates.
    """
    if name == "uniform":
        return UniformSampler()
    if name == "popularity":
        if popularity is None:
            raise SamplerError("sampler 'popularity' needs popularity= (N+1,) item counts")
        return PopularitySampler(popularity, beta=beta)
    if name == "exact":
        return ExactSampler(alpha=alpha)
    if name == "exact_gumbel":
        from annsample.exact_gumbel import GumbelExactSampler  # it builds on this module

        return GumbelExactSampler(alpha=alpha, precision=precision)
    if name == "pool":
        return PoolSampler(alpha=alpha, pool_size=pool_size)
    if name == "dns":
        return DNSSampler(candidates=pool_size)
    if name == "ann":
        if index_source is None:
            raise SamplerError("sampler 'ann' needs index_source= (an ItemIndex or its refresher)")
        return AnnSampler(
            index_source,
            alpha=alpha,
            candidates=candidates,
            epsilon=epsilon,
            query=query,
            tail_samples=tail_samples,
        )
    if name == "in_batch":
        return InBatchSampler()
    if name == "mixed":
        return MixedSampler(in_batch_negatives)
    if name == "tron":
        return TronSampler(in_batch_negatives, uniform_candidates)
    raise SamplerError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")


def build_sampler(
    config: SamplerConfig,
    popularity: np.ndarray | torch.Tensor | None = None,
    index_source: object = None,
) -> Sampler:
    """The sampler a run config's ``sampler`` section names (see :func:`make_sampler`)."""
    shared = (
        "alpha", "candidates", "epsilon", "query", "tail_samples", "pool_size", "beta",
        "in_batch_negatives", "uniform_candidates",
    )  # fmt: skip
    return make_sampler(
        config.name,
        **{key: getattr(config, key) for key in shared},
        popularity=popularity,
        precision=config.matmul_precision,
        index_source=index_source,
    )
