"""IVF tools: list counts, k-means, the nearest-centroid assignment, and the MIPS -> L2 augmentation.

Pure functions over tensors, FAISS vocabulary (``nlist``, ``nprobe``, ``xb``, ``xq``). The
:class:`annsample.index.ItemIndex` trains its centroids with :func:`kmeans` on a
:func:`training_sample` of the vectors mapped by :func:`to_stored_space`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from annsample.errors import ItemIndexError
from annsample.index.checks import as_int
from annsample.index.exact import BLOCK_ELEMENTS

logger = logging.getLogger(__name__)

# FAISS k-means defaults: it subsamples to 256 points per centroid and warns below 39.
MAX_POINTS_PER_CENTROID = 256
MIN_POINTS_PER_CENTROID = 39

# (n_train, nlist) pairs already warned about, so periodic retrains log the warning once.
warned_small_training_sets: set[tuple[int, int]] = set()


def default_nlist(n: int) -> int:
    """The IVF list count for a catalog of ``n`` items: round(sqrt(n)), at most n // 39, at least 1.

    sqrt(n) lists of about sqrt(n) items balance the two costs of a query (scoring the centroids
    and scanning the probed lists); the cap keeps the 39 training points per centroid FAISS's
    k-means asks for. ``sampler.index.nlist: 0`` (the default) means this.

    >>> default_nlist(12101), default_nlist(1_000_000), default_nlist(100)
    (110, 1000, 2)
    """
    n = as_int(n, "n")
    if n < 1:
        raise ItemIndexError(f"the catalog must hold at least one item, got n={n}")
    return max(1, min(round(math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query for ``nlist`` lists: ceil(nlist / 8), at least 1 (an eighth of the
    catalog scanned per query). ``sampler.index.nprobe: 0`` (the default) means this.

    >>> default_nprobe(110), default_nprobe(1000), default_nprobe(2)
    (14, 125, 1)
    """
    nlist = as_int(nlist, "nlist")
    if nlist < 1:
        raise ItemIndexError(f"nlist={nlist} must be positive")
    return max(1, math.ceil(nlist / 8))


def resolve_nlist_nprobe(nlist: int, nprobe: int, n: int) -> tuple[int, int]:
    """(nlist, nprobe) for a catalog of ``n`` items, 0 meaning the default rule for either.

    >>> resolve_nlist_nprobe(0, 0, 12101), resolve_nlist_nprobe(128, 0, 12101)
    ((110, 14), (128, 16))
    """
    nlist = as_int(nlist, "nlist") or default_nlist(n)
    nprobe = as_int(nprobe, "nprobe") or default_nprobe(nlist)
    check_nlist_fits(nlist, n)
    if nprobe > nlist:
        raise ItemIndexError(
            f"nprobe={nprobe} must be at most nlist={nlist}; lower it or set nprobe=0 for "
            f"default_nprobe(nlist) = {default_nprobe(nlist)} (nlist / 8)"
        )
    return nlist, nprobe


def check_nlist_fits(nlist: int, n: int) -> None:
    """Refuse more lists than items, pointing at the default rule."""
    if nlist > n:
        raise ItemIndexError(
            f"nlist={nlist} is larger than the number of items N={n}; lower nlist, or set nlist=0 "
            f"for default_nlist(N) = {default_nlist(n)}: sqrt(N), at most N // 39"
        )


