"""Staleness of the item index, measured on probe queries rather than guessed.

At each refresh (and every ``probe_every`` steps) the training loop asks how far the index it is
sampling from has fallen behind the current embeddings: recall@K of the stale index against the exact
top-K under the current embeddings, embedding drift since the build, and, on the probe queries, the
hardness of the ANN sampler's negatives and its total-variation distance to exact GenNi.
``StalenessMonitor`` is the training loop's side of it: it drives the refresh schedule and logs
the figures.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from annsample.errors import NumericalError
from annsample.index import exact_topk, recall_at_k
from annsample.refresh import embedding_drift
from annsample.samplers import AnnSampler, Exclusions, genni_log_probs


def probe_exclusions(positives: torch.Tensor, history: torch.Tensor, n_items: int) -> Exclusions:
    """Exclusions for Q probe queries, one history row each."""
    return Exclusions(
        history, torch.arange(positives.shape[0], device=positives.device), positives, n_items
    )


@torch.no_grad()
def allowed_percentiles(
    xq: torch.Tensor, item_embeddings: torch.Tensor, exclusions: Exclusions
) -> torch.Tensor:
    """(Q, N+1) float64: for every item, the share of the query's allowed items scoring below it.

    0.5 is the mean over a uniform draw; excluded items get 0. Dense, so for probes only.
    """
    excluded = exclusions.dense_mask()
    scores = (xq @ item_embeddings.T).masked_fill(excluded, float("-inf"))
    # excluded items sort first; subtracting their count leaves the rank among allowed items
    below = scores.argsort(dim=1).argsort(dim=1).double() - excluded.sum(1, keepdim=True)
    return (below / (exclusions.n_allowed.double()[:, None] - 1).clamp(min=1)).clamp(min=0)


@torch.no_grad()
def measure_staleness(
    sampler: AnnSampler,
    xq: torch.Tensor,
    item_embeddings: torch.Tensor,
    built_embeddings: torch.Tensor | None,
    exclusions: Exclusions,
    max_dense: int = 1 << 25,
) -> dict[str, float]:
    """Namespaced staleness figures of ``sampler``'s current index for probe queries ``xq``.

    Args:
        sampler: the ANN sampler (its ``index`` is searched as training would).
        xq: (Q, d) probe hidden states.
        item_embeddings: (N+1, d) current item table (row 0 padding).
        built_embeddings: (N, d) the table the index was built from, for drift (None: skip).
        exclusions: the probe queries' exclusions.
        max_dense: TV and hardness need Q x N dense probabilities; skipped above this size.
    """
    index = sampler.current_index()
    K = sampler.candidates
    xb = item_embeddings[1:]
    _, I_exact = exact_topk(xq, xb, K)
    _, I_index = index.search(xq, K)
    stats = {"index/recall@k": recall_at_k(I_index, I_exact + 1), "index/k": K}
    if built_embeddings is not None:
        stats["index/drift"] = embedding_drift(xb, built_embeddings)
    if xq.shape[0] * item_embeddings.shape[0] <= max_dense:
        # each probe is one sequence's last state, so both query modes see the same candidates
        q = sampler.marginal_probabilities(
            xq, item_embeddings, exclusions, sequence_queries=xq, draws=16
        ).double()
        p = genni_log_probs(xq, item_embeddings, exclusions, sampler.alpha).exp()
        stats["sampler/tv_to_exact"] = float(0.5 * (q - p).abs().sum(1).mean())
        # hardness: expected share of allowed items scoring below a drawn negative
        share = allowed_percentiles(xq, item_embeddings, exclusions)
        stats["sampler/hardness"] = float((q * share).sum(1).mean())
        stats["sampler/exact_hardness"] = float((p * share).sum(1).mean())
    return stats


class BuiltSnapshots:
    """The item table the *published* index was built from, for drift.

    An asynchronous refresh publishes later than it is requested, and a queued request can be
    replaced before it runs; taking the requested snapshot as built would understate staleness.
    Snapshots wait here, keyed by their step, until ``sync`` sees an index of that version.

    Args:
        built: (N, d) float32 table of the current index, or None when drift is not measured.
    """

    def __init__(self, built: torch.Tensor | None) -> None:
        self.built = built
        self._pending: dict[int, torch.Tensor] = {}

    @property
    def pending_steps(self) -> list[int]:
        """The steps of requested snapshots whose index is not published yet."""
        return list(self._pending)

    def requested(self, step: int, snapshot: torch.Tensor) -> None:
        """A refresh from ``snapshot`` (N, d), the table at training step ``step``, was requested."""
        if self.built is not None:
            self._pending[step] = snapshot

    def sync(self, version: int) -> None:
        """The published index has ``version``: its snapshot becomes ``built``; older ones go."""
        if version in self._pending:
            self.built = self._pending[version]
        self._pending = {step: x for step, x in self._pending.items() if step > version}


def item_table_snapshot(model: Any) -> torch.Tensor:
    """A no-grad copy of the model's item table without the padding row, (N, d) float32."""
    return model.item_embeddings.detach()[1:].float().clone()


