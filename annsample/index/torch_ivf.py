"""Pure-torch IVF search: inverted lists as ids sorted by list with offsets, on any torch device.

The ``torch_ivf`` backend of :class:`annsample.index.ItemIndex` (which trains the centroids with its
k-means and owns refresh, ids and metrics) stores its lists with :func:`build_inverted_lists` (its
backend builder is :func:`build_store`) and searches them with :func:`search_inverted_lists`. Nothing here needs FAISS, so the backend runs
wherever torch runs, on the model's device:

- assignment (:func:`assign_to_lists`) is a blocked matmul + argmax against the centroids;
- the lists are the stored vectors sorted by list (a stable sort of the assignment), with
  ``offsets`` (nlist + 1,) so list ``l`` is rows ``offsets[l]:offsets[l + 1]``;
- a search picks the ``nprobe`` best lists per query (coarse matmul + top-k), gathers the rows of
  those lists into a padded (Q', L) block, rescores them exactly against the query with one batched
  matmul, and keeps the top ``k``.

Vocabulary follows FAISS: ``xb`` database vectors, ``xq`` queries, ``nlist``, ``nprobe``, ``k``,
``D`` scores and ``I`` row numbers (-1 = no result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Blocks of work hold at most this many float32 values: 64 MiB on CPU, 1 GiB on CUDA, where fewer,
# larger kernels matter more than memory.
CPU_BLOCK_ELEMENTS = 1 << 24
CUDA_BLOCK_ELEMENTS = 1 << 28
SEARCH_METHODS = ("gather", "lists")


def default_block_elements(device: torch.device) -> int:
    """The block budget (float32 values per block) used on ``device`` unless one is given."""
    return CUDA_BLOCK_ELEMENTS if device.type == "cuda" else CPU_BLOCK_ELEMENTS


def _centroid_scores(
    x: torch.Tensor, centroids_t: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """(n, nlist) scores to maximise: x · c, or x · c - |c|^2 / 2 (the L2 ranking) with ``bias``."""
    scores = x @ centroids_t
    if bias is not None:
        scores += bias  # argmin |x - c|^2 == argmax x · c - |c|^2 / 2
    return scores


def _l2_bias(centroids: torch.Tensor, l2: bool) -> torch.Tensor | None:
    return -0.5 * (centroids * centroids).sum(dim=1) if l2 else None


def assign_to_lists(
    x: torch.Tensor,
    centroids: torch.Tensor,
    l2: bool = False,
    block_elements: int | None = None,
) -> torch.Tensor:
    """The list of every row: argmax x · c (inner product) or argmin |x - c|^2 (``l2``).

    Args:
        x: (n, d') float32 rows.
        centroids: (nlist, d') float32 centroids, on ``x``'s device.
        l2: rank centroids by L2 distance instead of inner product.
        block_elements: at most this many (row, centroid) scores are held at once.

    Returns:
        (n,) int64 list numbers on ``x``'s device.
    """
    block_elements = block_elements or default_block_elements(x.device)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    bias = _l2_bias(centroids, l2)
    centroids_t = centroids.T.contiguous()
    rows = max(1, block_elements // max(1, centroids.shape[0]))
    for r0 in range(0, x.shape[0], rows):
        out[r0 : r0 + rows] = _centroid_scores(x[r0 : r0 + rows], centroids_t, bias).argmax(dim=1)
    return out


@dataclass(frozen=True)
class InvertedLists:
    """IVF contents: the stored vectors sorted by list, with offsets.

    Attributes:
        centroids: (nlist, d') float32 coarse centroids.
        offsets: (nlist + 1,) int64; list ``l`` holds sorted rows ``offsets[l]:offsets[l + 1]``.
        rows: (N,) int64 original row number of each sorted row (what a search returns).
        xb: (N, d') float32 stored vectors in list order (``xb[i]`` is original row ``rows[i]``).
        l2: whether the coarse quantizer ranks centroids by L2 (else inner product).
        max_list_size: the largest list's length.

    All tensors live on one device, the device searches run on.
    """

    centroids: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor
    xb: torch.Tensor
    l2: bool
    max_list_size: int

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def ntotal(self) -> int:
        return self.xb.shape[0]

    @property
    def device(self) -> torch.device:
        return self.xb.device

    def list_sizes(self) -> torch.Tensor:
        """(nlist,) int64 number of rows in each list."""
        return self.offsets[1:] - self.offsets[:-1]

    def vectors(self) -> torch.Tensor:
        """(N, d') the stored vectors back in original row order (a new tensor)."""
        out = torch.empty_like(self.xb)
        out[self.rows] = self.xb
        return out

    def assignment(self) -> torch.Tensor:
        """(N,) int64 the list of every row, in original row order."""
        lists = torch.arange(self.nlist, device=self.device)
        out = torch.empty(self.ntotal, dtype=torch.int64, device=self.device)
        out[self.rows] = torch.repeat_interleave(lists, self.list_sizes())
        return out

    def search(self, xq: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The backend search of :class:`annsample.index.ItemIndex`: see :func:`search_inverted_lists`."""
        return search_inverted_lists(self, xq, k, nprobe)


def assign_rows(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> torch.Tensor:
    """(n,) int64 the list of every row of ``x`` (n, d'), as :func:`build_store` assigns them."""
    centroids = centroids.to(device=x.device, dtype=torch.float32).contiguous()
    return assign_to_lists(x, centroids, l2=metric == "l2_augmented")


def build_store(
    stored: torch.Tensor,
    centroids: torch.Tensor,
    metric: str,
    aliased: bool = False,
    assign: torch.Tensor | None = None,
) -> InvertedLists:
    """The ``torch_ivf`` backend of ItemIndex: lists over ``stored`` (N, d') on its device (a copy,
    so ``aliased`` needs nothing), with lists ``assign`` (N,) when given; the coarse quantizer is
    L2 for metric "l2_augmented"."""
    return build_inverted_lists(stored, centroids, l2=metric == "l2_augmented", assign=assign)


def build_inverted_lists(
    xb: torch.Tensor,
    centroids: torch.Tensor,
    l2: bool = False,
    assign: torch.Tensor | None = None,
    block_elements: int | None = None,
) -> InvertedLists:
    """Assign every row of ``xb`` to a list and store the rows sorted by list.

    Args:
        xb: (N, d') float32 vectors to store (copied: the caller may keep changing its tensor).
        centroids: (nlist, d') float32 centroids, moved to ``xb``'s device.
        l2: the coarse quantizer ranks centroids by L2 distance (else inner product).
        assign: (N,) int64 precomputed list of every row; computed with :func:`assign_to_lists`
            when None.
        block_elements: block budget for the assignment.

    Returns:
        The inverted lists, on ``xb``'s device.
    """
    centroids = centroids.to(device=xb.device, dtype=torch.float32).contiguous()
    nlist = centroids.shape[0]
    if assign is None:
        assign = assign_to_lists(xb, centroids, l2=l2, block_elements=block_elements)
    assign = assign.to(xb.device)
    # Stable, so rows keep their order inside a list (deterministic, and like FAISS's add order).
    rows = torch.sort(assign, stable=True).indices
    counts = torch.bincount(assign, minlength=nlist)
    offsets = torch.zeros(nlist + 1, dtype=torch.int64, device=xb.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    max_list_size = int(counts.max()) if nlist else 0
    return InvertedLists(
        centroids=centroids,
        offsets=offsets,
        rows=rows,
        xb=xb[rows].contiguous(),  # a gather: always a private copy
        l2=l2,
        max_list_size=max_list_size,
    )


def probe_lists(
    lists: InvertedLists, xq: torch.Tensor, nprobe: int, block_elements: int | None = None
) -> torch.Tensor:
    """(Q, nprobe) int64 the lists each query visits, best first (coarse top-nprobe)."""
    block_elements = block_elements or default_block_elements(xq.device)
    bias = _l2_bias(lists.centroids, lists.l2)
    centroids_t = lists.centroids.T.contiguous()
    out = torch.empty(xq.shape[0], nprobe, dtype=torch.int64, device=xq.device)
    rows = max(1, block_elements // max(1, lists.nlist))
    for r0 in range(0, xq.shape[0], rows):
        scores = _centroid_scores(xq[r0 : r0 + rows], centroids_t, bias)  # (rows, nlist)
        out[r0 : r0 + rows] = scores.topk(nprobe, dim=1).indices
    return out


def search_inverted_lists(
    lists: InvertedLists,
    xq: torch.Tensor,
    k: int,
    nprobe: int,
    block_elements: int | None = None,
    method: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner-product top-k over the rows of each query's ``nprobe`` best lists, scored exactly.

    Args:
        lists: the inverted lists (see :func:`build_inverted_lists`).
        xq: (Q, d') float32 queries on ``lists.device``.
        k: results per query (>= 1).
        nprobe: lists visited per query, 1 <= nprobe <= nlist.
        block_elements: ``"gather"`` holds at most this many gathered vector values at once
            (queries are processed in blocks, at least one query per block).
        method: ``"gather"`` copies each query's probed rows into a padded (Q', L, d') block and
            scores it with one batched matmul (few, large kernels: the CUDA default);
            ``"lists"`` loops over the probed lists and scores each list against all queries
            that probe it with one matmul, reading every list once (the CPU default, where
            memory traffic, not kernel count, is the cost).

    Returns:
        D: (Q, k) float32 inner products xq · xb, descending; -inf where fewer than k rows were
            probed.
        I: (Q, k) int64 original row numbers into the ``xb`` the lists were built from; -1 where
            fewer than k rows were probed.
    """
    method = method or ("gather" if xq.is_cuda else "lists")
    if method not in SEARCH_METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {SEARCH_METHODS}")
    if xq.shape[0] == 0:
        return (
            torch.full((0, k), float("-inf"), device=xq.device),
            torch.full((0, k), -1, dtype=torch.int64, device=xq.device),
        )
    probe = probe_lists(lists, xq, nprobe, block_elements)  # (Q, nprobe)
    if method == "lists":
        return _search_list_major(lists, xq, k, probe)
    return _search_gather(lists, xq, k, probe, block_elements)


def _search_list_major(
    lists: InvertedLists, xq: torch.Tensor, k: int, probe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score each probed list against the queries that probe it; merge the per-pair top-k."""
    nq, nprobe = probe.shape
    flat = probe.reshape(-1)  # (Q * nprobe,) the list of each (query, probe) pair
    order = torch.sort(flat, stable=True).indices  # pairs grouped by list
    pair_counts = torch.bincount(flat, minlength=lists.nlist)
    # Host copies, read once: per-list reads of device tensors would sync CUDA every list.
    pair_ends = pair_counts.cumsum(0).tolist()
    counts = pair_counts.tolist()
    list_offsets = lists.offsets.tolist()
    D_pairs = torch.full((nq * nprobe, k), float("-inf"), device=xq.device)
    I_pairs = torch.full((nq * nprobe, k), -1, dtype=torch.int64, device=xq.device)
    for list_no, count in enumerate(counts):
        s0, s1 = list_offsets[list_no], list_offsets[list_no + 1]
        if count == 0 or s1 == s0:
            continue
        p1 = pair_ends[list_no]
        pairs = order[p1 - count : p1]
        scores = xq[pairs // nprobe] @ lists.xb[s0:s1].T  # (pairs, list size)
        if s1 - s0 <= k:  # the whole list fits: the final merge does the sorting
            D_pairs[pairs, : s1 - s0] = scores
            I_pairs[pairs, : s1 - s0] = lists.rows[s0:s1]
            continue
        top_D, top_col = scores.topk(k, dim=1)
        D_pairs[pairs] = top_D
        I_pairs[pairs] = lists.rows[top_col + s0]
    D, best = D_pairs.view(nq, nprobe * k).topk(k, dim=1)
    return D, I_pairs.view(nq, nprobe * k).gather(1, best)


def _search_gather(
    lists: InvertedLists,
    xq: torch.Tensor,
    k: int,
    probe: torch.Tensor,
    block_elements: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy each query's probed rows into a padded block and score it with one batched matmul."""
    block_elements = block_elements or default_block_elements(xq.device)
    nq, d = xq.shape
    nprobe = probe.shape[1]
    device = xq.device
    D = torch.full((nq, k), float("-inf"), dtype=torch.float32, device=device)
    I = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    starts = lists.offsets[probe]  # (Q, nprobe)
    sizes = lists.offsets[probe + 1] - starts  # (Q, nprobe)
    ends = sizes.cumsum(dim=1)  # (Q, nprobe) end of each probed list in the query's candidates
    n_candidates = ends[:, -1]  # (Q,)
    # One host sync for the padded width; blocks then need no further size reads.
    width = max(1, int(n_candidates.max()))
    q_block = max(1, block_elements // (width * max(1, d)))
    columns = torch.arange(width, device=device)
    for q0 in range(0, nq, q_block):
        q1 = min(q0 + q_block, nq)
        # Column j of a query's block is row j of the concatenation of its probed lists.
        cols = columns.expand(q1 - q0, width).contiguous()  # (b, width)
        which = torch.searchsorted(ends[q0:q1], cols, right=True)  # (b, width) probe slot
        valid = which < nprobe
        which = which.clamp_(max=nprobe - 1)
        list_start = (ends[q0:q1] - sizes[q0:q1]).gather(1, which)  # column of the list's row 0
        sorted_row = starts[q0:q1].gather(1, which) + (cols - list_start)
        sorted_row = torch.where(valid, sorted_row, 0)
        # index_select copies whole rows: several times faster than advanced indexing on CPU
        candidates = lists.xb.index_select(0, sorted_row.view(-1)).view(q1 - q0, width, -1)
        scores = torch.bmm(candidates, xq[q0:q1, :, None]).squeeze(2)  # (b, width)
        scores = scores.masked_fill_(~valid, float("-inf"))
        kk = min(k, width)
        top_D, top_col = scores.topk(kk, dim=1)
        top_row = lists.rows[sorted_row.gather(1, top_col)]
        top_row = top_row.masked_fill_(torch.isinf(top_D) & (top_D < 0), -1)
        D[q0:q1, :kk] = top_D
        I[q0:q1, :kk] = top_row
    return D, I
