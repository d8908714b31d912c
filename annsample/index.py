"""Inner-product top-k search over item embeddings: a FAISS IVF index versioned by training step.

``ItemIndex`` takes tensors only (it never sees the model). It trains IVF centroids with k-means,
assigns every item to its nearest centroid and writes the inverted lists with that precomputed
assignment, so the two refresh tiers share one code path:

- ``re_add``: keep the centroids, re-assign and re-add all current embeddings (cheap);
- ``retrain``: k-means again, warm-started from the current centroids, then add (expensive).

Every refresh builds new contents beside the old ones and swaps a single reference, so a concurrent
``search`` always sees one complete version. ``exact_topk`` is the chunked reference every
approximate result is measured against, and ``recall_at_k`` compares the two.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from annsample.errors import ItemIndexError
from annsample.torch_ivf import InvertedLists, build_inverted_lists, search_inverted_lists

try:
    import faiss
except ImportError:  # the torch backends ("exact", "torch_ivf") run without it, e.g. on CUDA 13
    faiss = None

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "faiss-gpu", "exact", "torch_ivf")
METRICS = ("ip", "l2_augmented", "cosine")
STATE_DICT_FORMAT = "annsample.ItemIndex/1"

# FAISS GPU selects at most this many results (k) and lists (nprobe) per query.
GPU_MAX_SELECTION = 2048
# FAISS k-means defaults: it subsamples to 256 points per centroid and warns below 39.
MAX_POINTS_PER_CENTROID = 256
MIN_POINTS_PER_CENTROID = 39
# Score blocks hold at most this many float32 values (64 MiB), whatever N and Q are.
_BLOCK_ELEMENTS = 1 << 24

# (n_train, nlist) pairs already warned about, so periodic retrains log the warning once.
_warned_small_training_sets: set[tuple[int, int]] = set()


def default_nlist(n: int) -> int:
    """The IVF list count for a catalog of ``n`` items: round(sqrt(n)), at most n // 39, at least 1.

    sqrt(n) lists of about sqrt(n) items balance the two costs of a query (scoring the centroids
    and scanning the probed lists); the cap keeps the 39 training points per centroid FAISS's
    k-means asks for. ``sampler.index.nlist: 0`` (the default) means this.

    >>> default_nlist(12101), default_nlist(1_000_000), default_nlist(100)
    (110, 1000, 2)
    """
    n = _as_int(n, "n")
    if n < 1:
        raise ItemIndexError(f"the catalog must hold at least one item, got n={n}")
    return max(1, min(round(math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query for ``nlist`` lists: ceil(nlist / 8), at least 1 (an eighth of the
    catalog scanned per query). ``sampler.index.nprobe: 0`` (the default) means this.

    >>> default_nprobe(110), default_nprobe(1000), default_nprobe(2)
    (14, 125, 1)
    """
    nlist = _as_int(nlist, "nlist")
    if nlist < 1:
        raise ItemIndexError(f"nlist={nlist} must be positive")
    return max(1, math.ceil(nlist / 8))


def resolve_nlist_nprobe(nlist: int, nprobe: int, n: int) -> tuple[int, int]:
    """(nlist, nprobe) for a catalog of ``n`` items, 0 meaning the default rule for either.

    >>> resolve_nlist_nprobe(0, 0, 12101), resolve_nlist_nprobe(128, 0, 12101)
    ((110, 14), (128, 16))
    """
    nlist = _as_int(nlist, "nlist") or default_nlist(n)
    nprobe = _as_int(nprobe, "nprobe") or default_nprobe(nlist)
    if nlist > n:
        raise ItemIndexError(
            f"nlist={nlist} is larger than the number of items N={n}; lower it, or set nlist=0 "
            f"for default_nlist(N) = {default_nlist(n)} (sqrt(N), at most N // 39)"
        )
    if nprobe > nlist:
        raise ItemIndexError(
            f"nprobe={nprobe} must be at most nlist={nlist}; lower it or set nprobe=0 for "
            f"default_nprobe(nlist) = {default_nprobe(nlist)} (nlist / 8)"
        )
    return nlist, nprobe