class StalenessMonitor:
    """Runs the refresh schedule and measures index staleness on fixed probe queries.

    Probe queries are the last hidden states of ``probe_inputs`` (computed in eval mode at probe
    time) with ``exclusions`` (their history and validation target). Figures are logged every
    ``probe_every`` steps, or with ``probe_every`` = 0 just before every refresh (when the index is
    at its stalest), and whenever an adaptive schedule needs them.

    Args:
        model: the model (``encode(seq) -> (B, T, d)``, ``item_embeddings`` (N+1, d)); only read.
        sampler: the ann sampler whose hardness and TV are measured.
        probe_inputs: (Q, T) int64 probe sequences on the model's device.
        exclusions: their exclusions.
        probe_every: steps between probes (0 = only before refreshes and when a schedule asks).
        keep_built: keep the table the index was built from, so drift can be measured.
    """

    def __init__(
        self,
        model: Any,
        sampler: Any,
        probe_inputs: torch.Tensor,
        exclusions: Exclusions,
        probe_every: int,
        keep_built: bool,
    ) -> None:
        self.model, self.sampler = model, sampler
        self.inputs, self.exclusions = probe_inputs, exclusions
        self.probe_every = probe_every
        self.keep_built = keep_built
        self.snapshots = BuiltSnapshots(item_table_snapshot(model) if keep_built else None)
        self.last_recall: float | None = None  # shown on the progress bar

    @property
    def built(self) -> torch.Tensor | None:
        """The (N, d) table the published index was built from (None when drift is not kept)."""
        return self.snapshots.built

    @built.setter
    def built(self, value: torch.Tensor | None) -> None:
        self.snapshots = BuiltSnapshots(value)

    def measure(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                xq = self.model.encode(self.inputs)[:, -1].contiguous()
            items = self.model.item_embeddings.detach()
            return measure_staleness(self.sampler, xq, items, self.built, self.exclusions)
        finally:
            self.model.train(was_training)

    def after_step(
        self, refresher: Any, schedule: Any, step: int, epoch_end: bool, log: Any
    ) -> None:
        """Refresh when ``schedule`` says so, and write the staleness figures to ``log``."""
        refresher.poll()  # a background failure surfaces here, in the training thread
        self.snapshots.sync(refresher.current().version)  # an async refresh may have landed
        stats: dict[str, Any] = {}
        due = schedule.needs_stats(step) or (self.probe_every and step % self.probe_every == 0)
        if due and not epoch_end:  # the epoch-end call repeats the epoch's last step
            stats = self.measure()
        kind = schedule.should_refresh(
            step,
            epoch_end,
            {"drift": stats.get("index/drift", 0.0), "recall": stats.get("index/recall@k", 1.0)},
        )
        if kind is not None and not stats and not self.probe_every:
            stats = self.measure()
        if kind is not None:
            t0 = time.perf_counter()
            snapshot = item_table_snapshot(self.model)
            if not bool(torch.isfinite(snapshot).all()):
                raise NumericalError(
                    f"training diverged at step {step}: the item embeddings hold NaN or inf, so "
                    "the index is not rebuilt from them"
                )
            refresher.request(kind, snapshot, step)
            stats["index/request_seconds"] = time.perf_counter() - t0
            stats["index/refresh"] = kind
            # built once published (at once when synchronous; a skipped async request never is)
            self.snapshots.requested(step, snapshot)
            self.snapshots.sync(refresher.current().version)
        if "index/recall@k" in stats:
            self.last_recall = stats["index/recall@k"]
        if stats:
            log.write(step, **stats, **refresher.stats(step))
