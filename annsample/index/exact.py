"""Exact inner-product search and recall: the reference every approximate result is measured against.

``exact_topk`` scores queries against every row in blocks (a Q x N matrix is never materialised);
``recall_at_k`` compares an approximate result with it. The ``exact`` backend of
:class:`annsample.index.ItemIndex` is ``exact_topk`` over a private copy of the stored vectors.
"""

from __future__ import annotations

import torch

from annsample.errors import ItemIndexError
from annsample.index.checks import as_int, check_2d, check_matrix

# Score blocks hold at most this many float32 values (64 MiB), whatever N and Q are.
BLOCK_ELEMENTS = 1 << 24


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
    xq = check_matrix(xq, "xq", None)
    xb = check_matrix(xb, "xb", xq.shape[1])
    if xq.device != xb.device:
        raise ItemIndexError(f"xq is on {xq.device} but xb is on {xb.device}; move one of them")
    n = xb.shape[0]
    k = as_int(k, "k")
    if not 1 <= k <= n:
        raise ItemIndexError(f"k={k} must be between 1 and the number of rows N={n}")
    chunk_size = as_int(chunk_size, "chunk_size")
    if chunk_size < 1:
        raise ItemIndexError(f"chunk_size={chunk_size} must be positive")
    chunk_size = min(chunk_size, n)
    nq = xq.shape[0]
    D = torch.empty(nq, k, dtype=torch.float32, device=xq.device)
    I = torch.empty(nq, k, dtype=torch.int64, device=xq.device)
    q_block = max(1, BLOCK_ELEMENTS // chunk_size)
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
    check_2d(I_approx, "I_approx", "(Q, k)")
    check_2d(I_exact, "I_exact", "(Q, k)")
    if I_approx.shape != I_exact.shape:
        raise ItemIndexError(
            f"I_approx has shape {tuple(I_approx.shape)} but I_exact has shape "
            f"{tuple(I_exact.shape)}; search both with the same queries and k"
        )
    nq, k = I_exact.shape
    I_approx = I_approx.to(I_exact.device)
    hits = torch.empty(nq, dtype=torch.float64, device=I_exact.device)
    rows = max(1, BLOCK_ELEMENTS // max(1, k * k))
    for r0 in range(0, nq, rows):
        a, e = I_approx[r0 : r0 + rows], I_exact[r0 : r0 + rows]
        match = (a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)  # (rows, k, k)
        hits[r0 : r0 + rows] = match.any(dim=2).sum(dim=1).double()
    valid = (I_exact >= 0).sum(dim=1)
    keep = valid > 0
    if not bool(keep.any()):
        raise ItemIndexError("I_exact has no valid ids (all -1); recall is undefined")
    return float((hits[keep] / valid[keep].double()).mean())


class ExactVectors:
    """The ``exact`` backend's contents: (N, d') stored vectors, every search scans them all."""

    def __init__(self, xb: torch.Tensor) -> None:
        self.xb = xb

    @property
    def device(self) -> torch.device:
        return self.xb.device

    def search(self, xq: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, k) scores and row numbers of the exact top-k (``nprobe`` does not apply)."""
        return exact_topk(xq, self.xb, k)

    def vectors(self) -> torch.Tensor:
        """(N, d') a CPU copy of the stored vectors."""
        return self.xb.cpu().clone()

    def list_sizes(self) -> torch.Tensor:
        raise ItemIndexError("the exact backend has no IVF lists")


def build_store(
    stored: torch.Tensor,
    centroids: torch.Tensor | None,
    metric: str,
    aliased: bool = False,
    assign: torch.Tensor | None = None,
) -> ExactVectors:
    """The ``exact`` backend of ItemIndex over ``stored`` (N, d'); ``aliased`` means ``stored`` is
    the caller's table, which keeps training, so it is copied. It has no lists, so ``assign`` is
    None (the builders share one signature)."""
    return ExactVectors(stored.clone() if aliased else stored)
