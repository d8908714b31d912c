"""annsample.index.exact: exact_topk against brute force, recall_at_k by hand, input checks."""

from __future__ import annotations

import pytest
import torch
from conftest import gaussian_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

from annsample.errors import ItemIndexError
from annsample.index import exact as exact_module
from annsample.index import exact_topk, recall_at_k


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    nq=st.integers(1, 20),
    k_fraction=st.floats(0.0, 1.0),
    chunk_size=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_exact_topk_matches_brute_force(n, nq, k_fraction, chunk_size, seed):
    g = torch.Generator().manual_seed(seed)
    xb, xq = torch.randn(n, 8, generator=g), torch.randn(nq, 8, generator=g)
    k = max(1, round(k_fraction * n))
    D, I = exact_topk(xq, xb, k, chunk_size=chunk_size)
    D_ref, _ = (xq @ xb.T).topk(k, dim=1)
    assert D.shape == I.shape == (nq, k) and I.dtype == torch.int64
    torch.testing.assert_close(D, D_ref)
    # The ids score what D says (ties may swap ids, never scores).
    torch.testing.assert_close((xq[:, None, :] * xb[I]).sum(-1), D)
    assert all(len(set(row.tolist())) == k for row in I)


def test_exact_topk_blocks_queries_without_changing_results(monkeypatch):
    xb, xq = gaussian_mixture(500), gaussian_mixture(300, seed=3)
    D_ref, I_ref = exact_topk(xq, xb, 7)
    monkeypatch.setattr(exact_module, "BLOCK_ELEMENTS", 64)  # forces many query blocks
    D, I = exact_topk(xq, xb, 7, chunk_size=50)
    torch.testing.assert_close(D, D_ref)
    assert torch.equal(I, I_ref)


def test_recall_at_k_hand_computed():
    exact = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = torch.tensor([[4, 9, 1, -1], [-1, -1, -1, -1]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 0 / 4) / 2)
    assert recall_at_k(exact, exact) == 1.0
    # -1 in the exact result shrinks that row's denominator instead of counting as a hit.
    assert recall_at_k(torch.tensor([[3, -1]]), torch.tensor([[3, -1]])) == 1.0


def test_exact_topk_and_recall_validate_input(mixture, queries):
    with pytest.raises(
        ItemIndexError, match=r"k=4001 must be between 1 and the number of rows N=4000"
    ):
        exact_topk(queries, mixture, 4001)
    with pytest.raises(ItemIndexError, match="chunk_size=0 must be positive"):
        exact_topk(queries, mixture, 5, chunk_size=0)
    with pytest.raises(ItemIndexError, match="I_approx has shape"):
        recall_at_k(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ItemIndexError, match="no valid ids"):
        recall_at_k(torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), -1))