def _faiss_gpu_available() -> bool:
    """Whether this faiss build can run on a GPU and sees at least one."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_int(value: Any, name: str) -> int:
    """An int from an int-like value (not bool), else ItemIndexError."""
    if isinstance(value, bool):
        raise ItemIndexError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ItemIndexError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None


def _check_matrix(x: Any, name: str, dim: int | None) -> torch.Tensor:
    """Validate a (rows, dim) float32 tensor of finite values and return it detached."""
    if not isinstance(x, torch.Tensor):
        hint = "; wrap it with torch.from_numpy(...)" if isinstance(x, np.ndarray) else ""
        raise ItemIndexError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.dim() != 2:
        raise ItemIndexError(
            f"{name} must be 2-D (rows, d), got shape {tuple(x.shape)}; "
            f"for a single vector use {name}[None]"
        )
    if x.dtype != torch.float32:
        raise ItemIndexError(
            f"{name} must be float32, got {x.dtype}; convert it with {name}.float()"
        )
    if dim is not None and x.shape[1] != dim:
        raise ItemIndexError(
            f"{name} has d={x.shape[1]} columns but the index was created with dim={dim}"
        )
    x = x.detach()
    # One cheap pass: a row sum is non-finite iff the row has NaN/inf (or overflows float32).
    suspect = ~torch.isfinite(x.sum(dim=1))
    if bool(suspect.any()):
        rows = suspect.nonzero().flatten()
        bad = rows[~torch.isfinite(x[rows]).all(dim=1)]
        if bad.numel():
            raise ItemIndexError(
                f"{name} has {bad.numel()} of {x.shape[0]} rows with NaN or inf "
                f"(first at row {int(bad[0])}); the embeddings diverged or were not initialised"
            )
        raise ItemIndexError(
            f"{name} has {rows.numel()} rows whose values are so large their sum overflows "
            f"float32 (first at row {int(rows[0])}); rescale the embeddings"
        )
    return x


def exact_topk(
    xq: torch.Tensor, xb: torch.Tensor, k: int, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of every query over every row of ``xb``: the reference.

    Args:
        xq: (Q, d) float32 queries.
        xb: (N, d) float32 database vectors, on the same device as ``xq``.
        k: results per query, 1 <= k <= N.
        chunk_size: rows of ``xb`` scored at a time. Queries are blocked too, so no score block
            exceeds 2**24 values: a Q x N matrix is never materialised.

    Returns:
        D: (Q, k) float32 inner products, descending along each row.
        I: (Q, k) int64 row numbers into ``xb``.
    """
    xq = _check_matrix(xq, "xq", None)
    xb = _check_matrix(xb, "xb", xq.shape[1])
    if xq.device != xb.device:
        raise ItemIndexError(f"xq is on {xq.device} but xb is on {xb.device}; move one of them")
    n = xb.shape[0]
    k = _as_int(k, "k")
    if not 1 <= k <= n:
        raise ItemIndexError(f"k={k} must be between 1 and the number of rows N={n}")
    chunk_size = _as_int(chunk_size, "chunk_size")
    if chunk_size < 1:
        raise ItemIndexError(f"chunk_size={chunk_size} must be positive")
    chunk_size = min(chunk_size, n)
    nq = xq.shape[0]
    D = torch.empty(nq, k, dtype=torch.float32, device=xq.device)
    I = torch.empty(nq, k, dtype=torch.int64, device=xq.device)
    q_block = max(1, _BLOCK_ELEMENTS // chunk_size)
    with torch.no_grad():
        for q0 in range(0, nq, q_block):
            q = xq[q0 : q0 + q_block]
            best_D = best_I = None
            for b0 in range(0, n, chunk_size):
                scores = q @ xb[b0 : b0 + chunk_size].T  # (q, chunk)
                d, i = scores.topk(min(k, scores.shape[1]), dim=1)
                i += b0
                if best_D is not None:
                    # Merge the running top-k with this chunk's top-k.
                    d, order = torch.cat([best_D, d], dim=1).topk(
                        min(k, best_D.shape[1] + d.shape[1]), dim=1
                    )
                    i = torch.cat([best_I, i], dim=1).gather(1, order)
                best_D, best_I = d, i
            D[q0 : q0 + q_block] = best_D
            I[q0 : q0 + q_block] = best_I
    return D, I


def recall_at_k(I_approx: torch.Tensor, I_exact: torch.Tensor) -> float:
    """Mean over queries of |approx ∩ exact| / k, ignoring -1 entries.

    Args:
        I_approx: (Q, k) int64 ids from an approximate search (-1 = no result).
        I_exact: (Q, k) int64 ids from the exact search; the denominator of each row is its
            number of valid (non -1) ids.
    """
    for name, ids in (("I_approx", I_approx), ("I_exact", I_exact)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ItemIndexError(f"{name} must be a 2-D (Q, k) tensor of ids")
    if I_approx.shape != I_exact.shape:
        raise ItemIndexError(
            f"I_approx has shape {tuple(I_approx.shape)} but I_exact has shape "
            f"{tuple(I_exact.shape)}; search both with the same queries and k"
        )
    nq, k = I_exact.shape
    I_approx = I_approx.to(I_exact.device)
    hits = torch.empty(nq, dtype=torch.float64, device=I_exact.device)
    rows = max(1, _BLOCK_ELEMENTS // max(1, k * k))
    for r0 in range(0, nq, rows):
        a, e = I_approx[r0 : r0 + rows], I_exact[r0 : r0 + rows]
        match = (a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)  # (rows, k, k)
        hits[r0 : r0 + rows] = match.any(dim=2).sum(dim=1).double()
    valid = (I_exact >= 0).sum(dim=1)
    keep = valid > 0
    if not bool(keep.any()):
        raise ItemIndexError("I_exact has no valid ids (all -1); recall is undefined")
    return float((hits[keep] / valid[keep].double()).mean())


@dataclass
class _Contents:
    """One complete, immutable version of an index; searches read exactly one of these."""

    version: int
    ntotal: int
    ids: torch.Tensor  # (N,) int64 caller ids by position
    centroids: torch.Tensor | None  # (nlist, d') float32 on CPU; None for the exact backend
    norms: torch.Tensor | None  # (N,) float32 row norms (cosine: turns scores back into IPs)
    max_norm: float | None  # l2_augmented: the M of the extra coordinate sqrt(M^2 - |x|^2)
    ivf: Any = None  # faiss.IndexIVFFlat on CPU (faiss backend; kept for faiss-gpu state_dict)
    gpu_ivf: Any = None  # faiss GPU IVF index (faiss-gpu backend)
    gpu_resources: Any = None
    gpu_lock: threading.Lock | None = None  # GPU nprobe is index state, so searches serialise
    xb: torch.Tensor | None = None  # (N, d') stored vectors (exact backend)
    lists: InvertedLists | None = None  # torch_ivf backend, on the search device


class ItemIndex:
    """Inner-product top-k search over item embeddings, versioned by the training step that built it.

    Args:
        dim: embedding dimension d.
        nlist: number of IVF lists (k-means centroids).
        nprobe: lists visited per query; settable, 1 <= nprobe <= nlist.
        backend: "faiss" (CPU IndexIVFFlat), "faiss-gpu" (FAISS GPU IVF), "exact" (chunked torch
            matmul top-k on the tensors' device), "torch_ivf" (the same IVF in pure torch on the
            tensors' device, see :mod:`annsample.torch_ivf`) or "auto" (faiss-gpu if FAISS sees a
            GPU and xb is on CUDA, else torch_ivf if xb is on CUDA, else faiss; torch_ivf when
            faiss is not installed), resolved at the first build.
        metric: how inner-product search is made IVF-friendly. "ip": plain inner-product IVF with
            spherical k-means (FAISS's default); "l2_augmented": MIPS -> L2 reduction, xb gets an
            extra coordinate sqrt(M^2 - |x|^2) and xq a 0, so lists and probes follow L2 in that
            space; "cosine": rows are normalised, so retrieval ranks by cosine. Search scores D are
            true inner products with the indexed vectors for every metric.
        seed: seeds k-means initialisation and training-set subsampling (mixed with the step).
        kmeans_iters: k-means iterations per build or retrain.
        max_train_points: k-means trains on at most this many rows, sampled without replacement;
            None means nlist * 256, FAISS's default.

    Searches may run concurrently with each other and with a refresh of the same index (they read
    one complete version); build, re_add, retrain and load_state_dict must not run concurrently
    with each other.

    Example:
        >>> xb = torch.randn(2000, 16)
        >>> index = ItemIndex(16, nlist=8, nprobe=8, backend="faiss").build(xb, step=3)
        >>> D, I = index.search(xb[:2], k=5)
        >>> tuple(I.shape), index.version, index.ntotal
        ((2, 5), 3, 2000)
        >>> bool((I == exact_topk(xb[:2], xb, 5)[1]).all())
        True
    """

    def __init__(
        self,
        dim: int,
        nlist: int = 1024,
        nprobe: int = 32,
        backend: str = "auto",
        metric: str = "ip",
        seed: int = 0,
        kmeans_iters: int = 10,
        max_train_points: int | None = None,
    ) -> None:
        self.dim = _as_int(dim, "dim")
        if self.dim < 1:
            raise ItemIndexError(f"dim={self.dim} must be positive")
        self._nlist = _as_int(nlist, "nlist")
        if self._nlist < 1:
            raise ItemIndexError(f"nlist={self._nlist} must be positive")
        if backend not in BACKENDS:
            raise ItemIndexError(
                f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if backend in ("faiss", "faiss-gpu") and faiss is None:
            raise ItemIndexError(
                f"backend {backend!r} needs the faiss package, which is not installed; install "
                "faiss-cpu, or use backend='torch_ivf' (the same IVF in torch, on any device)"
            )
        if backend == "faiss-gpu" and not _faiss_gpu_available():
            raise ItemIndexError(
                "backend 'faiss-gpu' was requested but this faiss build sees no GPU "
                f"(faiss {faiss.__version__}, get_num_gpus() == 0); install faiss-gpu on a CUDA "
                "machine, or use backend='exact' (torch on CUDA) or 'faiss' (CPU)"
            )
        if metric not in METRICS:
            raise ItemIndexError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.requested_backend = backend
        self.metric = metric
        self.seed = _as_int(seed, "seed")
        self.kmeans_iters = _as_int(kmeans_iters, "kmeans_iters")
        if self.kmeans_iters < 0:
            raise ItemIndexError(f"kmeans_iters={self.kmeans_iters} must be >= 0")
        if max_train_points is not None:
            max_train_points = _as_int(max_train_points, "max_train_points")
            if max_train_points < self._nlist:
                raise ItemIndexError(
                    f"max_train_points={max_train_points} is below nlist={self._nlist}: k-means "
                    f"needs at least one point per centroid (FAISS advises "
                    f"{MIN_POINTS_PER_CENTROID * self._nlist}); raise it or pass None"
                )
        self.max_train_points = max_train_points
        self._resolved: str | None = None if backend == "auto" else backend
        self._nprobe = self._check_nprobe(nprobe)
        self._contents: _Contents | None = None

    # ----------------------------------------------------------------------------- properties

    @property
    def backend(self) -> str:
        """The backend in use ("faiss", "faiss-gpu", "exact", "torch_ivf"); "auto" before a build."""
        return self._resolved or self.requested_backend

    @property
    def nlist(self) -> int:
        return self._nlist

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = self._check_nprobe(value)

    @property
    def version(self) -> int:
        """The training step whose embeddings built the current contents; -1 before any build."""
        contents = self._contents
        return -1 if contents is None else contents.version

    @property
    def ntotal(self) -> int:
        contents = self._contents
        return 0 if contents is None else contents.ntotal

    @property
    def centroids(self) -> torch.Tensor | None:
        """A (nlist, d') float32 CPU copy of the centroids (d' = dim + 1 for l2_augmented).

        None before the first build and for the exact backend, which has no lists.
        """
        contents = self._contents
        if contents is None or contents.centroids is None:
            return None
        return contents.centroids.clone()

    @property
    def ids(self) -> torch.Tensor | None:
        """A (N,) int64 copy of the ids of the indexed rows, in row order."""
        contents = self._contents
        return None if contents is None else contents.ids.clone()

    def __repr__(self) -> str:
        return (
            f"ItemIndex(dim={self.dim}, nlist={self._nlist}, nprobe={self._nprobe}, "
            f"backend={self.backend!r}, metric={self.metric!r}, ntotal={self.ntotal}, "
            f"version={self.version})"
        )

    # ----------------------------------------------------------------------------- refresh API

    def build(self, xb: torch.Tensor, ids: torch.Tensor | None = None, step: int = 0) -> ItemIndex:
        """Train centroids with k-means on ``xb`` and add every row.

        Args:
            xb: (N, d) float32 item embeddings (e.g. the item table without its padding row).
            ids: (N,) int64 non-negative unique ids returned by ``search``. The default is the
                item ids the samplers expect, ``torch.arange(1, N + 1)``: row r of ``xb`` is item
                r + 1, as for an item table without its padding row. Pass ``torch.arange(N)`` to
                get row numbers back instead.
            step: the training step these embeddings come from; becomes ``version``.

        Returns:
            self, so ``ItemIndex(...).build(xb)`` reads as one expression.
        """
        start = time.perf_counter()
        xb = _check_matrix(xb, "xb", self.dim)
        ids = self._check_ids(ids, xb.shape[0], xb.device)
        step = _as_int(step, "step")
        if self._resolved is None:
            self._resolved = self._resolve_backend(xb)
        stored, norms, max_norm = self._transform(self._to_compute_device(xb))
        centroids = None
        if self._resolved != "exact":
            self._check_enough_rows(xb.shape[0])
            train = self._training_sample(stored, step)
            generator = torch.Generator().manual_seed(self._seed_for(step) + 1)
            init = train[
                torch.randperm(train.shape[0], generator=generator)[: self._nlist].to(train.device)
            ]
            centroids = self._kmeans(train, init)
        self._contents = self._fill(stored, centroids, ids, norms, max_norm, step)
        self._log("build", start)
        return self

    def re_add(self, xb: torch.Tensor, step: int, ids: torch.Tensor | None = None) -> None:
        """Keep the centroids; re-assign and re-add all rows of ``xb`` (the cheap refresh tier).

        Args:
            xb: (N, d) float32 current item embeddings.
            step: the training step these embeddings come from; becomes ``version``.
            ids: (N,) int64 ids; default: the ids of the current contents (same N required).
        """
        start = time.perf_counter()
        contents = self._require_centroids("re_add")
        xb = _check_matrix(xb, "xb", self.dim)
        ids = self._ids_for_refresh(ids, xb, contents)
        step = _as_int(step, "step")
        # l2_augmented keeps the M the centroids were trained with: recomputing it would move every
        # row's extra coordinate while the centroids keep the old one, and one list would swallow
        # most rows. Rows that outgrow M get extra coordinate 0 until the next retrain.
        stored, norms, max_norm = self._transform(
            self._to_compute_device(xb), max_norm=contents.max_norm
        )
        self._contents = self._fill(stored, contents.centroids, ids, norms, max_norm, step)
        self._log("re_add", start)

    def retrain(self, xb: torch.Tensor, step: int, ids: torch.Tensor | None = None) -> None:
        """Re-run k-means warm-started from the current centroids, then add (the expensive tier).

        Args: as for ``re_add``.
        """
        start = time.perf_counter()
        contents = self._require_centroids("retrain")
        xb = _check_matrix(xb, "xb", self.dim)
        ids = self._ids_for_refresh(ids, xb, contents)
        step = _as_int(step, "step")
        stored, norms, max_norm = self._transform(self._to_compute_device(xb))
        centroids = None
        if self._resolved != "exact":
            self._check_enough_rows(xb.shape[0])
            train = self._training_sample(stored, step)
            # Warm start: the old centroids are close, so a few iterations suffice.
            init = contents.centroids.to(train.device)
            if self.metric == "l2_augmented" and contents.max_norm is not None:
                init = _shift_augmented_centroids(init, contents.max_norm, max_norm)
            centroids = self._kmeans(train, init)
        self._contents = self._fill(stored, centroids, ids, norms, max_norm, step)
        self._log("retrain", start)

    # ----------------------------------------------------------------------------- search

    def search(self, xq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate inner-product top-k (exact for the exact backend or nprobe == nlist).

        Args:
            xq: (Q, d) float32 queries (e.g. hidden states), on any device.
            k: results per query, 1 <= k <= ntotal (and <= 2048 on faiss-gpu).

        Returns:
            D: (Q, k) float32 true inner products xq · x with the indexed vectors, descending.
            I: (Q, k) int64 ids; -1 where the probed lists held fewer than k items (D = -inf).
            Both on ``xq``'s device.
        """
        contents = self._contents  # one read: the whole search uses this version
        nprobe = self._nprobe
        if contents is None or contents.ntotal == 0:
            raise ItemIndexError("the index is empty: call build(xb) (or re_add after loading)")
        xq = _check_matrix(xq, "xq", self.dim)
        k = _as_int(k, "k")
        if not 1 <= k <= contents.ntotal:
            raise ItemIndexError(
                f"k={k} must be between 1 and the number of indexed items ntotal={contents.ntotal}"
            )
        if self._resolved == "faiss-gpu" and k > GPU_MAX_SELECTION:
            raise ItemIndexError(
                f"k={k} exceeds FAISS GPU's limit of {GPU_MAX_SELECTION}; lower k or use "
                "backend='exact'"
            )
        out_device = xq.device
        with torch.no_grad():
            if self._resolved == "exact":
                assert contents.xb is not None
                q = self._transform_queries(xq.to(contents.xb.device))
                D, I = exact_topk(q, contents.xb, k)
            elif contents.lists is not None:
                q = self._transform_queries(xq.to(contents.lists.device))
                D, I = search_inverted_lists(contents.lists, q.contiguous(), k, nprobe)
            else:
                q = self._transform_queries(xq.cpu()).contiguous().numpy()
                if contents.gpu_ivf is not None:
                    assert contents.gpu_lock is not None
                    with contents.gpu_lock:
                        faiss.GpuParameterSpace().set_index_parameter(
                            contents.gpu_ivf, "nprobe", nprobe
                        )
                        D_np, I_np = contents.gpu_ivf.search(q, k)
                else:
                    params = faiss.SearchParametersIVF()
                    params.nprobe = nprobe
                    D_np, I_np = contents.ivf.search(q, k, params=params)
                D, I = torch.from_numpy(D_np), torch.from_numpy(I_np)
            D, I = self._finish(contents, D, I)
        return D.to(out_device), I.to(out_device)

    def list_sizes(self) -> torch.Tensor:
        """(nlist,) int64 number of items in each IVF list (a balance check: one list holding most
        items means every probe scans most of the catalog)."""
        contents = self._require_centroids("list_sizes")
        if contents.centroids is None:
            raise ItemIndexError("the exact backend has no IVF lists")
        if contents.ntotal == 0:
            return torch.zeros(self._nlist, dtype=torch.int64)
        ivf = contents.ivf if contents.ivf is not None else faiss.index_gpu_to_cpu(contents.gpu_ivf)
        invlists = faiss.downcast_InvertedLists(ivf.invlists)
        return torch.tensor([invlists.list_size(i) for i in range(self._nlist)], dtype=torch.int64)

    # ----------------------------------------------------------------------------- state

    def state_dict(self, with_vectors: bool = True) -> dict[str, Any]:
        """Everything needed to rebuild this index exactly, as tensors and plain values.

        Args:
            with_vectors: include the (N, d') indexed vectors so ``load_state_dict`` restores the
                exact contents; without them the loaded index holds centroids only and needs
                ``re_add``.
        """
        contents = self._contents
        state: dict[str, Any] = {
            "format": STATE_DICT_FORMAT,
            "settings": {
                "dim": self.dim,
                "nlist": self._nlist,
                "nprobe": self._nprobe,
                "backend": self.requested_backend,
                "metric": self.metric,
                "seed": self.seed,
                "kmeans_iters": self.kmeans_iters,
                "max_train_points": self.max_train_points,
            },
            "version": self.version,
            "centroids": None,
            "ids": None,
            "norms": None,
            "max_norm": None,
            "vectors": None,
        }
        if contents is None:
            return state
        state.update(
            version=contents.version,
            centroids=None if contents.centroids is None else contents.centroids.clone(),
            ids=contents.ids.cpu().clone(),
            norms=None if contents.norms is None else contents.norms.cpu().clone(),
            max_norm=contents.max_norm,
        )
        if with_vectors and contents.ntotal:
            state["vectors"] = self._stored_vectors(contents)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore centroids, version, nprobe and (if present) the exact contents.

        ``dim``, ``nlist`` and ``metric`` must match this index. Exact-backend vectors are restored
        on the device their tensor is on (move them first, like torch.load's map_location).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_DICT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ItemIndexError(
                f"not an ItemIndex state_dict (format {found!r}, expected {STATE_DICT_FORMAT!r})"
            )
        settings = state["settings"]
        for key in ("dim", "nlist", "metric"):
            mine = self.dim if key == "dim" else self._nlist if key == "nlist" else self.metric
            if settings[key] != mine:
                raise ItemIndexError(
                    f"state_dict has {key}={settings[key]!r} but this index has {key}={mine!r}; "
                    "create the index with ItemIndex.from_state_dict(state) instead"
                )
        self._nprobe = self._check_nprobe(settings["nprobe"])
        if state["ids"] is None:
            self._contents = None
            return
        vectors = state["vectors"]
        centroids = state["centroids"]
        if self._resolved is None:
            device = vectors.device if vectors is not None else torch.device("cpu")
            self._resolved = self._resolve_backend(torch.empty(0, device=device))
        if self._resolved != "exact" and centroids is None:
            raise ItemIndexError(
                "state_dict comes from an exact index and has no centroids; build() this "
                "IVF index from the embeddings instead"
            )
        if centroids is not None:
            centroids = centroids.float().cpu().contiguous()
        version = int(state["version"])
        ids = state["ids"].long()
        norms, max_norm = state["norms"], state["max_norm"]
        if vectors is None:
            # Centroids only: searches are refused until re_add fills the lists.
            self._contents = _Contents(version, 0, ids, centroids, norms, max_norm)
            return
        stored = self._to_compute_device(vectors.float()).clone().contiguous()
        self._contents = self._fill(
            stored, centroids, ids.to(stored.device), norms, max_norm, version, owned=True
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ItemIndex:
        """A new index with the settings stored in ``state``, loaded from it."""
        if not isinstance(state, dict) or "settings" not in state:
            raise ItemIndexError("not an ItemIndex state_dict: it has no 'settings' entry")
        index = cls(**state["settings"])
        index.load_state_dict(state)
        return index

    # ----------------------------------------------------------------------------- internals

    def _check_nprobe(self, nprobe: Any) -> int:
        nprobe = _as_int(nprobe, "nprobe")
        if not 1 <= nprobe <= self._nlist:
            raise ItemIndexError(f"nprobe={nprobe} must be between 1 and nlist={self._nlist}")
        if self._resolved == "faiss-gpu" and nprobe > GPU_MAX_SELECTION:
            raise ItemIndexError(
                f"nprobe={nprobe} exceeds FAISS GPU's limit of {GPU_MAX_SELECTION}; lower nprobe"
            )
        return nprobe

    def _check_ids(self, ids: Any, n: int, device: torch.device) -> torch.Tensor:
        if ids is None:
            return torch.arange(1, n + 1, device=device)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] != n:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ItemIndexError(
                f"ids must be a 1-D tensor with one id per row of xb ({n}), got {shape}"
            )
        if ids.dtype != torch.int64:
            raise ItemIndexError(
                f"ids must be int64, got {ids.dtype}; convert them with ids.long()"
            )
        if n and int(ids.min()) < 0:
            raise ItemIndexError("ids must be non-negative: search uses -1 to mean 'no result'")
        if torch.unique(ids).numel() != n:
            raise ItemIndexError("ids must be unique: two rows of xb share an id")
        return ids.detach().clone()

    def _ids_for_refresh(self, ids: Any, xb: torch.Tensor, contents: _Contents) -> torch.Tensor:
        if ids is not None:
            return self._check_ids(ids, xb.shape[0], xb.device)
        if xb.shape[0] != contents.ids.shape[0]:
            raise ItemIndexError(
                f"xb has {xb.shape[0]} rows but the index holds {contents.ids.shape[0]} ids; "
                "pass ids= for the new rows, or build() a new index"
            )
        return contents.ids

    def _require_centroids(self, what: str) -> _Contents:
        contents = self._contents
        if contents is None:
            raise ItemIndexError(f"{what} needs a built index: call build(xb) first")
        return contents

    def _check_enough_rows(self, n: int) -> None:
        if self._nlist > n:
            raise ItemIndexError(
                f"nlist={self._nlist} is larger than the number of items N={n}; lower nlist to at "
                f"most N (default_nlist(N) = {default_nlist(n)}: sqrt(N), at most N // 39)"
            )

    def _resolve_backend(self, xb: torch.Tensor) -> str:
        if self.requested_backend != "auto":
            return self.requested_backend
        if xb.is_cuda:
            return "faiss-gpu" if _faiss_gpu_available() else "torch_ivf"
        return "faiss" if faiss is not None else "torch_ivf"

    def _to_compute_device(self, xb: torch.Tensor) -> torch.Tensor:
        """Where k-means and assignment run: the exact backend's device, CPU for faiss unless on CUDA."""
        contents = self._contents
        if self._resolved == "exact" and contents is not None and contents.xb is not None:
            return xb.to(contents.xb.device)
        if self._resolved == "torch_ivf" and contents is not None and contents.lists is not None:
            return xb.to(contents.lists.device)
        if self._resolved == "faiss":
            return xb.cpu()
        return xb

    def _transform(
        self, xb: torch.Tensor, max_norm: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """Map xb (N, d) into the searched space: (stored (N, d'), norms, max_norm).

        For metric "ip" ``stored`` may alias ``xb``. For "l2_augmented", ``max_norm`` fixes M (a
        re-add keeps the centroids' M); None takes the largest row norm of ``xb``.
        """
        if self.metric == "ip":
            return xb.contiguous(), None, None
        squared = (xb * xb).sum(dim=1)  # (N,)
        if self.metric == "cosine":
            norms = squared.sqrt()
            return (xb / norms.clamp_min(1e-30)[:, None]).contiguous(), norms, None
        # l2_augmented: every stored row gets norm M, so L2 in d + 1 dims ranks like IP in d.
        max_squared = float(squared.max()) if max_norm is None else max_norm**2
        extra = (max_squared - squared).clamp_min(0).sqrt()
        stored = torch.cat([xb, extra[:, None]], dim=1).contiguous()
        return stored, None, max_squared**0.5

    def _transform_queries(self, xq: torch.Tensor) -> torch.Tensor:
        if self.metric == "l2_augmented":
            # The 0 coordinate makes xq · x_aug == xq · x exactly.
            return torch.cat([xq, xq.new_zeros(xq.shape[0], 1)], dim=1)
        return xq

    def _seed_for(self, step: int) -> int:
        return int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0])

    def _training_sample(self, stored: torch.Tensor, step: int) -> torch.Tensor:
        n = stored.shape[0]
        limit = self.max_train_points or self._nlist * MAX_POINTS_PER_CENTROID
        if n > limit:
            generator = torch.Generator().manual_seed(self._seed_for(step))
            rows = torch.randperm(n, generator=generator)[:limit].to(stored.device)
            stored = stored[rows]
        n_train = stored.shape[0]
        key = (n_train, self._nlist)
        if (
            n_train < MIN_POINTS_PER_CENTROID * self._nlist
            and key not in _warned_small_training_sets
        ):
            _warned_small_training_sets.add(key)
            logger.warning(
                "k-means trains %d points for nlist=%d centroids; FAISS advises at least %d "
                "(39 per centroid): lower nlist or index more items. Logged once.",
                n_train,
                self._nlist,
                MIN_POINTS_PER_CENTROID * self._nlist,
            )
        return stored

    def _kmeans(self, train: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        """Lloyd iterations in the stored space; spherical unless metric is l2_augmented."""
        spherical = self.metric != "l2_augmented"
        centroids = init.clone()
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
        n, nlist = train.shape[0], self._nlist
        for _ in range(self.kmeans_iters):
            assign = nearest_centroid(
                train, centroids, l2=not spherical, use_faiss=self._resolved != "torch_ivf"
            )
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

    def _fill(
        self,
        stored: torch.Tensor,
        centroids: torch.Tensor | None,
        ids: torch.Tensor,
        norms: torch.Tensor | None,
        max_norm: float | None,
        version: int,
        owned: bool = False,
    ) -> _Contents:
        """New contents holding ``stored`` (N, d'); the caller swaps them in with one assignment.

        ``owned`` says ``stored`` is already a private copy (the exact backend keeps it as is).
        """
        n = stored.shape[0]
        if self._resolved == "exact":
            if self.metric == "ip" and not owned:
                stored = stored.clone()  # it aliases the caller's table, which keeps training
            if norms is not None:
                norms = norms.to(stored.device)
            return _Contents(version, n, ids, None, norms, max_norm, xb=stored)
        assert centroids is not None
        if self._resolved == "torch_ivf":
            lists = build_inverted_lists(stored, centroids, l2=self.metric == "l2_augmented")
            if norms is not None:
                norms = norms.to(stored.device)
            return _Contents(version, n, ids, centroids, norms, max_norm, lists=lists)
        assign = nearest_centroid(
            stored, centroids.to(stored.device), l2=self.metric == "l2_augmented"
        )
        ivf = _ivf_from_assignment(stored.cpu(), centroids, assign.cpu(), self.metric)
        contents = _Contents(
            version,
            n,
            ids.cpu(),
            centroids,
            None if norms is None else norms.cpu(),
            max_norm,
            ivf=ivf,
        )
        if self._resolved == "faiss-gpu":
            device = stored.device.index if stored.is_cuda else torch.cuda.current_device()
            contents.gpu_resources = faiss.StandardGpuResources()
            contents.gpu_ivf = faiss.index_cpu_to_gpu(contents.gpu_resources, device, ivf)
            contents.gpu_lock = threading.Lock()
            contents.ivf = None  # the GPU copy is the index; state_dict copies it back
        return contents

    def _finish(
        self, contents: _Contents, D: torch.Tensor, I: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions -> caller ids, -1/-inf for missing results, cosine scores -> inner products."""
        missing = I < 0
        positions = I.clamp_min(0)
        if contents.norms is not None:
            # cosine: D = xq · x/|x|, so xq · x = D |x|; re-sort so D stays descending.
            D = D * contents.norms.to(D.device)[positions]
            D = D.masked_fill(missing, float("-inf"))
            D, order = D.sort(dim=1, descending=True, stable=True)
            positions, missing = positions.gather(1, order), missing.gather(1, order)
        D = D.masked_fill(missing, float("-inf"))
        I = contents.ids.to(positions.device)[positions].masked_fill(missing, -1)
        return D, I

    def _stored_vectors(self, contents: _Contents) -> torch.Tensor:
        if contents.xb is not None:
            return contents.xb.cpu().clone()
        if contents.lists is not None:
            return contents.lists.vectors().cpu()
        ivf = contents.ivf if contents.ivf is not None else faiss.index_gpu_to_cpu(contents.gpu_ivf)
        return torch.from_numpy(_ivf_vectors(ivf, contents.ntotal))

    def _log(self, what: str, start: float) -> None:
        # the first build is worth a line; refreshes (every few steps) are in metrics.jsonl
        log = logger.info if what == "build" else logger.debug
        log(
            "index %s: version=%d ntotal=%d nlist=%d backend=%s metric=%s in %.3f s",
            what,
            self.version,
            self.ntotal,
            self._nlist,
            self.backend,
            self.metric,
            time.perf_counter() - start,
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
    if not x.is_cuda and use_faiss and faiss is not None:
        # FAISS's flat k=1 search fuses the GEMM with the arg-max: as fast as a bare sgemm here.
        flat = faiss.IndexFlatL2(x.shape[1]) if l2 else faiss.IndexFlatIP(x.shape[1])
        flat.add(centroids.cpu().contiguous().numpy())
        _, I = flat.search(x.contiguous().numpy(), 1)
        return torch.from_numpy(I[:, 0])
    # On CUDA a chunked matmul + argmax beats a round trip to the host (and needs no faiss).
    scores_bias = -0.5 * (centroids * centroids).sum(dim=1) if l2 else None
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    rows = max(1, _BLOCK_ELEMENTS // centroids.shape[0])
    centroids_t = centroids.T.contiguous()
    for r0 in range(0, x.shape[0], rows):
        scores = x[r0 : r0 + rows] @ centroids_t  # (rows, nlist)
        if scores_bias is not None:
            scores += scores_bias  # argmin |x-c|^2 == argmax x·c - |c|^2/2
        out[r0 : r0 + rows] = scores.argmax(dim=1)
    return out


def _shift_augmented_centroids(centroids: torch.Tensor, old: float, new: float) -> torch.Tensor:
    """(nlist, d + 1) l2_augmented centroids moved from M = ``old`` to M = ``new``.

    A row's extra coordinate sqrt(M^2 - |x|^2) squared shifts by new^2 - old^2 when M changes; the
    centroids' extra coordinate gets the same shift, so they stay where their rows now are.
    """
    shifted = centroids.clone()
    extra = shifted[:, -1]
    shifted[:, -1] = (extra * extra + (new * new - old * old)).clamp_min(0).sqrt()
    return shifted


def _ivf_from_assignment(
    stored: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, metric: str
) -> Any:
    """A CPU IndexIVFFlat over ``stored`` (N, d') with lists given by ``assign`` (N,) int64.

    Lists always score by inner product; only the coarse quantizer follows the metric (L2 in the
    augmented space for l2_augmented), so D is xq · x for every metric.
    """
    n, d = stored.shape
    nlist = centroids.shape[0]
    quantizer = faiss.IndexFlatL2(d) if metric == "l2_augmented" else faiss.IndexFlatIP(d)
    quantizer.add(centroids.numpy())
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    assert ivf.is_trained
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    counts = torch.bincount(assign, minlength=nlist).tolist()
    for list_no, count in enumerate(counts):
        if count:
            # Reserve each list once (resize keeps capacity), so add_core never reallocates.
            invlists.resize(list_no, count)
            invlists.resize(list_no, 0)
    x = stored.contiguous().numpy()
    positions = np.arange(n, dtype=np.int64)
    assign_np = np.ascontiguousarray(assign.numpy(), dtype=np.int64)
    ivf.add_core(n, faiss.swig_ptr(x), faiss.swig_ptr(positions), faiss.swig_ptr(assign_np))
    return ivf


def _ivf_vectors(ivf: Any, n: int) -> np.ndarray:
    """The (n, d) float32 vectors stored in an IndexIVFFlat whose ids are row positions."""
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    out = np.empty((n, ivf.d), dtype=np.float32)
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        positions = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size)
        out[positions] = codes.view(np.float32).reshape(size, ivf.d)
    return out
