"""The item index: inner-product top-k over item embeddings, versioned by the step that built it.

``ItemIndex`` takes tensors only (it never sees the model). It trains IVF centroids with k-means
(:mod:`annsample.index.clustering`), and hands the stored vectors and centroids to its backend,
chosen the way ``implicit`` picks its cpu/ or gpu/ module: one builder per backend module,

- ``faiss`` / ``faiss-gpu``: FAISS IndexIVFFlat on CPU or GPU (:mod:`annsample.index.faiss_ivf`);
- ``torch_ivf``: the same IVF in pure torch on the tensors' device (:mod:`annsample.index.torch_ivf`);
- ``exact``: chunked exact top-k (:mod:`annsample.index.exact`),

each returning contents with ``search(xq, k, nprobe)``, ``vectors()`` and ``list_sizes()``. The two
refresh tiers share one code path:

- ``re_add``: keep the centroids, re-assign and re-add all current embeddings (cheap);
- ``retrain``: k-means again, warm-started from the current centroids, then add (expensive).

Every refresh builds new contents beside the old ones and swaps a single reference, so a concurrent
``search`` always sees one complete version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from annsample.config import INDEX_BACKENDS, INDEX_METRICS
from annsample.errors import ItemIndexError
from annsample.index import clustering, exact, faiss_ivf, torch_ivf
from annsample.index.checks import as_int, check_matrix
from annsample.index.faiss_ivf import GPU_MAX_SELECTION

logger = logging.getLogger(__name__)

BACKENDS = INDEX_BACKENDS
METRICS = INDEX_METRICS
STATE_DICT_FORMAT = "annsample.ItemIndex/1"

# backend -> builder(stored (N, d'), centroids (nlist, d') or None, metric, aliased) -> contents
BACKEND_BUILDERS: dict[str, Callable[..., Any]] = {
    "exact": exact.build_store,
    "torch_ivf": torch_ivf.build_store,
    "faiss": faiss_ivf.build_store,
    "faiss-gpu": faiss_ivf.build_gpu_store,
}


@dataclass
class _Contents:
    """One complete, immutable version of an index; searches read exactly one of these."""

    version: int
    ntotal: int
    ids: torch.Tensor  # (N,) int64 caller ids by position
    centroids: torch.Tensor | None  # (nlist, d') float32 on CPU; None for the exact backend
    norms: torch.Tensor | None  # (N,) float32 row norms (cosine: turns scores back into IPs)
    max_norm: float | None  # l2_augmented: the M of the extra coordinate sqrt(M^2 - |x|^2)
    store: Any = None  # the backend's contents (see BACKEND_BUILDERS); None: centroids only


class ItemIndex:
    """Inner-product top-k search over item embeddings, versioned by the training step that built it.

    Args:
        dim: embedding dimension d.
        nlist: number of IVF lists (k-means centroids).
        nprobe: lists visited per query; settable, 1 <= nprobe <= nlist.
        backend: "faiss" (CPU IndexIVFFlat), "faiss-gpu" (FAISS GPU IVF), "exact" (chunked torch
            matmul top-k on the tensors' device), "torch_ivf" (the same IVF in pure torch on the
            tensors' device, see :mod:`annsample.index.torch_ivf`) or "auto" (faiss-gpu if FAISS sees a
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
        self.dim = as_int(dim, "dim")
        if self.dim < 1:
            raise ItemIndexError(f"dim={self.dim} must be positive")
        self._nlist = as_int(nlist, "nlist")
        if self._nlist < 1:
            raise ItemIndexError(f"nlist={self._nlist} must be positive")
        if backend not in BACKENDS:
            raise ItemIndexError(
                f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if backend in ("faiss", "faiss-gpu") and not faiss_ivf.available():
            raise ItemIndexError(
                f"backend {backend!r} needs the faiss package, which is not installed; install "
                "faiss-cpu, or use backend='torch_ivf' (the same IVF in torch, on any device)"
            )
        if backend == "faiss-gpu" and not faiss_ivf.gpu_available():
            raise ItemIndexError(
                "backend 'faiss-gpu' was requested but this faiss build sees no GPU "
                f"(faiss {faiss_ivf.faiss.__version__}, get_num_gpus() == 0); install faiss-gpu on a CUDA "
                "machine, or use backend='exact' (torch on CUDA) or 'faiss' (CPU)"
            )
        if metric not in METRICS:
            raise ItemIndexError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.requested_backend = backend
        self.metric = metric
        self.seed = as_int(seed, "seed")
        self.kmeans_iters = as_int(kmeans_iters, "kmeans_iters")
        if self.kmeans_iters < 0:
            raise ItemIndexError(f"kmeans_iters={self.kmeans_iters} must be >= 0")
        if max_train_points is not None:
            max_train_points = as_int(max_train_points, "max_train_points")
            if max_train_points < self._nlist:
                raise ItemIndexError(
                    f"max_train_points={max_train_points} is below nlist={self._nlist}: k-means "
                    f"needs at least one point per centroid (FAISS advises "
                    f"{clustering.MIN_POINTS_PER_CENTROID * self._nlist}); raise it or pass None"
                )
        self.max_train_points = max_train_points
        self._resolved: str | None = None if backend == "auto" else backend
        self._nprobe = self._check_nprobe(nprobe)
        self._contents: _Contents | None = None
        self.last_reassigned = 0  # rows the last build / refresh assigned to lists

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

    @property
    def contents(self) -> Any:
        """The backend's contents of the current version (e.g. the torch_ivf
        :class:`~annsample.index.torch_ivf.InvertedLists`); None before a build."""
        contents = self._contents
        return None if contents is None else contents.store

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
        start, xb, step = self._begin(xb, step)
        ids = self._check_ids(ids, xb.shape[0], xb.device)
        if self._resolved is None:
            self._resolved = self._resolve_backend(xb)
        stored, norms, max_norm = self._transform(self._to_compute_device(xb))
        centroids = None
        if self._resolved != "exact":
            train = self._training_sample(stored, step)
            generator = torch.Generator().manual_seed(clustering.seed_for(self.seed, step) + 1)
            init = train[
                torch.randperm(train.shape[0], generator=generator)[: self._nlist].to(train.device)
            ]
            centroids = self._kmeans(train, init)
        self._contents = self._fill(stored, centroids, ids, norms, max_norm, step)
        self.last_reassigned = stored.shape[0]
        self._log("build", start)
        return self

    def re_add(
        self,
        xb: torch.Tensor,
        step: int,
        ids: torch.Tensor | None = None,
        reference: ItemIndex | None = None,
    ) -> None:
        """Keep the centroids; re-add all rows of ``xb`` (the cheap refresh tier).

        Every stored vector is replaced. Only the rows that changed since the current version are
        assigned to lists again: the others keep their list, which is the one a full assignment
        would give them (same vector, same centroids). With sparse gradients most rows of a large
        table do not change between refreshes, and the assignment (2·N·nlist·d FLOPs) is most of a
        re-add's cost; ``last_reassigned`` says how many rows were assigned.

        Args:
            xb: (N, d) float32 current item embeddings.
            step: the training step these embeddings come from; becomes ``version``.
            ids: (N,) int64 ids; default: the ids of the current contents (same N required).
            reference: the index whose stored vectors and lists the unchanged rows are found in
                (default: this one); a refresher builds each version in a new index with the
                published one's centroids and passes the published one here.
        """
        start, xb, step = self._begin(xb, step, clusters=False)
        contents, ids = self._refresh_inputs("re_add", xb, ids)
        # l2_augmented keeps the M the centroids were trained with: recomputing it would move every
        # row's extra coordinate while the centroids keep the old one, and one list would swallow
        # most rows. Rows that outgrow M get extra coordinate 0 until the next retrain.
        stored, norms, max_norm = self._transform(
            self._to_compute_device(xb), max_norm=contents.max_norm
        )
        previous = contents if reference is None else reference._contents
        assign = self._reassign(contents, previous, stored, ids)
        self._contents = self._fill(
            stored, contents.centroids, ids, norms, max_norm, step, assign=assign
        )
        self._log("re_add", start)

    def _reassign(
        self,
        contents: _Contents,
        previous: _Contents | None,
        stored: torch.Tensor,
        ids: torch.Tensor,
    ) -> torch.Tensor | None:
        """The lists of ``stored``'s rows for a re-add: ``previous``'s lists, with the rows whose
        stored vector changed assigned again; None (assign every row) when ``previous`` holds
        other rows or other centroids, or the backend has no lists."""
        store = None if previous is None else previous.store
        reusable = (
            self._resolved != "exact"
            and store is not None
            and previous.ntotal == stored.shape[0]
            and previous.max_norm == contents.max_norm
            and torch.equal(previous.ids, ids.to(previous.ids.device))
            and torch.equal(previous.centroids, contents.centroids)
        )
        if not reusable:
            self.last_reassigned = stored.shape[0]
            return None
        changed = (store.vectors().to(stored.device) != stored).any(dim=1).nonzero().squeeze(1)
        assign = store.assignment().to(stored.device)
        if changed.numel():
            builder = torch_ivf if self._resolved == "torch_ivf" else faiss_ivf
            assign[changed] = builder.assign_rows(
                stored[changed], contents.centroids, self.metric
            ).to(assign.device)
        self.last_reassigned = int(changed.numel())
        return assign

    def retrain(self, xb: torch.Tensor, step: int, ids: torch.Tensor | None = None) -> None:
        """Re-run k-means warm-started from the current centroids, then add (the expensive tier).

        Args: as for ``re_add``.
        """
        start, xb, step = self._begin(xb, step)
        contents, ids = self._refresh_inputs("retrain", xb, ids)
        stored, norms, max_norm = self._transform(self._to_compute_device(xb))
        centroids = None
        if self._resolved != "exact":
            train = self._training_sample(stored, step)
            # Warm start: the old centroids are close, so a few iterations suffice.
            init = contents.centroids.to(train.device)
            if self.metric == "l2_augmented" and contents.max_norm is not None:
                init = clustering.shift_augmented_centroids(init, contents.max_norm, max_norm)
            centroids = self._kmeans(train, init)
        self._contents = self._fill(stored, centroids, ids, norms, max_norm, step)
        self.last_reassigned = stored.shape[0]
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
        xq = check_matrix(xq, "xq", self.dim)
        k = as_int(k, "k")
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
            store = contents.store
            q = self._transform_queries(xq.to(store.device)).contiguous()
            D, I = store.search(q, k, nprobe)
            D, I = self._finish(contents, D, I)
        return D.to(out_device), I.to(out_device)

    def list_sizes(self) -> torch.Tensor:
        """(nlist,) int64 number of items in each IVF list (a balance check: one list holding most
        items means every probe scans most of the catalog)."""
        contents = self._require_centroids("list_sizes")
        if contents.centroids is None:
            raise ItemIndexError("the exact backend has no IVF lists")
        if contents.store is None:
            return torch.zeros(self._nlist, dtype=torch.int64)
        return contents.store.list_sizes().cpu()

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
            state["vectors"] = contents.store.vectors().cpu()
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
        nprobe = as_int(nprobe, "nprobe")
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

    def _begin(self, xb: Any, step: Any, clusters: bool = True) -> tuple[float, torch.Tensor, int]:
        """The opening of build / re_add / retrain: (start time, checked xb, checked step);
        ``clusters``: k-means will run, so xb needs at least nlist rows."""
        start = time.perf_counter()
        xb = check_matrix(xb, "xb", self.dim)
        if clusters and self._resolved != "exact":
            clustering.check_nlist_fits(self._nlist, xb.shape[0])
        return start, xb, as_int(step, "step")

    def _refresh_inputs(
        self, what: str, xb: torch.Tensor, ids: Any
    ) -> tuple[_Contents, torch.Tensor]:
        """The current contents and the ids of ``xb``'s rows (the current ids by default)."""
        contents = self._require_centroids(what)
        if ids is not None:
            return contents, self._check_ids(ids, xb.shape[0], xb.device)
        if xb.shape[0] != contents.ids.shape[0]:
            raise ItemIndexError(
                f"xb has {xb.shape[0]} rows but the index holds {contents.ids.shape[0]} ids; "
                "pass ids= for the new rows, or build() a new index"
            )
        return contents, contents.ids

    def _require_centroids(self, what: str) -> _Contents:
        contents = self._contents
        if contents is None:
            raise ItemIndexError(f"{what} needs a built index: call build(xb) first")
        return contents

    def _resolve_backend(self, xb: torch.Tensor) -> str:
        if self.requested_backend != "auto":
            return self.requested_backend
        if xb.is_cuda:
            return "faiss-gpu" if faiss_ivf.gpu_available() else "torch_ivf"
        return "faiss" if faiss_ivf.available() else "torch_ivf"

    def _to_compute_device(self, xb: torch.Tensor) -> torch.Tensor:
        """Where k-means and assignment run: the exact backend's device, CPU for faiss unless on CUDA."""
        store = self.contents
        if self._resolved in ("exact", "torch_ivf") and store is not None:
            return xb.to(store.device)
        if self._resolved == "faiss":
            return xb.cpu()
        return xb

    def _transform(
        self, xb: torch.Tensor, max_norm: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """(stored (N, d'), norms, max_norm): see :func:`clustering.to_stored_space`."""
        return clustering.to_stored_space(xb, self.metric, max_norm)

    def _transform_queries(self, xq: torch.Tensor) -> torch.Tensor:
        return clustering.queries_to_stored_space(xq, self.metric)

    def _training_sample(self, stored: torch.Tensor, step: int) -> torch.Tensor:
        seed = clustering.seed_for(self.seed, step)
        return clustering.training_sample(stored, self._nlist, self.max_train_points, seed)

    def _kmeans(self, train: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        """k-means in the stored space; spherical unless metric is l2_augmented."""
        return clustering.kmeans(
            train,
            init,
            self.kmeans_iters,
            spherical=self.metric != "l2_augmented",
            use_faiss=self._resolved != "torch_ivf",
        )

    def _fill(
        self,
        stored: torch.Tensor,
        centroids: torch.Tensor | None,
        ids: torch.Tensor,
        norms: torch.Tensor | None,
        max_norm: float | None,
        version: int,
        owned: bool = False,
        assign: torch.Tensor | None = None,
    ) -> _Contents:
        """New contents holding ``stored`` (N, d'); the caller swaps them in with one assignment.

        ``owned`` says ``stored`` is already a private copy (the exact backend keeps it as is);
        ``assign`` (N,) gives the IVF list of every row (default: each row's nearest centroid).
        """
        assert self._resolved is not None
        if self._resolved != "exact":
            assert centroids is not None
        aliased = self.metric == "ip" and not owned  # stored may be the caller's training table
        store = BACKEND_BUILDERS[self._resolved](
            stored, centroids, self.metric, aliased, assign=assign
        )
        device = store.device
        norms = None if norms is None else norms.to(device)
        return _Contents(
            version, stored.shape[0], ids.to(device), centroids, norms, max_norm, store
        )

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
