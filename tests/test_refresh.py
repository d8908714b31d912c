"""Refresh schedules fire at the right steps; the refresher swaps whole indexes, keeps its snapshot,
counts what it drops, and hands background failures to the training thread."""

from __future__ import annotations

import threading
import time

import faiss
import pytest
import torch
from conftest import GatedIndex

from annsample.errors import ConfigError, ItemIndexError
from annsample.index import ItemIndex, exact_topk
from annsample.refresh import (
    Adaptive,
    EveryEpoch,
    EveryNSteps,
    IndexRefresher,
    Never,
    embedding_drift,
    make_schedule,
)

N, DIM, NLIST = 2000, 16, 16


def embeddings_at(step: int) -> torch.Tensor:
    """Deterministic (N, DIM) embeddings of a 'training run' at `step`: clustered, moving with step."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, DIM, generator=g)
    base = centres[torch.randint(0, 20, (N,), generator=g)] + 0.3 * torch.randn(N, DIM, generator=g)
    direction = torch.randn(N, DIM, generator=g)
    return base + 0.05 * step * direction


def exact_factory() -> ItemIndex:
    # nprobe == nlist: results equal exact_topk, so every search can be checked against its version.
    return ItemIndex(DIM, nlist=NLIST, nprobe=NLIST, backend="faiss", kmeans_iters=3)


def fires(schedule, steps, epoch_ends=(), stats=None):
    return {
        s: k for s in steps if (k := schedule.should_refresh(s, s in epoch_ends, stats)) is not None
    }


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (EveryNSteps(3), {3: "re_add", 6: "re_add", 9: "re_add", 12: "re_add"}),
        (EveryNSteps(3, retrain_every=2), {3: "re_add", 6: "retrain", 9: "re_add", 12: "retrain"}),
        (EveryNSteps(5, retrain_every=1), {5: "retrain", 10: "retrain"}),
        (EveryNSteps(1), {s: "re_add" for s in range(1, 13)}),
        (EveryNSteps(20), {}),
        (Never(), {}),
    ],
)
def test_step_schedules_fire_exactly_at_the_right_steps(schedule, expected):
    assert fires(schedule, range(0, 13)) == expected


def test_a_step_schedule_retrains_when_the_recall_before_a_refresh_is_low():
    schedule = EveryNSteps(5, retrain_every=3, retrain_below=0.8)
    assert [schedule.needs_stats(s) for s in (0, 4, 5, 6, 10)] == [False, False, True, False, True]
    assert schedule.should_refresh(5, stats={"recall": 0.79}) == "retrain"
    assert schedule.should_refresh(5, stats={"recall": 0.8}) == "re_add"
    assert schedule.should_refresh(15, stats={"recall": 0.95}) == "retrain"  # every 3rd still
    assert schedule.should_refresh(7, stats={"recall": 0.1}) is None  # not a refresh step
    with pytest.raises(ConfigError, match=r"needs stats\['recall'\] at every refresh step"):
        schedule.should_refresh(10)
    assert not EveryNSteps(5).needs_stats(5)  # without it nothing is measured for the schedule


@pytest.mark.parametrize(
    ("retrain_every", "expected"),
    [
        (0, {4: "re_add", 9: "re_add", 14: "re_add"}),
        (2, {4: "re_add", 9: "retrain", 14: "re_add"}),
    ],
)
def test_every_epoch_fires_at_epoch_ends(retrain_every, expected):
    assert fires(EveryEpoch(retrain_every), range(15), epoch_ends={4, 9, 14}) == expected


@pytest.mark.parametrize(
    ("schedule", "drift_by_step", "recall_by_step", "expected"),
    [
        # Checks only every 5 steps; fires when drift exceeds the threshold there.
        (
            Adaptive(drift_threshold=0.1, check_every=5),
            {5: 0.05, 10: 0.2, 15: 0.1, 20: 0.5},
            {},
            {10: "re_add", 20: "re_add"},
        ),
        (
            Adaptive(recall_threshold=0.9, check_every=5, retrain_every=2),
            {},
            {5: 0.95, 10: 0.8, 15: 0.7},
            {10: "re_add", 15: "retrain"},
        ),
        # Either condition suffices.
        (
            Adaptive(drift_threshold=0.1, recall_threshold=0.9, check_every=10),
            {10: 0.0, 20: 0.3},
            {10: 0.5, 20: 0.99},
            {10: "re_add", 20: "re_add"},
        ),
    ],
)
def test_adaptive_fires_on_thresholds_at_check_steps(
    schedule, drift_by_step, recall_by_step, expected
):
    got = {}
    for step in range(0, 21):
        stats = {}
        if schedule.needs_stats(step):
            stats = {"drift": drift_by_step.get(step, 0.0), "recall": recall_by_step.get(step, 1.0)}
        kind = schedule.should_refresh(step, False, stats)
        if kind is not None:
            got[step] = kind
    assert got == expected


def test_adaptive_fires_more_often_when_embeddings_move_more():
    def refreshes(speed: float) -> int:
        g = torch.Generator().manual_seed(0)
        schedule = Adaptive(drift_threshold=0.05, check_every=5)
        xb = torch.randn(500, 8, generator=g)
        built, count = xb.clone(), 0
        for step in range(1, 201):
            xb += speed * torch.randn(xb.shape, generator=g)  # one optimiser step
            stats = {"drift": embedding_drift(xb, built)} if schedule.needs_stats(step) else {}
            if schedule.should_refresh(step, False, stats):
                built, count = xb.clone(), count + 1
        return count

    slow, fast = refreshes(0.005), refreshes(0.02)
    assert 0 < slow < fast, (slow, fast)


def test_adaptive_names_the_missing_statistic():
    with pytest.raises(ConfigError, match=r"needs stats\['drift'\] at every check step \(step 50"):
        Adaptive(drift_threshold=0.1).should_refresh(50, False, {})
    with pytest.raises(ConfigError, match=r"needs stats\['recall'\]"):
        Adaptive(recall_threshold=0.9, check_every=1).should_refresh(1, False, {"drift": 0.0})
    assert Adaptive(drift_threshold=0.1).should_refresh(49, False, {}) is None  # not a check step


def test_make_schedule_builds_each_kind():
    assert make_schedule("steps", n=10) == EveryNSteps(10)
    assert isinstance(make_schedule("epoch", retrain_every=3), EveryEpoch)
    assert isinstance(make_schedule("never"), Never)
    assert make_schedule("adaptive", recall_threshold=0.8).recall_threshold == 0.8


@pytest.mark.parametrize(
    ("kind", "kwargs", "message"),
    [
        (
            "hourly",
            {},
            "unknown refresh schedule 'hourly'; choose one of steps, epoch, never, adaptive",
        ),
        ("steps", {"every": 10}, "'steps' does not take every; it accepts n, retrain_every"),
        ("steps", {}, "missing 1 required positional argument: 'n'"),
        ("never", {"n": 3}, "'never' does not take n; it accepts no arguments"),
        ("steps", {"n": 0}, "EveryNSteps n must be an integer >= 1, got 0"),
        ("epoch", {"retrain_every": -1}, "retrain_every must be an integer >= 0, got -1"),
        ("adaptive", {}, "Adaptive needs drift_threshold or recall_threshold"),
        ("steps", {"n": 5, "retrain_below": 1.5}, r"retrain_below must be in \[0, 1\]"),
        ("adaptive", {"recall_threshold": 1.5}, r"recall_threshold must be in \(0, 1\]"),
        (
            "adaptive",
            {"drift_threshold": 0.1, "check_every": 0},
            "check_every must be an integer >= 1",
        ),
    ],
)
def test_make_schedule_rejects_bad_config(kind, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_schedule(kind, **kwargs)


def test_embedding_drift():
    built = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    now = torch.tensor([[3.0, 4.0 + 5.0], [1.0, 0.5]])
    assert embedding_drift(now, built) == pytest.approx((1.0 + 0.5) / 2)
    assert embedding_drift(built, built) == 0.0
    assert embedding_drift(now, built, chunk_size=1) == pytest.approx(0.75)
    with pytest.raises(
        ItemIndexError, match=r"xb_now has shape \(2, 2\) but xb_built has \(3, 2\)"
    ):
        embedding_drift(now, torch.zeros(3, 2))


# ----------------------------------------------------------------------------- refresher


@pytest.mark.parametrize("asynchronous", [False, True])
def test_refresher_publishes_each_kind_with_its_version(asynchronous):
    with IndexRefresher(exact_factory, asynchronous=asynchronous) as refresher:
        first = refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)
        centroids = first.centroids
        refresher.request("re_add", embeddings_at(10), step=10)
        refresher.wait()
        assert refresher.current().version == 10
        assert torch.equal(refresher.current().centroids, centroids)  # re_add keeps centroids
        refresher.request("retrain", embeddings_at(20), step=20)
        refresher.wait()
        index = refresher.current()
        assert index.version == 20 and not torch.equal(index.centroids, centroids)
        assert first.version == 0  # published indexes are never modified
        stats = refresher.stats(step=25)
        assert stats["index/staleness_steps"] == 5
        assert stats["index/re_add_count"] == 1 and stats["index/retrain_count"] == 1
        assert stats["index/refresh_count"] == 2 and stats["index/skipped_requests"] == 0
        assert stats["index/last_refresh_seconds"] > 0 and stats["index/total_wait_seconds"] > 0
        if not asynchronous:
            # Blocking mode: the caller waited for all of it.
            assert stats["index/total_wait_seconds"] >= stats["index/total_refresh_seconds"]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_re_add_assigns_only_the_rows_changed_since_the_published_index(asynchronous):
    with IndexRefresher(exact_factory, asynchronous=asynchronous) as refresher:
        table = embeddings_at(0)
        refresher.build(table, ids=torch.arange(N), step=0)
        table = table.clone()
        table[:37] += 1.0  # a sparse update: 37 rows moved
        refresher.request("re_add", table, step=1)
        refresher.wait()
        assert refresher.stats()["index/last_reassigned_rows"] == 37
        D, I = refresher.current().search(table[:5], 10)  # nprobe == nlist: exact
        assert torch.equal(I, exact_topk(table[:5], table, 10)[1])
        refresher.request("retrain", table, step=2)  # new centroids: every row
        refresher.wait()
        assert refresher.stats()["index/last_reassigned_rows"] == N


def gated_factory() -> ItemIndex:
    return GatedIndex(DIM, nlist=NLIST, nprobe=NLIST, backend="faiss", kmeans_iters=3)


def test_async_request_returns_at_once_and_keeps_only_the_latest():
    GatedIndex.gate.clear()
    GatedIndex.started.clear()
    queries = embeddings_at(0)[:50]
    with IndexRefresher(gated_factory, asynchronous=True) as refresher:
        refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)
        start = time.perf_counter()
        refresher.request("re_add", embeddings_at(1), step=1)
        assert GatedIndex.started.wait(timeout=30)
        refresher.request("re_add", embeddings_at(2), step=2)  # queued
        refresher.request("retrain", embeddings_at(3), step=3)  # replaces step 2
        table = embeddings_at(4)
        refresher.request("re_add", table, step=4)  # replaces step 3, inherits its retrain
        table.mul_(-1)  # training keeps writing to its table: the snapshot must not see it
        assert time.perf_counter() - start < 5  # nothing waited for the gated refresh
        assert refresher.poll() is True
        assert refresher.current().version == 0
        GatedIndex.gate.set()
        assert refresher.wait(timeout=60)
        assert refresher.poll() is False
        stats = refresher.stats()
        assert stats["index/version"] == 4
        assert stats["index/skipped_requests"] == 2
        assert stats["index/re_add_count"] == 1 and stats["index/retrain_count"] == 1
        _, I = refresher.current().search(queries, 10)
        assert torch.equal(I, exact_topk(queries, embeddings_at(4), 10)[1])


def test_worker_threads_apply_to_the_background_thread_only():
    seen = {}

    def factory() -> ItemIndex:
        seen[threading.current_thread().name] = faiss.omp_get_max_threads()
        return exact_factory()

    before = faiss.omp_get_max_threads()
    with IndexRefresher(factory, asynchronous=True, worker_threads=1) as refresher:
        refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)
        refresher.request("re_add", embeddings_at(1), step=1)
        refresher.wait()
    assert seen["annsample-index-refresh"] == 1
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(ItemIndexError, match="worker_threads must be a positive integer"):
        IndexRefresher(exact_factory, worker_threads=0)


def test_async_swaps_never_expose_a_half_built_index():
    steps = list(range(1, 9))
    queries = embeddings_at(0)[::40]  # (50, DIM)
    expected = {s: exact_topk(queries, embeddings_at(s), 10)[1] for s in [0, *steps]}
    seen_versions, problems = set(), []
    stop = threading.Event()

    with IndexRefresher(exact_factory, asynchronous=True) as refresher:
        refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)

        def search_continuously():
            while not stop.is_set():
                index = refresher.current()
                _, I = index.search(queries, 10)
                seen_versions.add(index.version)
                if index.ntotal != N:
                    problems.append(f"ntotal {index.ntotal} at version {index.version}")
                elif not torch.equal(I, expected[index.version]):
                    problems.append(f"results of version {index.version} do not match it")

        searcher = threading.Thread(target=search_continuously)
        searcher.start()
        try:
            for step in steps:
                refresher.request(
                    "retrain" if step % 3 == 0 else "re_add", embeddings_at(step), step
                )
                time.sleep(0.01)
            refresher.wait()
            time.sleep(0.05)  # let the searcher see the final version
        finally:
            stop.set()
            searcher.join()
        stats = refresher.stats()
    assert not problems, problems[:5]
    assert stats["index/refresh_count"] + stats["index/skipped_requests"] == len(steps)
    assert stats["index/version"] == steps[-1] and steps[-1] in seen_versions
    assert len(seen_versions) >= 2


@pytest.mark.parametrize("asynchronous", [False, True])
def test_background_failure_surfaces_in_the_training_thread(asynchronous):
    broken = embeddings_at(5)
    broken[17, 3] = float("nan")
    refresher = IndexRefresher(exact_factory, asynchronous=asynchronous)
    refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)
    if asynchronous:
        refresher.request("re_add", broken, step=5)  # the snapshot is validated on the worker
        with pytest.raises(
            ItemIndexError, match=r"xb has 1 of 2000 rows with NaN or inf \(first at row 17\)"
        ):
            refresher.wait()
        assert refresher.stats()["index/failures"] == 1
    else:
        with pytest.raises(ItemIndexError, match="NaN or inf"):
            refresher.request("re_add", broken, step=5)
    assert refresher.current().version == 0  # the failed refresh published nothing
    refresher.request("re_add", embeddings_at(6), step=6)  # and the refresher still works
    refresher.wait()
    assert refresher.current().version == 6
    refresher.close()


def test_failure_is_raised_by_poll_and_close_too():
    broken = embeddings_at(1)
    broken[0, 0] = float("inf")
    refresher = IndexRefresher(exact_factory, asynchronous=True)
    refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)
    refresher.request("re_add", broken, step=1)
    deadline = time.monotonic() + 30
    with pytest.raises(ItemIndexError, match="NaN or inf"):
        while time.monotonic() < deadline:
            refresher.poll()
            time.sleep(0.01)
    refresher.request("re_add", broken, step=2)
    while refresher.stats()["index/failures"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # close() drops a request still queued; this one must have run
    with pytest.raises(ItemIndexError, match="NaN or inf"):
        refresher.close()


def test_refresher_validates_its_use():
    refresher = IndexRefresher(exact_factory)
    with pytest.raises(ItemIndexError, match=r"no index yet: call build\(xb, step\) first"):
        refresher.current()
    with pytest.raises(
        ItemIndexError, match=r"nothing to refresh yet: call build\(xb, step\) first"
    ):
        refresher.request("re_add", embeddings_at(0), step=1)
    refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)
    with pytest.raises(
        ItemIndexError, match="unknown refresh kind 'rebuild'; choose one of re_add, retrain"
    ):
        refresher.request("rebuild", embeddings_at(0), step=1)
    with pytest.raises(ItemIndexError, match=r"xb must be a 2-D \(N, d\) tensor"):
        refresher.request("re_add", embeddings_at(0)[0], step=1)
    refresher.close()
    refresher.close()  # idempotent
    with pytest.raises(ItemIndexError, match="closed"):
        refresher.request("re_add", embeddings_at(0), step=1)
    with pytest.raises(ItemIndexError, match="index_factory must be a callable"):
        IndexRefresher(ItemIndex(DIM, nlist=NLIST, nprobe=1))


def test_refresher_works_with_the_exact_backend():
    queries = embeddings_at(0)[:20]
    with IndexRefresher(
        lambda: ItemIndex(DIM, nlist=NLIST, nprobe=1, backend="exact")
    ) as refresher:
        refresher.build(embeddings_at(0), ids=torch.arange(N), step=0)
        for step, kind in ((3, "re_add"), (6, "retrain")):
            refresher.request(kind, embeddings_at(step), step=step)
            index = refresher.current()
            assert index.version == step and index.centroids is None
            assert torch.equal(
                index.search(queries, 5)[1], exact_topk(queries, embeddings_at(step), 5)[1]
            )
