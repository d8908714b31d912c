"""When and how the item index is refreshed during training.

Schedules answer one question per training step, ``should_refresh(step, epoch_end, stats)``:
None, "re_add" (keep centroids, re-add current embeddings) or "retrain" (k-means again, then add).
``IndexRefresher`` carries the answer out, synchronously or on a background thread from a snapshot
of the embeddings, and swaps the finished index in with one reference assignment (double
buffering), so searches never see a half-built index.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from annsample.config import RunConfig
from annsample.errors import ConfigError, ItemIndexError
from annsample.index import ItemIndex, faiss_ivf, resolve_nlist_nprobe
from annsample.index.checks import check_2d

logger = logging.getLogger(__name__)

REFRESH_KINDS = ("re_add", "retrain")


class RefreshSchedule(Protocol):
    """Decides, once per training step, whether the index is refreshed and how."""

    def should_refresh(
        self, step: int, epoch_end: bool = False, stats: Mapping[str, float] | None = None
    ) -> str | None:
        """None, "re_add" or "retrain".

        Call it exactly once per step with ``epoch_end=False`` (some schedules count), and once
        more after an epoch's last step with ``epoch_end=True``: only epoch schedules fire then.
        """
        ...

    def needs_stats(self, step: int) -> bool:
        """Whether ``should_refresh(step, ...)`` reads ``stats``, so the loop can skip measuring."""
        ...


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _kind(refresh_number: int, retrain_every: int) -> str:
    """Every ``retrain_every``-th refresh (1-based) is a retrain; 0 means never."""
    return "retrain" if retrain_every and refresh_number % retrain_every == 0 else "re_add"


@dataclass(frozen=True)
class EveryNSteps:
    """Refresh at steps n, 2n, 3n, ...; every ``retrain_every``-th of them is a retrain, and so is
    any whose index recall, measured just before it, is below ``retrain_below`` (0 = never).

    A re-add keeps the centroids (and the l2_augmented norm bound) the index was trained with;
    early in training, when the item vectors leave their initial cloud, that caps the recall
    a re-add can give (docs/results.md, "Index recall at a million items"), and ``retrain_below``
    retrains exactly while it does. Stateless: the refresh number is step // n, so the answer
    depends on the step (and the recall given) alone.

    >>> schedule = EveryNSteps(100, retrain_every=3)
    >>> [schedule.should_refresh(s) for s in (99, 100, 200, 300)]
    [None, 're_add', 're_add', 'retrain']
    >>> EveryNSteps(100, retrain_below=0.8).should_refresh(100, stats={"recall": 0.5})
    'retrain'
    """

    n: int
    retrain_every: int = 0
    retrain_below: float = 0.0

    def __post_init__(self) -> None:
        _check_count(self.n, "EveryNSteps n", 1)
        _check_count(self.retrain_every, "retrain_every", 0)
        if not 0.0 <= self.retrain_below <= 1.0:
            raise ConfigError(
                f"retrain_below must be in [0, 1] (0 = never), got {self.retrain_below!r}"
            )

    def should_refresh(
        self, step: int, epoch_end: bool = False, stats: Mapping[str, float] | None = None
    ) -> str | None:
        if epoch_end or step <= 0 or step % self.n:  # the step itself was already asked about
            return None
        kind = _kind(step // self.n, self.retrain_every)
        if self.retrain_below and kind == "re_add":
            if stats is None or "recall" not in stats:
                raise ConfigError(
                    f"EveryNSteps(retrain_below=...) needs stats['recall'] at every refresh step "
                    f"(step {step}): measure it with recall_at_k(index I, exact_topk I) when "
                    "needs_stats(step) is true, or drop retrain_below"
                )
            if float(stats["recall"]) < self.retrain_below:
                kind = "retrain"
        return kind

    def needs_stats(self, step: int) -> bool:
        return bool(self.retrain_below) and step > 0 and step % self.n == 0


class EveryEpoch:
    """Refresh at the end of every epoch; every ``retrain_every``-th of them is a retrain."""

    def __init__(self, retrain_every: int = 0) -> None:
        self.retrain_every = _check_count(retrain_every, "retrain_every", 0)
        self.refreshes = 0

    def should_refresh(
        self, step: int, epoch_end: bool = False, stats: Mapping[str, float] | None = None
    ) -> str | None:
        if not epoch_end:
            return None
        self.refreshes += 1
        return _kind(self.refreshes, self.retrain_every)

    def needs_stats(self, step: int) -> bool:
        return False

    def __repr__(self) -> str:
        return f"EveryEpoch(retrain_every={self.retrain_every})"


class Never:
    """Build once, never refresh: the stalest baseline of a refresh-frequency ablation."""

    def should_refresh(
        self, step: int, epoch_end: bool = False, stats: Mapping[str, float] | None = None
    ) -> str | None:
        return None

    def needs_stats(self, step: int) -> bool:
        return False

    def __repr__(self) -> str:
        return "Never()"


class Adaptive:
    """Refresh when measured staleness crosses a threshold, checked every ``check_every`` steps.

    Fires at a check step when ``stats["drift"] > drift_threshold`` (see ``embedding_drift``) or
    ``stats["recall"] < recall_threshold`` (index recall@k against the exact top-k under the
    current embeddings). Every ``retrain_every``-th refresh is a retrain.
    """

    def __init__(
        self,
        drift_threshold: float | None = None,
        recall_threshold: float | None = None,
        check_every: int = 50,
        retrain_every: int = 0,
    ) -> None:
        if drift_threshold is None and recall_threshold is None:
            raise ConfigError(
                "Adaptive needs drift_threshold or recall_threshold (or both); without one it "
                "would never fire: use Never() for that"
            )
        if drift_threshold is not None and not drift_threshold >= 0:
            raise ConfigError(f"drift_threshold must be >= 0, got {drift_threshold!r}")
        if recall_threshold is not None and not 0 < recall_threshold <= 1:
            raise ConfigError(f"recall_threshold must be in (0, 1], got {recall_threshold!r}")
        self.drift_threshold = drift_threshold
        self.recall_threshold = recall_threshold
        self.check_every = _check_count(check_every, "check_every", 1)
        self.retrain_every = _check_count(retrain_every, "retrain_every", 0)
        self.refreshes = 0

    def needs_stats(self, step: int) -> bool:
        return step > 0 and step % self.check_every == 0

    def should_refresh(
        self, step: int, epoch_end: bool = False, stats: Mapping[str, float] | None = None
    ) -> str | None:
        if epoch_end or not self.needs_stats(step):
            return None
        stale = False
        if self.drift_threshold is not None:
            stale |= self._stat(stats, "drift", step) > self.drift_threshold
        if self.recall_threshold is not None:
            stale |= self._stat(stats, "recall", step) < self.recall_threshold
        if not stale:
            return None
        self.refreshes += 1
        return _kind(self.refreshes, self.retrain_every)

    def _stat(self, stats: Mapping[str, float] | None, key: str, step: int) -> float:
        if stats is None or key not in stats:
            how = (
                "embedding_drift(xb_now, xb_built)"
                if key == "drift"
                else "recall_at_k(index I, exact_topk I)"
            )
            raise ConfigError(
                f"Adaptive({key}_threshold=...) needs stats[{key!r}] at every check step "
                f"(step {step}, every {self.check_every}); measure it with {how} when "
                f"needs_stats(step) is true, or drop {key}_threshold"
            )
        return float(stats[key])

    def __repr__(self) -> str:
        return (
            f"Adaptive(drift_threshold={self.drift_threshold}, recall_threshold="
            f"{self.recall_threshold}, check_every={self.check_every}, "
            f"retrain_every={self.retrain_every})"
        )


SCHEDULES: dict[str, Callable[..., RefreshSchedule]] = {
    "steps": EveryNSteps,
    "epoch": EveryEpoch,
    "never": Never,
    "adaptive": Adaptive,
}


def make_schedule(kind: str, **kwargs: Any) -> RefreshSchedule:
    """A schedule from its config name and arguments.

    >>> make_schedule("steps", n=500, retrain_every=4)
    EveryNSteps(n=500, retrain_every=4)
    """
    if kind not in SCHEDULES:
        raise ConfigError(
            f"unknown refresh schedule {kind!r}; choose one of {', '.join(SCHEDULES)}"
        )
    factory = SCHEDULES[kind]
    accepted = list(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"refresh schedule {kind!r} does not take {', '.join(unknown)}; it accepts "
            f"{', '.join(accepted) or 'no arguments'}"
        )
    try:
        return factory(**kwargs)
    except TypeError as exc:  # e.g. a required argument is missing
        raise ConfigError(f"refresh schedule {kind!r}: {exc}") from None


def schedule_for(
    kind: str,
    every: int = 100,
    retrain_every: int = 0,
    drift_threshold: float | None = None,
    recall_threshold: float | None = None,
    check_every: int = 50,
    retrain_below: float = 0.0,
) -> RefreshSchedule:
    """The schedule named ``kind`` from the settings a run config or a RefreshPolicy holds (each
    kind takes the ones it uses: "steps" every N steps, "epoch", "never", "adaptive")."""
    if kind == "steps":
        return make_schedule(
            "steps", n=every, retrain_every=retrain_every, retrain_below=retrain_below
        )
    if kind == "epoch":
        return make_schedule("epoch", retrain_every=retrain_every)
    if kind == "adaptive":
        return make_schedule(
            "adaptive",
            drift_threshold=drift_threshold,
            recall_threshold=recall_threshold,
            check_every=check_every,
            retrain_every=retrain_every,
        )
    return make_schedule(kind)  # "never", or an error naming the valid schedules


def make_refresh_schedule(config: RunConfig) -> RefreshSchedule:
    """The schedule ``sampler.index`` of a run config asks for."""
    ic = config.sampler.index
    if ic.refresh == "adaptive" and not ic.drift_threshold and not ic.recall_threshold:
        raise ConfigError(
            "sampler.index.refresh=adaptive needs sampler.index.drift_threshold > 0 or "
            "sampler.index.recall_threshold > 0 (or both); with neither it never refreshes: use "
            "sampler.index.refresh=never for that"
        )
    return schedule_for(
        ic.refresh,
        every=ic.refresh_every,
        retrain_every=ic.retrain_every,
        drift_threshold=ic.drift_threshold or None,
        recall_threshold=ic.recall_threshold or None,
        check_every=ic.check_every,
        retrain_below=ic.retrain_below,
    )


def make_index_refresher(config: RunConfig, dim: int, n_items: int | None = None) -> IndexRefresher:
    """An :class:`IndexRefresher` over an :class:`ItemIndex` configured by ``sampler.index``.

    ``n_items`` (the catalog size) resolves ``nlist: 0`` / ``nprobe: 0`` by the default rule
    (:func:`annsample.index.resolve_nlist_nprobe`).
    """
    ic = config.sampler.index
    if n_items is None:
        if not (ic.nlist and ic.nprobe):
            raise ConfigError(
                "sampler.index.nlist / nprobe = 0 follow the catalog size: pass n_items to "
                "make_index_refresher, or set both explicitly"
            )
        nlist, nprobe = ic.nlist, ic.nprobe
    else:
        try:
            nlist, nprobe = resolve_nlist_nprobe(ic.nlist, ic.nprobe, n_items)
        except ItemIndexError as error:
            raise ConfigError(f"sampler.index: {error}") from None

    def factory() -> ItemIndex:
        return ItemIndex(
            dim,
            nlist=nlist,
            nprobe=nprobe,
            backend=ic.backend,
            metric=ic.metric,
            seed=config.seed,
        )

    return IndexRefresher(factory, asynchronous=ic.asynchronous)


def embedding_drift(xb_now: torch.Tensor, xb_built: torch.Tensor, chunk_size: int = 65536) -> float:
    """Mean relative L2 change of the rows since the index was built: mean_i |now_i - built_i| / |built_i|.

    Args:
        xb_now: (N, d) float embeddings now.
        xb_built: (N, d) float embeddings the index was built from (same rows, same order).
        chunk_size: rows per block, bounding temporary memory.

    Rows whose built norm is 0 are measured against 1e-12 instead.

    >>> built = torch.ones(4, 2)
    >>> round(embedding_drift(built * 1.1, built), 6)
    0.1
    """
    check_2d(xb_now, "xb_now", "(N, d)")
    check_2d(xb_built, "xb_built", "(N, d)")
    if xb_now.shape != xb_built.shape:
        raise ItemIndexError(
            f"xb_now has shape {tuple(xb_now.shape)} but xb_built has {tuple(xb_built.shape)}; "
            "drift compares the same rows, so re-build the index after the catalog changes"
        )
    if xb_now.shape[0] == 0:
        raise ItemIndexError("drift of an empty table is undefined: xb has no rows")
    xb_built = xb_built.to(xb_now.device)
    total = 0.0
    with torch.no_grad():
        for r0 in range(0, xb_now.shape[0], chunk_size):
            now, built = xb_now[r0 : r0 + chunk_size], xb_built[r0 : r0 + chunk_size]
            change = (now - built).norm(dim=1)
            total += float((change / built.norm(dim=1).clamp_min(1e-12)).double().sum())
    return total / xb_now.shape[0]


@dataclass
class _Request:
    kind: str
    xb: torch.Tensor  # (N, d) private snapshot
    step: int


class IndexRefresher:
    """Owns an ItemIndex; refresh synchronously or on a background thread from a snapshot, swapping atomically (double buffer).

    Each refresh builds a new ``ItemIndex`` from ``index_factory`` (seeded with the current
    centroids for a re_add, or warm-started from them for a retrain) and publishes it with one
    reference assignment: ``current()`` always returns a complete index whose ``version`` says which
    step's embeddings built it. A published index is never modified again, so it is safe to keep
    searching one while the next is being built.

    Asynchronous mode: ``request`` snapshots ``xb`` (``detach().clone()``) in the calling thread
    and returns; a single worker thread runs at most one refresh at a time. A request that arrives
    while one is in flight is queued, keeping only the latest: a queued request that a newer one
    replaces is dropped and counted in ``stats()["index/skipped_requests"]``, and the kinds
    combine (a dropped retrain turns the queued re_add into a retrain). A background failure is
    re-raised in the training thread by the next ``poll``, ``wait``, ``request`` or ``close``.

    Args:
        index_factory: returns a new, empty ``ItemIndex`` with the run's settings.
        asynchronous: refresh on a background thread instead of blocking ``request``.
        worker_threads: OpenMP threads FAISS uses on the background thread (the setting is per
            thread, so searches elsewhere keep theirs); None keeps FAISS's default. On a machine
            with few cores, 1 stops the refresh and the training step from fighting over them.

    Example:
        >>> refresher = IndexRefresher(lambda: ItemIndex(8, nlist=4, nprobe=4, backend="faiss"))
        >>> xb = torch.randn(200, 8)
        >>> refresher.build(xb, step=0).version
        0
        >>> refresher.request("re_add", xb + 0.01, step=10)
        >>> refresher.current().version, refresher.stats(step=15)["index/staleness_steps"]
        (10, 5)
        >>> refresher.close()
    """

    def __init__(
        self,
        index_factory: Callable[[], ItemIndex],
        asynchronous: bool = False,
        worker_threads: int | None = None,
    ) -> None:
        if not callable(index_factory):
            raise ItemIndexError(
                "index_factory must be a callable returning a new ItemIndex, e.g. "
                "lambda: ItemIndex(dim, nlist=1024)"
            )
        if worker_threads is not None and (
            isinstance(worker_threads, bool)
            or not isinstance(worker_threads, int)
            or worker_threads < 1
        ):
            raise ItemIndexError(
                f"worker_threads must be a positive integer or None, got {worker_threads!r}"
            )
        self.worker_threads = worker_threads
        self._factory = index_factory
        self.asynchronous = bool(asynchronous)
        self._index: ItemIndex | None = None
        self._cond = threading.Condition()
        self._pending: _Request | None = None
        self._in_flight: _Request | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last_step = 0
        self._refresh_count = 0
        self._count_by_kind = dict.fromkeys(REFRESH_KINDS, 0)
        self._skipped = 0
        self._failures = 0
        self._last_refresh_seconds = 0.0
        self._last_reassigned = 0  # rows the last refresh assigned to lists (re_add: changed)
        self._total_refresh_seconds = 0.0
        self._total_wait_seconds = 0.0
        self._build_seconds = 0.0

    # ----------------------------------------------------------------------------- training side

    def build(self, xb: torch.Tensor, step: int = 0, ids: torch.Tensor | None = None) -> ItemIndex:
        """Build an index synchronously from (N, d) float32 ``xb`` and publish it.

        For the first index, or a new catalog (``ids``); refreshes still running finish first, so
        an older refresh can never replace the new build.
        """
        self._check_open()
        if self._thread is not None:
            self.wait()
        start = time.perf_counter()
        index = self._factory()
        index.build(xb, ids=ids, step=step)
        with self._cond:
            self._index = index
            self._last_step = max(self._last_step, step)
            self._build_seconds = time.perf_counter() - start
        return index

    def request(self, kind: str, xb: torch.Tensor, step: int) -> None:
        """Refresh the index from (N, d) float32 ``xb``, the embeddings of training step ``step``.

        Synchronous mode returns once the new index is published; asynchronous mode returns after
        the snapshot, queueing the request (latest wins) if a refresh is already running.
        """
        self.poll()
        self._check_open()
        if kind not in REFRESH_KINDS:
            raise ItemIndexError(
                f"unknown refresh kind {kind!r}; choose one of {', '.join(REFRESH_KINDS)}"
            )
        if self._index is None:
            raise ItemIndexError("nothing to refresh yet: call build(xb, step) first")
        check_2d(xb, "xb", "(N, d)")
        start = time.perf_counter()
        self._last_step = max(self._last_step, step)
        if not self.asynchronous:
            try:
                self._publish(_Request(kind, xb, step))
            finally:
                self._total_wait_seconds += time.perf_counter() - start
            return
        snapshot = xb.detach().clone()  # training keeps updating xb in place
        with self._cond:
            if self._pending is not None:
                self._skipped += 1
                if self._pending.kind == "retrain":
                    kind = "retrain"
                logger.debug("refresh for step %d replaced by step %d", self._pending.step, step)
            self._pending = _Request(kind, snapshot, step)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="annsample-index-refresh", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        self._total_wait_seconds += time.perf_counter() - start

    def current(self) -> ItemIndex:
        """The latest complete index (never a half-built one). Safe from any thread."""
        index = self._index
        if index is None:
            raise ItemIndexError("no index yet: call build(xb, step) first")
        return index

    def poll(self) -> bool:
        """Re-raise a background failure, if any; return whether a refresh is running or queued."""
        with self._cond:
            error, self._error = self._error, None
            busy = self._in_flight is not None or self._pending is not None
        if error is not None:
            raise error
        return busy

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no refresh is running or queued (or ``timeout`` seconds pass).

        The time spent here counts as training stall in ``stats()``. Returns True when idle;
        re-raises a background failure.
        """
        start = time.perf_counter()
        with self._cond:
            idle = self._cond.wait_for(
                lambda: self._in_flight is None and self._pending is None, timeout=timeout
            )
        self._total_wait_seconds += time.perf_counter() - start
        self.poll()
        return idle

    _COUNTERS = (
        "_last_step",
        "_last_reassigned",
        "_refresh_count",
        "_skipped",
        "_failures",
        "_build_seconds",
        "_last_refresh_seconds",
        "_total_refresh_seconds",
        "_total_wait_seconds",
    )

    def state_dict(self) -> dict[str, Any]:
        """The published index (with its vectors) and the counters; a refresh still running on
        the background thread is not included."""
        with self._cond:
            counters = {name: getattr(self, name) for name in self._COUNTERS}
            counters["_count_by_kind"] = dict(self._count_by_kind)
            index = self._index
        if index is None:
            raise ItemIndexError("no index yet: call build(xb, step) first")
        return {"index": index.state_dict(with_vectors=True), "counters": counters}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> None:
        """Publish the saved index as it was (no k-means, no re-add) and restore the counters."""
        index_state = dict(state["index"])
        if device is not None and index_state.get("vectors") is not None:
            # "auto" resolves from where the vectors are, as it did from the embeddings at build
            index_state["vectors"] = index_state["vectors"].to(device)
        index = ItemIndex.from_state_dict(index_state)
        with self._cond:
            self._index = index
            for name, value in state["counters"].items():
                setattr(self, name, dict(value) if isinstance(value, Mapping) else value)

    def stats(self, step: int | None = None) -> dict[str, float]:
        """Step-keyed record of refresh cost and staleness, with namespaced keys.

        ``index/staleness_steps`` is ``step`` (default: the latest step seen) minus the version.
        """
        with self._cond:
            version = -1 if self._index is None else self._index.version
            now = self._last_step if step is None else step
            return {
                "index/version": version,
                "index/staleness_steps": now - version if version >= 0 else 0,
                "index/refresh_count": self._refresh_count,
                "index/re_add_count": self._count_by_kind["re_add"],
                "index/retrain_count": self._count_by_kind["retrain"],
                "index/skipped_requests": self._skipped,
                "index/failures": self._failures,
                "index/in_flight": int(self._in_flight is not None or self._pending is not None),
                "index/build_seconds": self._build_seconds,
                "index/last_refresh_seconds": self._last_refresh_seconds,
                "index/last_reassigned_rows": self._last_reassigned,
                "index/total_refresh_seconds": self._total_refresh_seconds,
                "index/total_wait_seconds": self._total_wait_seconds,
            }

    def close(self) -> None:
        """Drop any queued request, let a running refresh finish, stop the worker.

        Re-raises a background failure nobody has seen yet. Idempotent.
        """
        with self._cond:
            self._closed = True
            if self._pending is not None:
                self._skipped += 1
                self._pending = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self.poll()

    def __enter__(self) -> IndexRefresher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the exception already propagating is the one to report
            logger.exception("background index refresh also failed")

    # ----------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise ItemIndexError("this IndexRefresher is closed; create a new one")

    def _publish(self, request: _Request) -> None:
        """Build the refreshed index beside the current one, then swap it in."""
        start = time.perf_counter()
        current = self.current()
        index = self._factory()
        # Centroids (and nprobe) only: the new contents come from request.xb.
        index.load_state_dict(current.state_dict(with_vectors=False))
        if request.kind == "retrain":
            index.retrain(request.xb, request.step)
        else:  # the rows that did not change keep the published index's lists
            index.re_add(request.xb, request.step, reference=current)
        seconds = time.perf_counter() - start
        with self._cond:
            self._index = index
            self._refresh_count += 1
            self._count_by_kind[request.kind] += 1
            self._last_refresh_seconds = seconds
            self._total_refresh_seconds += seconds
            self._last_reassigned = index.last_reassigned
        logger.debug(  # every refresh is also recorded in metrics.jsonl (index/...)
            "index %s published: version=%d (%s, %.3f s)",
            request.kind,
            request.step,
            "background" if self.asynchronous else "blocking",
            seconds,
        )

    def _work(self) -> None:
        """Worker thread: run queued requests one at a time until closed."""
        if self.worker_threads is not None:
            faiss_ivf.set_threads(self.worker_threads)  # this thread only
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return  # closed and nothing queued
                request, self._pending = self._pending, None
                self._in_flight = request
            try:
                self._publish(request)
            except BaseException as exc:  # handed to the training thread, never swallowed
                logger.error(
                    "background index %s for step %d failed: %s", request.kind, request.step, exc
                )
                with self._cond:
                    if self._error is None:  # the first failure is the informative one
                        self._error = exc
                    self._failures += 1
            finally:
                with self._cond:
                    self._in_flight = None
                    self._cond.notify_all()
