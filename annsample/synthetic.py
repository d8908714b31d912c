"""A learnable synthetic sequential catalog of any size, with its oracle (``--catalog-size 1M``).

The generator plants the structure production catalogs have and knows its own next-item
distribution, so a trained model is read as a fraction of the best any model could do.

What it plants (see :class:`SyntheticCatalog`):

- **clusters** (categories) of ``cluster_size`` related items, with Zipf popularity over clusters
  (exponent ``cluster_zipf``) and over the items inside each cluster (``item_zipf``), both in a
  random order, so a few percent of the items take most of the interactions, as in retail logs;
- **a ring inside each cluster** (a 1-D latent factor, e.g. price or style): item j sits at
  position x_j of its cluster's ring;
- **first-order sequential dynamics**: after item i (cluster c, position x) the next item is
    * with probability ``stay`` a ring neighbour of i in the same cluster, |x_j - x| <= ``window``,
      weighted by ``exp(-(|x_j - x| - 1) / 2)`` times its popularity,
    * with probability ``move`` a popular item of one of c's ``neighbours`` related clusters
      (fixed per cluster, chosen in proportion to cluster popularity),
    * otherwise a jump: a cluster by popularity, then an item by popularity;
  a user never repeats an item (repeats are redrawn, so the next item follows the distribution
  above restricted to the unseen items: exactly what full ranking with history masked scores).

What a uniform negative is at 1M items: one of ~10,000 clusters picked in proportion to its size,
so with probability 1 - 100/1M it comes from another cluster than the positive, and with
probability ~(1 - 4e-4) from none of the five clusters the next item can come from. It teaches the
cluster boundary, which the model learns within the first few hundred steps, and almost never the
order *within* a cluster (which ring neighbour is next), which is what decides the top 10 and what a
GenNi negative (the model's own confusable items: the same cluster, nearby on the ring) teaches.

The oracle ranks every item by its true probability given the last item, with the user's history
masked (:meth:`SyntheticCatalog.oracle_ranks`), exactly, without a (users x N) matrix. Generation
is vectorised over users (one pass per position); datasets are cached on disk as ``.npz`` under
``$ANNSAMPLE_CACHE`` (default ``~/.cache/annsample``), keyed by every parameter and the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from annsample.data import SequenceDataset
from annsample.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticCatalog",
    "SyntheticParams",
    "cache_dir",
    "oracle_metrics",
    "parse_size",
    "synthetic_catalog",
    "synthetic_dataset",
]

_VERSION = 3  # bump when the generator's output for the same parameters changes
_KERNEL_SCALE = 2.0  # ring kernel exp(-(d - 1) / scale)
_MAX_REDRAWS = 30  # repeat redraws per position before a user's sequence ends there


def parse_size(text: str | int) -> int:
    """``"1M"`` -> 1_000_000, ``"100k"`` -> 100_000, ``"5000"`` -> 5000.

    >>> parse_size("1M"), parse_size("250k"), parse_size(12)
    (1000000, 250000, 12)
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
        if not match:
            raise ConfigError(f"catalog size {text!r} is not a number; use e.g. 100000, 100k or 1M")
        value = int(
            float(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
        )
    if value < 10:
        raise ConfigError(f"catalog size {value} is too small; use at least 10 items")
    return value


@dataclass(frozen=True)
class SyntheticParams:
    """Every knob of the generator (the module docstring says what each plants)."""

    n_items: int
    n_users: int = 0  # 0 = n_items, at least 1000
    mean_length: float = 15.0  # mean sequence length (geometric tail, clipped to [3, max_length])
    max_length: int = 22  # data.max_len 20 inputs + validation + test (the dynamics are 1st order)
    cluster_size: int = 100
    cluster_zipf: float = 0.8
    item_zipf: float = 1.1
    window: int = 5
    neighbours: int = 4
    stay: float = 0.6
    move: float = 0.3
    seed: int = 0

    def resolved_users(self) -> int:
        return self.n_users or max(1000, self.n_items)


def _check(params: SyntheticParams) -> None:
    if params.n_items < 10:
        raise ConfigError(f"data.synthetic_items must be >= 10, got {params.n_items}")
    if params.n_users < 0:
        raise ConfigError(
            f"data.synthetic_users must be >= 0 (0 = automatic), got {params.n_users}"
        )
    if not (params.stay >= 0 and params.move >= 0 and params.stay + params.move <= 1):
        raise ConfigError(
            f"stay ({params.stay}) and move ({params.move}) must be >= 0 with stay + move <= 1"
        )
    if params.max_length < 3 or params.mean_length < 3:
        raise ConfigError("mean_length and max_length must be >= 3 (leave-one-out needs 3 items)")


class SyntheticCatalog:
    """The planted item structure and the exact next-item distribution p(j | previous item).

    Attributes (N items, C clusters; arrays indexed by item id have a padding row 0):
        cluster: (N+1,) int64 cluster of each item; start: (C+1,) first item id of each cluster.
        position: (N+1,) int64 ring position x_j inside its cluster.
        item_weight: (N+1,) float64 popularity of each item inside its cluster (sums to 1 per cluster).
        cluster_weight: (C,) float64 cluster popularity (sums to 1).
        by_rank: (N,) int64 item ids of each cluster in order of popularity, cluster after cluster.
        neighbour_clusters: (C, m) int64 related clusters of each cluster.
        window_items: (N+1, 2w) int64 ring neighbours of each item; window_prob: (N+1, 2w) float64
            their probabilities given a stay.
    """

    def __init__(self, params: SyntheticParams) -> None:
        _check(params)
        self.params = params
        n = params.n_items
        rng = np.random.default_rng([params.seed, 1])
        c = max(1, n // params.cluster_size)
        self.n_clusters = c
        self.start = (np.arange(c + 1, dtype=np.int64) * n) // c + 1  # sizes differ by at most 1
        sizes = np.diff(self.start)
        self.cluster = np.zeros(n + 1, dtype=np.int64)
        self.cluster[1:] = np.repeat(np.arange(c), sizes)
        self.position = np.zeros(n + 1, dtype=np.int64)
        self.position[1:] = np.arange(1, n + 1) - self.start[self.cluster[1:]]
        # popularity rank inside each cluster: a random order, Zipf weights by rank
        keys = rng.random(n)
        order = np.lexsort((keys, self.cluster[1:]))  # items grouped by cluster, random inside
        self.by_rank = order.astype(np.int64) + 1
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(self.start[:-1] - 1, sizes)
        weight = (rank + 1.0) ** -params.item_zipf
        totals = np.bincount(self.cluster[1:], weights=weight, minlength=c)
        self.item_weight = np.zeros(n + 1)
        self.item_weight[1:] = weight / totals[self.cluster[1:]]
        self.rank = np.zeros(n + 1, dtype=np.int64)
        self.rank[1:] = rank
        cluster_w = (rng.permutation(c) + 1.0) ** -params.cluster_zipf
        self.cluster_weight = cluster_w / cluster_w.sum()
        self.neighbour_clusters = rng.choice(
            c, size=(c, params.neighbours), p=self.cluster_weight
        ).astype(np.int64)
        # ring window of every item: offsets ±1..±w (w capped so a small cluster never wraps onto itself)
        w = int(max(0, min(params.window, (int(sizes.min()) - 1) // 2)))
        self.window = w
        offsets = np.concatenate([np.arange(-w, 0), np.arange(1, w + 1)])  # (2w,)
        pos = self.position[1:, None] + offsets[None]
        size = sizes[self.cluster[1:]][:, None]
        items = np.zeros((n + 1, 2 * w), dtype=np.int64)
        items[1:] = self.start[self.cluster[1:]][:, None] + np.mod(pos, size)
        kernel = np.exp(-(np.abs(offsets) - 1) / _KERNEL_SCALE)
        prob = kernel[None] * self.item_weight[items]
        prob[0] = 1.0
        self.window_items = items
        self.window_prob = prob / prob.sum(axis=1, keepdims=True)
        self.window_norm = np.zeros(n + 1)  # p(stay-pick j | i) = kernel * item_weight[j] / norm[i]
        self.window_norm[1:] = (kernel[None] * self.item_weight[items[1:]]).sum(axis=1)
        self._kernel = kernel
        self.jump = 1.0 - params.stay - params.move
        # global jump probability of every item and its ascending sort (for oracle rank counting)
        self.jump_prob = np.zeros(n + 1)
        self.jump_prob[1:] = self.cluster_weight[self.cluster[1:]] * self.item_weight[1:]
        self._jump_sorted = np.sort(self.jump_prob[1:])
        self._cluster_cdf = np.cumsum(self.cluster_weight)
        self._rank_cdf = {
            int(s): np.cumsum((np.arange(s) + 1.0) ** -params.item_zipf) for s in np.unique(sizes)
        }

    @property
    def n_items(self) -> int:
        return self.params.n_items

    # ------------------------------------------------------------------ sampling

    def _popular_item(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``clusters`` (Q,), drawn by popularity inside that cluster."""
        sizes = self.start[clusters + 1] - self.start[clusters]
        rank = np.empty(len(clusters), dtype=np.int64)
        for s, cdf in self._rank_cdf.items():
            rows = np.flatnonzero(sizes == s)
            u = rng.random(len(rows)) * cdf[-1]
            rank[rows] = np.minimum(np.searchsorted(cdf, u, side="right"), s - 1)
        return self.by_rank[self.start[clusters] - 1 + rank]

    def _first_items(self, count: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(count) * self._cluster_cdf[-1]
        clusters = np.minimum(
            np.searchsorted(self._cluster_cdf, u, side="right"), self.n_clusters - 1
        )
        return self._popular_item(clusters, rng)

    def sample_next(self, previous: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw the next item after each of ``previous`` (Q,) int64 ids -> (Q,) int64 ids."""
        q = len(previous)
        u = rng.random(q)
        out = np.empty(q, dtype=np.int64)
        stay = u < self.params.stay if self.window else np.zeros(q, dtype=bool)
        move = ~stay & (u < self.params.stay + self.params.move)
        jump = ~stay & ~move
        rows = np.flatnonzero(stay)
        if len(rows):
            cdf = np.cumsum(self.window_prob[previous[rows]], axis=1)
            pick = (rng.random(len(rows))[:, None] > cdf[:, :-1]).sum(axis=1)
            out[rows] = self.window_items[previous[rows], pick]
        rows = np.flatnonzero(move)
        if len(rows):
            which = rng.integers(0, self.params.neighbours, size=len(rows))
            clusters = self.neighbour_clusters[self.cluster[previous[rows]], which]
            out[rows] = self._popular_item(clusters, rng)
        rows = np.flatnonzero(jump)
        if len(rows):
            out[rows] = self._first_items(len(rows), rng)
        return out

    def sample_sequences(self, n_users: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate ``n_users`` sequences without repeats -> CSR ``(indptr (U+1,), items)``.

        Vectorised over users: one pass per position. A repeat is redrawn (so the next item follows
        p(. | previous) restricted to unseen items); a user still repeating after 30 redraws ends
        there (rare; users left with fewer than 3 items are dropped by the leave-one-out split).
        Rows come longest first (users carry no identity, and batches are shuffled anyway).
        """
        p = self.params
        rng = np.random.default_rng([seed, 2])
        lengths = np.clip(
            rng.geometric(1.0 / (p.mean_length - 2), size=n_users) + 2, 3, p.max_length
        )
        # users longest first, so the users still drawing at position t are a prefix of the rows
        planned = -np.sort(-np.minimum(lengths, self.n_items))
        lengths = planned.copy()
        seq = np.zeros((n_users, int(planned[0])), dtype=np.int64)
        seq[:, 0] = self._first_items(n_users, rng)
        for t in range(1, seq.shape[1]):
            n_active = int(np.searchsorted(-planned, -t, side="left"))  # rows with length > t
            seen = seq[:n_active, :t]  # a view: no copy of the history
            new = self.sample_next(seq[:n_active, t - 1], rng)
            rows = np.flatnonzero((seen == new[:, None]).any(axis=1))
            for _ in range(_MAX_REDRAWS):
                if not len(rows):
                    break
                new[rows] = self.sample_next(seq[rows, t - 1], rng)
                rows = rows[(seen[rows] == new[rows, None]).any(axis=1)]
            # a user still repeating ends here (its later columns are cut off below)
            lengths[rows] = np.minimum(lengths[rows], t)
            seq[:n_active, t] = new
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        items = seq[np.arange(seq.shape[1])[None] < lengths[:, None]]
        return indptr, items

    # ------------------------------------------------------------------ the oracle

    def next_prob(self, previous: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """True p(j | previous item) before masking: previous (Q,), candidates (Q, M) -> (Q, M).

        Id 0 (padding) in ``candidates`` gets probability 0.
        """
        p = self.params
        prev = previous[:, None]
        same = self.cluster[candidates] == self.cluster[prev]
        size = self.start[self.cluster[prev] + 1] - self.start[self.cluster[prev]]
        d = np.abs(self.position[candidates] - self.position[prev])
        d = np.minimum(d, size - d)  # ring distance
        in_window = same & (d >= 1) & (d <= self.window) & (candidates > 0)
        kernel = np.exp(-(np.maximum(d, 1) - 1) / _KERNEL_SCALE)
        stay = np.where(
            in_window, kernel * self.item_weight[candidates] / self.window_norm[prev], 0.0
        )
        if not self.window:
            stay = np.zeros_like(stay)
        nb = self.neighbour_clusters[self.cluster[previous]]  # (Q, m)
        hits = _row_counts(nb, self.cluster[candidates], self.n_clusters)  # (Q, M) multiplicity
        move = hits / p.neighbours * self.item_weight[candidates]
        prob = p.stay * stay + p.move * move + self.jump * self.jump_prob[candidates]
        return np.where(candidates > 0, prob, 0.0)

    def oracle_ranks(
        self,
        previous: np.ndarray,
        targets: np.ndarray,
        history: np.ndarray,
    ) -> np.ndarray:
        """0-based rank of each target when all items are ranked by true probability, history masked.

        Counts the unseen items strictly more probable than the target, as
        :func:`annsample.evaluate.rank_targets` does for a model, without a (Q, N) matrix: items
        outside the previous item's window and related clusters have only their jump probability,
        counted with one ``searchsorted`` over the sorted jump probabilities.

        Args:
            previous: (Q,) int64 last item before each target.
            targets: (Q,) int64 target ids.
            history: (Q, H) int64 items to mask (0 = padding); the target is never masked.
        Returns:
            (Q,) int64 ranks.
        """
        q = len(previous)
        related = self.neighbour_clusters[self.cluster[previous]]  # (Q, m)
        size_max = int(np.diff(self.start).max())
        offsets = np.arange(size_max)
        cl_items = self.start[related][:, :, None] + offsets[None, None]  # (Q, m, S)
        cl_items = np.where(cl_items < self.start[related + 1][:, :, None], cl_items, 0).reshape(
            q, -1
        )
        local = np.concatenate(
            [self.window_items[previous], cl_items, history, targets[:, None]], axis=1
        )
        local = np.sort(local, axis=1)
        first = np.ones_like(local, dtype=bool)
        first[:, 1:] = local[:, 1:] != local[:, :-1]
        keep = first & (local > 0)  # each distinct real item once
        p_target = self.next_prob(previous, targets[:, None])[:, 0]
        masked = (_row_counts(history, local, self.n_items + 1) > 0) | (local == targets[:, None])
        p_local = self.next_prob(previous, local)
        jump_local = self.jump * self.jump_prob[local]
        threshold = p_target[:, None]
        jump_sorted = self.jump * self._jump_sorted
        above_all = self.n_items - np.searchsorted(jump_sorted, p_target, side="right")
        above_local_jump = (keep & (jump_local > threshold)).sum(axis=1)
        above_local = (keep & ~masked & (p_local > threshold)).sum(axis=1)
        return (above_all - above_local_jump + above_local).astype(np.int64)


def _row_counts(sets: np.ndarray, values: np.ndarray, bound: int) -> np.ndarray:
    """How often each ``values[r, i]`` occurs in ``sets[r]``: (Q, m), (Q, M) ints in [0, bound)."""
    rows = np.arange(len(sets), dtype=np.int64)[:, None] * bound
    keys = np.sort((sets + rows).ravel())
    queries = values + rows
    return np.searchsorted(keys, queries, side="right") - np.searchsorted(
        keys, queries, side="left"
    )


def oracle_metrics(
    catalog: SyntheticCatalog,
    inputs: np.ndarray,
    targets: np.ndarray,
    history_indptr: np.ndarray,
    history_items: np.ndarray,
    users: np.ndarray | None = None,
    chunk: int = 2048,
) -> tuple[dict[str, float], np.ndarray]:
    """HR@k / NDCG@k of the oracle on the same rows and protocol as :func:`evaluate_ranking`.

    Args:
        inputs: (U, T) int64 right-aligned inputs (the last column is the previous item).
        targets: (U,) int64; history CSR as for evaluation; users: rows to score (default all).
    Returns:
        metrics dict and the oracle ranks of the evaluated rows.
    """
    from annsample.data import pad_rows
    from annsample.evaluate import metrics_from_ranks

    users = np.arange(inputs.shape[0]) if users is None else np.asarray(users)
    ranks = np.empty(len(users), dtype=np.int64)
    for start in range(0, len(users), chunk):
        rows = users[start : start + chunk]
        history = pad_rows(history_indptr, history_items, rows, 0)
        ranks[start : start + chunk] = catalog.oracle_ranks(
            inputs[rows, -1], targets[rows], history
        )
    return metrics_from_ranks(ranks), ranks


def cache_dir() -> Path:
    """``$ANNSAMPLE_CACHE`` or ``~/.cache/annsample``: where generated catalogs are kept."""
    return Path(os.environ.get("ANNSAMPLE_CACHE") or Path.home() / ".cache" / "annsample")


def synthetic_catalog(
    n_items: int, n_users: int = 0, seed: int = 0, **knobs
) -> tuple[SyntheticCatalog, SequenceDataset]:
    """The catalog structure (for the oracle) and its sequences, cached on disk by parameters.

    ``knobs`` are further :class:`SyntheticParams` fields. The structure is rebuilt from the seed
    (a second at 1M items); the sequences are loaded from the cache when present.
    """
    try:
        params = SyntheticParams(n_items=n_items, n_users=n_users, seed=seed, **knobs)
    except TypeError as error:
        raise ConfigError(
            f"synthetic catalog: {error}; valid knobs are SyntheticParams fields"
        ) from None
    catalog = SyntheticCatalog(params)
    key = hashlib.sha256(
        json.dumps({"version": _VERSION, **asdict(params)}, sort_keys=True).encode()
    ).hexdigest()[:16]
    path = cache_dir() / "synthetic" / f"{n_items}-{key}.npz"
    indptr = items = None
    if path.is_file():
        try:
            with np.load(path) as saved:
                indptr, items = saved["indptr"], saved["items"]
            logger.info("synthetic catalog loaded from %s", path)
        except (OSError, ValueError, KeyError):  # a torn or foreign file: regenerate it
            indptr = items = None
    if indptr is None:
        indptr, items = catalog.sample_sequences(params.resolved_users(), seed)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, indptr=indptr, items=items)
            os.replace(tmp, path)
        except OSError as error:  # an unwritable cache only costs the next run a regeneration
            logger.warning("cannot cache the synthetic catalog at %s (%s)", path, error)
    dataset = SequenceDataset(
        indptr=indptr,
        items=items,
        n_items=n_items,
        source=f"synthetic(n_items={n_items}, seed={seed})",
    )
    return catalog, dataset


def synthetic_dataset(n_items: int, n_users: int = 0, seed: int = 0, **knobs) -> SequenceDataset:
    """Sequences over ``n_items`` items (ids 1..N) from :func:`synthetic_catalog`.

    Args:
        n_items: catalog size N.
        n_users: number of users (0 = N, at least 1000).
        seed: the generator seed (same seed and parameters, same data).
        knobs: further :class:`SyntheticParams` fields (cluster_size, stay, ...).
    """
    return synthetic_catalog(n_items, n_users, seed, **knobs)[1]
