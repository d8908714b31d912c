"""The ``faiss`` and ``faiss-gpu`` backends of :class:`annsample.index.ItemIndex`: IndexIVFFlat.

faiss is optional (the torch backends run without it, e.g. on CUDA 13): ``faiss`` is None when it
is not installed, and :func:`available` / :func:`gpu_available` say what this build can do. The
lists are written from a precomputed assignment (:func:`ivf_from_assignment`), so a re-add keeps
the centroids the index was trained with.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from annsample.index.clustering import nearest_centroid

try:
    import faiss
except ImportError:  # the torch backends ("exact", "torch_ivf") run without it, e.g. on CUDA 13
    faiss = None

# FAISS GPU selects at most this many results (k) and lists (nprobe) per query.
GPU_MAX_SELECTION = 2048


def available() -> bool:
    """Whether faiss is installed."""
    return faiss is not None


def gpu_available() -> bool:
    """Whether this faiss build can run on a GPU and sees at least one."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_threads(count: int) -> None:
    """FAISS's OpenMP pool size (a no-op without faiss)."""
    if faiss is not None:
        faiss.omp_set_num_threads(count)


def flat_assign(x: torch.Tensor, centroids: torch.Tensor, l2: bool) -> torch.Tensor:
    """(n,) int64 nearest centroid of every CPU row of ``x`` (n, d') by FAISS flat search."""
    # FAISS's flat k=1 search fuses the GEMM with the arg-max: as fast as a bare sgemm here.
    flat = faiss.IndexFlatL2(x.shape[1]) if l2 else faiss.IndexFlatIP(x.shape[1])
    flat.add(centroids.cpu().contiguous().numpy())
    _, I = flat.search(x.contiguous().numpy(), 1)
    return torch.from_numpy(I[:, 0])


class FaissIVF:
    """A CPU IndexIVFFlat whose ids are row positions (the ``faiss`` backend's contents)."""

    device = torch.device("cpu")

    def __init__(self, ivf: Any, ntotal: int) -> None:
        self.ivf = ivf
        self.ntotal = ntotal

    def search(self, xq: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, k) inner products and row positions (-1 = no result) of CPU queries xq (Q, d')."""
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        D, I = self.ivf.search(xq.numpy(), k, params=params)
        return torch.from_numpy(D), torch.from_numpy(I)

    def vectors(self) -> torch.Tensor:
        """(N, d') float32 the stored vectors in row order."""
        return torch.from_numpy(ivf_vectors(self.ivf, self.ntotal))

    def list_sizes(self) -> torch.Tensor:
        """(nlist,) int64 rows in each list."""
        invlists = faiss.downcast_InvertedLists(self.ivf.invlists)
        return torch.tensor(
            [invlists.list_size(i) for i in range(self.ivf.nlist)], dtype=torch.int64
        )

    def assignment(self) -> torch.Tensor:
        """(N,) int64 the list of every row, in row order."""
        return torch.from_numpy(ivf_assignment(self.ivf, self.ntotal))


class FaissGpuIVF:
    """A FAISS GPU IVF index (the ``faiss-gpu`` backend's contents); queries go in from the host."""

    device = torch.device("cpu")

    def __init__(self, cpu: FaissIVF, gpu_device: int) -> None:
        self.ntotal = cpu.ntotal
        self.resources = faiss.StandardGpuResources()
        self.ivf = faiss.index_cpu_to_gpu(self.resources, gpu_device, cpu.ivf)
        self.lock = threading.Lock()  # GPU nprobe is index state, so searches serialise

    def search(self, xq: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            faiss.GpuParameterSpace().set_index_parameter(self.ivf, "nprobe", nprobe)
            D, I = self.ivf.search(xq.numpy(), k)
        return torch.from_numpy(D), torch.from_numpy(I)

    def to_cpu(self) -> FaissIVF:
        return FaissIVF(faiss.index_gpu_to_cpu(self.ivf), self.ntotal)

    def vectors(self) -> torch.Tensor:
        return self.to_cpu().vectors()

    def assignment(self) -> torch.Tensor:
        return self.to_cpu().assignment()

    def list_sizes(self) -> torch.Tensor:
        return self.to_cpu().list_sizes()


def assign_rows(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """(n,) int64 the list of every row of ``x`` (n, d'), as :func:`build_store` assigns them."""
    return nearest_centroid(x, centroids.to(x.device), l2=metric == "l2_augmented")


def build_store(
    stored: torch.Tensor,
    centroids: torch.Tensor,
    metric: str,
    aliased: bool = False,
    assign: torch.Tensor | None = None,
) -> FaissIVF:
    """The ``faiss`` backend of ItemIndex: an IndexIVFFlat over ``stored`` (N, d') (a copy), with
    lists ``assign`` (N,) when given (else each row's nearest centroid)."""
    if assign is None:
        assign = assign_rows(stored, centroids, metric)
    ivf = ivf_from_assignment(stored.cpu(), centroids, assign.cpu(), metric)
    return FaissIVF(ivf, stored.shape[0])


def build_gpu_store(
    stored: torch.Tensor,
    centroids: torch.Tensor,
    metric: str,
    aliased: bool = False,
    assign: torch.Tensor | None = None,
) -> FaissGpuIVF:
    """The ``faiss-gpu`` backend: the CPU index of :func:`build_store` copied to ``stored``'s GPU."""
    device = stored.device.index if stored.is_cuda else torch.cuda.current_device()
    return FaissGpuIVF(build_store(stored, centroids, metric, assign=assign), device)


def ivf_from_assignment(
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


def ivf_assignment(ivf: Any, n: int) -> np.ndarray:
    """(n,) int64 the list of every row of an IndexIVFFlat whose ids are row positions."""
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    out = np.empty(n, dtype=np.int64)
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            out[faiss.rev_swig_ptr(invlists.get_ids(list_no), size)] = list_no
    return out


def ivf_vectors(ivf: Any, n: int) -> np.ndarray:
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
