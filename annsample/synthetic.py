"""A synthetic sequential catalog of any size, for scale runs (``annsample train --catalog-size 1M``).

Items are grouped into clusters of related items; each user drifts through neighbouring clusters
and picks popular items within a cluster more often (Zipf-like). The structure matters: IVF recall
collapses on unclustered vectors, and a model trained on this data learns clustered embeddings, so
index behaviour at 1M items is measured on realistic geometry. Generation is vectorised: a million
items and a few million interactions take seconds.
"""

from __future__ import annotations

import re

import numpy as np

from annsample.data import SequenceDataset
from annsample.errors import ConfigError


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


def synthetic_dataset(
    n_items: int,
    n_users: int = 0,
    mean_length: float = 12.0,
    max_length: int = 60,
    cluster_size: int = 200,
    switch_prob: float = 0.3,
    seed: int = 0,
) -> SequenceDataset:
    """Generate sequences over ``n_items`` items.

    Args:
        n_items: catalog size N (ids 1..N).
        n_users: number of users (0 = N // 5, at least 1000).
        mean_length: mean sequence length (geometric, at least 3, at most ``max_length``).
        cluster_size: items per cluster; consecutive items mostly stay in or near one cluster.
        switch_prob: probability that the next item moves to a neighbouring cluster.
        seed: the generator seed (same seed, same data).
    """
    if n_items < 10:
        raise ConfigError(f"data.synthetic_items must be >= 10, got {n_items}")
    rng = np.random.default_rng(seed)
    n_users = n_users or max(1000, n_items // 5)
    n_clusters = max(1, n_items // cluster_size)
    lengths = np.clip(rng.geometric(1.0 / (mean_length - 2), size=n_users) + 2, 3, max_length)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    total = int(indptr[-1])
    first = indptr[:-1]
    # cluster walk: a random start per user, then ±1..3 cluster moves with probability switch_prob
    step = np.where(rng.random(total) < switch_prob, rng.integers(-3, 4, size=total), 0)
    step[first] = rng.integers(0, n_clusters, size=n_users)
    walk = np.cumsum(step)
    walk -= np.repeat(walk[first] - step[first], lengths)  # restart the running sum at each user
    cluster = np.mod(walk, n_clusters)
    # Zipf-like popularity inside a cluster: position ~ floor(size * u^2)
    base = cluster * (n_items // n_clusters)
    width = np.where(cluster == n_clusters - 1, n_items - base, n_items // n_clusters)
    offset = np.floor(width * rng.random(total) ** 2).astype(np.int64)
    items = (base + offset + 1).astype(np.int64)
    return SequenceDataset(
        indptr=indptr,
        items=items,
        n_items=n_items,
        source=f"synthetic(n_items={n_items}, seed={seed})",
    )
