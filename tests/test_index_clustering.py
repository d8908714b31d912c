"""annsample.index.clustering: the nlist / nprobe rule, and the small-training-set warning."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import gaussian_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

import annsample.index as index_module
from annsample.errors import ItemIndexError
from annsample.index import ItemIndex, clustering


def faiss_index(metric: str = "ip", nlist: int = 32, nprobe: int = 4, **kwargs) -> ItemIndex:
    return ItemIndex(16, nlist=nlist, nprobe=nprobe, backend="faiss", metric=metric, **kwargs)


def test_small_training_set_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(clustering, "warned_small_training_sets", set())
    xb = gaussian_mixture(300)
    with caplog.at_level(logging.WARNING, logger="annsample.index"):
        index = faiss_index(nlist=16).build(xb, ids=torch.arange(len(xb)))
        index.retrain(xb, step=1)
        faiss_index(nlist=16).build(xb, ids=torch.arange(len(xb)))
    warnings = [r for r in caplog.records if "39 per centroid" in r.getMessage()]
    assert len(warnings) == 1


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 10**8))
def test_default_nlist_and_nprobe_follow_one_rule(n):
    nlist = index_module.default_nlist(n)
    assert 1 <= nlist <= max(1, n // index_module.MIN_POINTS_PER_CENTROID)
    assert nlist == 1 or abs(nlist - n**0.5) <= 0.5 or nlist == n // 39
    nprobe = index_module.default_nprobe(nlist)
    assert 1 <= nprobe <= nlist and nprobe * 8 >= nlist
    assert index_module.resolve_nlist_nprobe(0, 0, n) == (nlist, nprobe)


def test_nlist_errors_point_at_the_default_rule(mixture):
    rule = index_module.default_nlist(100)
    with pytest.raises(ItemIndexError, match=rf"default_nlist\(N\) = {rule}:"):
        index_module.resolve_nlist_nprobe(500, 0, 100)
    with pytest.raises(ItemIndexError, match=rf"default_nlist\(N\) = {rule}:"):
        faiss_index(nlist=500).build(mixture[:100])
    with pytest.raises(ItemIndexError, match=r"default_nprobe\(nlist\) = 2 "):
        index_module.resolve_nlist_nprobe(16, 32, 100)
