"""annsample.bench.ddp: what DDP does with sparse item-embedding gradients (the sparse probe).

The one-against-two-process runs of ``bench_ddp`` itself are what test_distributed.py checks of
training under torchrun; they take minutes, so the bench's own loop is run by hand
(docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from annsample.bench.ddp import sparse_probe


@pytest.mark.slow
def test_ddp_reduces_sparse_gradients_to_the_union_of_the_ranks_rows():
    result = sparse_probe(n=2_000, d=8, rows=300, repeats=1)
    assert result["sparse_grad_is_sparse"] and not result["dense_grad_is_sparse"]
    assert result["local_rows"] < result["union_rows"]  # the ranks drew different items
    assert result["sparse_reduced_rows"] == result["union_rows"] == result["dense_reduced_rows"]
