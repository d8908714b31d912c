"""Staleness bookkeeping: drift is measured against the table the *published* index holds."""

from __future__ import annotations

import torch
from conftest import GatedIndex

from annsample.refresh import IndexRefresher, embedding_drift
from annsample.staleness import BuiltSnapshots

DIM, N = 8, 400


def table(step: int) -> torch.Tensor:
    return torch.randn(N, DIM, generator=torch.Generator().manual_seed(step))


def test_async_requests_count_as_built_only_once_published_and_skipped_ones_never():
    GatedIndex.gate.clear()
    GatedIndex.started.clear()
    snapshots = BuiltSnapshots(table(0))
    with IndexRefresher(
        lambda: GatedIndex(DIM, nlist=4, nprobe=4, backend="faiss"), asynchronous=True
    ) as refresher:
        refresher.build(table(0), step=0)
        for step in (10, 20, 30):  # 10 in flight, 20 queued then replaced by 30 (skipped)
            refresher.request("re_add", table(step), step)
            snapshots.requested(step, table(step))
            snapshots.sync(refresher.current().version)
            if step == 10:
                assert GatedIndex.started.wait(timeout=30)
        # nothing published yet: drift is still measured from the step-0 table
        assert refresher.current().version == 0
        assert torch.equal(snapshots.built, table(0))
        assert embedding_drift(table(30), snapshots.built) > 0
        GatedIndex.gate.set()
        assert refresher.wait(timeout=60)
        assert refresher.stats()["index/skipped_requests"] == 1
        snapshots.sync(refresher.current().version)
        assert refresher.current().version == 30
        assert torch.equal(snapshots.built, table(30))
        assert snapshots.pending_steps == []  # the skipped step-20 snapshot is not kept


def test_snapshots_follow_versions_in_order_and_without_drift_measurement_keep_nothing():
    snapshots = BuiltSnapshots(table(0))
    snapshots.requested(5, table(5))
    snapshots.requested(9, table(9))
    snapshots.sync(5)
    assert torch.equal(snapshots.built, table(5)) and snapshots.pending_steps == [9]
    snapshots.sync(9)
    assert torch.equal(snapshots.built, table(9)) and not snapshots.pending_steps
    unmeasured = BuiltSnapshots(None)
    unmeasured.requested(5, table(5))
    unmeasured.sync(5)
    assert unmeasured.built is None