def nearest_centroid(
    x: torch.Tensor, centroids: torch.Tensor, l2: bool = False, use_faiss: bool = True
) -> torch.Tensor:
    """The IVF assignment step: the list of every row, 2 * n * nlist * d FLOPs.

    Args:
        x: (n, d') float32 rows, on CPU (FAISS flat search) or CUDA (chunked torch matmul).
        centroids: (nlist, d') float32 centroids.
        l2: argmin |x - c|^2 instead of argmax x · c.
        use_faiss: on CPU, use FAISS's flat search when faiss is installed (else chunked torch).

    Returns:
        (n,) int64 list numbers, on ``x``'s device.
    """
    from annsample.index import faiss_ivf  # it builds its lists with this function

    if not x.is_cuda and use_faiss and faiss_ivf.available():
        return faiss_ivf.flat_assign(x, centroids, l2)
    # On CUDA a chunked matmul + argmax beats a round trip to the host (and needs no faiss).
    scores_bias = -0.5 * (centroids * centroids).sum(dim=1) if l2 else None
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    rows = max(1, BLOCK_ELEMENTS // centroids.shape[0])
    centroids_t = centroids.T.contiguous()
    for r0 in range(0, x.shape[0], rows):
        scores = x[r0 : r0 + rows] @ centroids_t  # (rows, nlist)
        if scores_bias is not None:
            scores += scores_bias  # argmin |x-c|^2 == argmax x·c - |c|^2/2
        out[r0 : r0 + rows] = scores.argmax(dim=1)
    return out


def seed_for(seed: int, step: int) -> int:
    """A k-means seed mixed from the index seed and the training step."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def training_sample(
    stored: torch.Tensor, nlist: int, max_train_points: int | None, seed: int
) -> torch.Tensor:
    """At most ``max_train_points`` (default nlist * 256) rows of ``stored`` for k-means, sampled
    without replacement; warns once per shape when fewer than 39 per centroid remain."""
    n = stored.shape[0]
    limit = max_train_points or nlist * MAX_POINTS_PER_CENTROID
    if n > limit:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=generator)[:limit].to(stored.device)
        stored = stored[rows]
    n_train = stored.shape[0]
    key = (n_train, nlist)
    if n_train < MIN_POINTS_PER_CENTROID * nlist and key not in warned_small_training_sets:
        warned_small_training_sets.add(key)
        logger.warning(
            "k-means trains %d points for nlist=%d centroids; FAISS advises at least %d "
            "(39 per centroid): lower nlist or index more items. Logged once.",
            n_train,
            nlist,
            MIN_POINTS_PER_CENTROID * nlist,
        )
    return stored


def kmeans(
    train: torch.Tensor,
    init: torch.Tensor,
    iters: int,
    spherical: bool = True,
    use_faiss: bool = True,
) -> torch.Tensor:
    """Lloyd iterations from ``init`` (nlist, d'); spherical k-means unless ``spherical=False``.

    Args:
        train: (n, d') float32 training rows.
        init: (nlist, d') float32 starting centroids (a warm start makes a few iterations enough).
        iters: Lloyd iterations.
        use_faiss: let :func:`nearest_centroid` use FAISS on CPU.

    Returns:
        (nlist, d') float32 contiguous CPU centroids.
    """
    centroids = init.clone()
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    n, nlist = train.shape[0], init.shape[0]
    for _ in range(iters):
        assign = nearest_centroid(train, centroids, l2=not spherical, use_faiss=use_faiss)
        # Per-list sums as a sparse (nlist, n) one-hot times train: much faster than
        # index_add_ on CPU, and the same code on CUDA.
        one_hot = torch.sparse_coo_tensor(
            torch.stack([assign, torch.arange(n, device=train.device)]),
            torch.ones(n, dtype=train.dtype, device=train.device),
            (nlist, n),
            check_invariants=False,
        )
        sums = torch.sparse.mm(one_hot, train)
        counts = torch.bincount(assign, minlength=nlist)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
        empty = (~filled).nonzero().flatten()
        if empty.numel():
            # As FAISS does: split the biggest clusters in two, nudging both halves apart.
            donors = counts.topk(min(empty.numel(), int(filled.sum()))).indices
            empty = empty[: donors.numel()]
            sign = torch.ones(centroids.shape[1], device=centroids.device)
            sign[1::2] = -1
            eps = 1.0 / 1024
            centroids[empty] = centroids[donors] * (1 + eps * sign)
            centroids[donors] = centroids[donors] * (1 - eps * sign)
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids.float().cpu().contiguous()


def to_stored_space(
    xb: torch.Tensor, metric: str, max_norm: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """Map xb (N, d) into the searched space: (stored (N, d'), norms, max_norm).

    "ip": ``stored`` may alias ``xb``. "cosine": rows normalised, ``norms`` (N,) turn scores back
    into inner products. "l2_augmented" (MIPS -> L2): an extra coordinate sqrt(M^2 - |x|^2), so
    every stored row has norm M; ``max_norm`` fixes M (a re-add keeps the centroids' M), None takes
    the largest row norm of ``xb``.
    """
    if metric == "ip":
        return xb.contiguous(), None, None
    squared = (xb * xb).sum(dim=1)  # (N,)
    if metric == "cosine":
        norms = squared.sqrt()
        return (xb / norms.clamp_min(1e-30)[:, None]).contiguous(), norms, None
    # l2_augmented: every stored row gets norm M, so L2 in d + 1 dims ranks like IP in d.
    max_squared = float(squared.max()) if max_norm is None else max_norm**2
    extra = (max_squared - squared).clamp_min(0).sqrt()
    stored = torch.cat([xb, extra[:, None]], dim=1).contiguous()
    return stored, None, max_squared**0.5


def queries_to_stored_space(xq: torch.Tensor, metric: str) -> torch.Tensor:
    """(Q, d') queries for the stored space of ``metric``."""
    if metric == "l2_augmented":
        # The 0 coordinate makes xq · x_aug == xq · x exactly.
        return torch.cat([xq, xq.new_zeros(xq.shape[0], 1)], dim=1)
    return xq


def shift_augmented_centroids(centroids: torch.Tensor, old: float, new: float) -> torch.Tensor:
    """(nlist, d + 1) l2_augmented centroids moved from M = ``old`` to M = ``new``.

    A row's extra coordinate sqrt(M^2 - |x|^2) squared shifts by new^2 - old^2 when M changes; the
    centroids' extra coordinate gets the same shift, so they stay where their rows now are.
    """
    shifted = centroids.clone()
    extra = shifted[:, -1]
    shifted[:, -1] = (extra * extra + (new * new - old * old)).clamp_min(0).sqrt()
    return shifted
