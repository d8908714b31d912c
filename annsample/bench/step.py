"""Training-step benchmark: every sampler inside the real training step, on one warmed-up model.

``bench_step`` builds the synthetic catalog of ``--catalog-size N`` with the settings ``annsample
train --catalog-size N`` uses, trains one SASRec for a few hundred steps with uniform negatives (so
the model's GenNi distribution is no longer flat), then, starting every sampler from that same
state (weights and optimiser moments restored), trains the same batches with each sampler in turn
and times the full step (forward, sampling, loss, backward, optimiser) and the sampler inside it.

On probe queries (the last hidden state of validation users, history and validation target
excluded, the model in eval mode) each sampler's *marginal* distribution is compared with exact
GenNi p(j|h) ∝ exp(α·h·e_j):

- uniform, popularity: their closed-form probabilities;
- dns (best of C uniform candidates): closed form from the rank of every allowed item;
- pool and ann (with a tail): Rao-Blackwellised over R draws of the shared pool / tail. Given a
  draw with slot normaliser W, an item that is not a fixed candidate gets mass
  (M/N)·E[c·e^s / (W + c·e^s)], every fixed ann candidate e^s·E[1/W]: each draw informs every
  item, so the estimate has no coverage floor at a million items (averaging the conditional
  distributions, as ``AnnSampler.marginal_probabilities`` does, covers only R·M items);
- exact: empirical frequencies of its own draws, with the noise floor of as many ideal draws.

Hardness is the expected share of allowed items scoring below a drawn negative; the softmax gap is
:func:`annsample.bench.samplers.softmax_gap`; the ann record adds index recall@K against the exact top-K
(fresh, after the timed steps with the now stale index, and after a re_add).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from annsample import data as data_mod
from annsample.bench.samplers import softmax_gap, total_variation, tv_floor
from annsample.config import RunConfig, catalog_overrides, load_config
from annsample.errors import ConfigError
from annsample.index import exact_topk, recall_at_k
from annsample.samplers import (
    AnnSampler,
    DNSSampler,
    ExactSampler,
    Exclusions,
    PoolSampler,
    UniformSampler,
    genni_log_probs,
)
from annsample.staleness import allowed_percentiles

logger = logging.getLogger(__name__)

STEP_SAMPLERS = ("uniform", "popularity", "dns", "pool", "ann", "exact")
POOL_AT_ANN_COST = "pool@ann_cost"


def default_steps(n_items: int) -> int:
    """Timed steps per sampler when ``--steps`` is not given: ~1 minute per sampler at 1M on CPU."""
    return 50 if n_items >= 200_000 else 30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stopwatch:
    """Accumulates the wall time of calls (device-synchronised), reset per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def time(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


class _TimedSampler:
    """A sampler whose ``sample`` calls are timed; everything else is the wrapped sampler's."""

    def __init__(self, sampler: Any, watch: _Stopwatch) -> None:
        self._sampler, self._watch = sampler, watch

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        return self._watch.time(self._sampler.sample, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)


class _TimedSearch:
    """An index source for :class:`AnnSampler` whose searches are timed (index or refresher)."""

    def __init__(self, source: Any, watch: _Stopwatch) -> None:
        self._source, self._watch = source, watch

    def search(self, xq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._source.current() if hasattr(self._source, "current") else self._source
        return self._watch.time(index.search, xq, k)


# ------------------------------------------------------------------------- marginal distributions


def dns_probabilities(
    shares: torch.Tensor, exclusions: Exclusions, candidates: int
) -> torch.Tensor:
    """(Q, N+1) float64: the distribution of the best of ``candidates`` uniform allowed items.

    Args:
        shares: (Q, N+1) float64 from :func:`annsample.staleness.allowed_percentiles`.
        exclusions: the queries' exclusions.
        candidates: C, uniform draws (with replacement) per query; the top-scoring one is kept.

    An item of rank r among n allowed items (r below it) wins with ((r+1)/n)^C - (r/n)^C.
    """
    n = exclusions.n_allowed.double()[:, None]  # (Q, 1)
    below = (shares * (n - 1)).round()
    q = ((below + 1) / n) ** candidates - (below / n) ** candidates
    return q.masked_fill(exclusions.dense_mask(), 0.0)


def _rao_blackwell(
    fixed_log_mass: torch.Tensor,
    scores: torch.Tensor,
    allowed_outside: torch.Tensor,
    draw_log_w: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    shared: int,
    draws: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal slot mass of a proposal with a shared uniform draw of ``shared`` items.

    Args:
        fixed_log_mass: (Q,) log of the slot mass that does not depend on the draw (ann candidates;
            -inf for the pool).
        scores: (Q, N+1) float64 α-scaled scores.
        allowed_outside: (Q, N+1) bool, items that can only be reached through the shared draw.
        draw_log_w: (shared ids (m,), extra) -> (log W (Q,), log c (Q,)): the draw's slot mass and
            the log weight of each usable drawn item's slot when ``extra`` more usable items
            (the item whose mass is computed) join the draw.
        shared: M, the size of the shared draw (items 1..N, with replacement).

    Returns:
        mean over draws of 1/W (Q,) for the full draw, and the per-item mass (Q, N+1) float64
        (only meaningful on ``allowed_outside``): P(item drawn) · E[c e^s / (W' + c e^s)], W' the
        mass of the other M - 1 draws. An item drawn twice (probability O(M²/N²)) is ignored.
    """
    n_items = scores.shape[1] - 1
    inv_w = torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
    outside = torch.zeros_like(scores)
    for _ in range(draws):
        ids = torch.randint(1, n_items + 1, (shared,), generator=generator, device=scores.device)
        log_w, _ = draw_log_w(ids, 0)
        inv_w += torch.exp(-torch.logaddexp(log_w, fixed_log_mass))
        others, log_c = draw_log_w(ids[1:], 1)
        others = torch.logaddexp(others, fixed_log_mass)
        outside += torch.sigmoid(scores + (log_c - others)[:, None])
    outside *= -math.expm1(shared * math.log1p(-1.0 / n_items)) / draws  # P(drawn at least once)
    return inv_w / draws, outside.masked_fill(~allowed_outside, 0.0)


def ann_marginal(
    sampler: AnnSampler,
    xq: torch.Tensor,
    item_embeddings: torch.Tensor,
    exclusions: Exclusions,
    draws: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """(Q, N+1) float64 marginal distribution of the ann sampler for queries ``xq`` (Q, d).

    Each query is its own sequence query (as for a sequence's last position). Without a tail the
    result is the sampler's closed form; with ``tail_samples`` it is Rao-Blackwellised over
    ``draws`` tail draws (see the module docstring). Returns it normalised, and how far its total
    was from 1 before normalising (the first-order approximation's error, max over queries).
    """
    if not sampler.tail_samples:
        probs = sampler.probabilities(xq, item_embeddings, exclusions, sequence_queries=xq)
        return probs.double(), 0.0
    logits, candidates = sampler.candidate_logits(xq, item_embeddings, exclusions, xq)  # (Q, K)
    usable = torch.isfinite(logits)
    has_candidate = usable.any(dim=1)
    eps = torch.where(has_candidate, sampler.epsilon, 1.0).double()[:, None]  # (Q, 1)
    scores = sampler.alpha * (xq @ item_embeddings.T).double()  # (Q, N+1)
    excluded = exclusions.dense_mask()
    in_candidates = torch.zeros_like(excluded)
    in_candidates.scatter_(1, torch.where(usable, candidates, 0), True)
    in_candidates[:, 0] = False
    outside = ~excluded & ~in_candidates
    n_tail = (exclusions.n_allowed - usable.sum(dim=1)).clamp(min=0).double()  # (Q,)
    fixed = torch.logsumexp(logits.double(), dim=1)  # (Q,) -inf without candidates

    def draw_log_w(ids: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen = outside[:, ids]  # (Q, m) drawn items that may use a tail slot
        log_c = torch.log(n_tail / (seen.sum(dim=1) + extra).clamp(min=1).double())
        tail = (scores[:, ids] + log_c[:, None]).masked_fill(~seen, float("-inf"))
        return torch.logsumexp(tail, dim=1), log_c

    inv_w, outside_mass = _rao_blackwell(
        fixed, scores, outside, draw_log_w, sampler.tail_samples, draws, generator
    )
    slot = torch.where(in_candidates & ~excluded, torch.exp(scores) * inv_w[:, None], outside_mass)
    # scores are not shifted: fine while α·|h·e| stays far below 700 (float64 exp range)
    slot = torch.where(has_candidate[:, None], slot, 0.0)
    allowed = (~excluded).double()
    probs = (1 - eps) * slot + eps * allowed / allowed.sum(dim=1, keepdim=True)
    total = probs.sum(dim=1, keepdim=True)
    return probs / total, float((total - 1).abs().max())


def pool_marginal(
    sampler: PoolSampler,
    xq: torch.Tensor,
    item_embeddings: torch.Tensor,
    exclusions: Exclusions,
    draws: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """(Q, N+1) float64 marginal distribution of the pool sampler, Rao-Blackwellised over
    ``draws`` pools; returns it normalised and its total's distance from 1 before normalising."""
    scores = sampler.alpha * (xq @ item_embeddings.T).double()  # (Q, N+1)
    allowed = ~exclusions.dense_mask()
    Q = xq.shape[0]
    no_fixed = torch.full((Q,), float("-inf"), dtype=torch.float64, device=xq.device)
    zero = torch.zeros(Q, dtype=torch.float64, device=xq.device)

    def draw_log_w(ids: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = scores[:, ids].masked_fill(~allowed[:, ids], float("-inf"))
        return torch.logsumexp(pooled, dim=1), zero

    _, mass = _rao_blackwell(
        no_fixed, scores, allowed, draw_log_w, sampler.pool_size, draws, generator
    )
    total = mass.sum(dim=1, keepdim=True)
    return mass / total, float((total - 1).abs().max())


# ------------------------------------------------------------------------- the benchmark


def _probe(model, prepared, config: RunConfig, queries: int, seed: int, device):
    """Probe hidden states (Q, d), the item table (N+1, d) and their exclusions."""
    split = prepared.split
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(split.n_users, size=min(queries, split.n_users), replace=False))
    inputs, targets = data_mod.eval_tensors(split, "valid", config.data.max_len)
    indptr, hist_items = data_mod.history_csr(split, "valid")
    model.eval()
    with torch.no_grad():
        h = model.encode(torch.as_tensor(inputs[users], device=device))[:, -1].contiguous()
        items = model.item_embeddings.detach().clone()
    model.train()
    history = torch.as_tensor(
        data_mod.pad_rows(indptr, hist_items, users, split.n_items + 1), device=device
    )
    positives = torch.as_tensor(targets[users], device=device)
    exclusions = Exclusions(
        history, torch.arange(len(users), device=device), positives, split.n_items
    )
    return h, items, exclusions


def _batches(prepared, config: RunConfig, count: int, generator: torch.Generator):
    """``count`` training batches in epoch order (as many epochs as it takes)."""
    from annsample.train import make_batches

    lengths = (torch.as_tensor(prepared.train_inputs) > 0).sum(dim=1).clamp(min=1)
    out: list[torch.Tensor] = []
    while len(out) < count:
        out.extend(
            make_batches(lengths, config.train.batch_size, config.train.bucket_by_length, generator)
        )
    return out[:count], lengths


def _trained_run(run_dir: str | Path, config: Any, n_items: int) -> tuple[Any, Path]:
    """The config and best checkpoint of a run trained on the catalog and model that ``config``
    (bench step's settings) describes; a run on other data or another model is refused."""
    from annsample.run import load_run

    trained_config, best = load_run(run_dir)
    differ = [
        f"{section}.{field.name}"
        for section in ("data", "model")
        for field in fields(getattr(config, section))
        if getattr(getattr(config, section), field.name)
        != getattr(getattr(trained_config, section), field.name)
    ]
    if differ:
        raise ConfigError(
            f"--from-run {run_dir} was trained with other {', '.join(differ)} than bench step "
            f"uses for --catalog-size {n_items:,}; pass a run of `annsample train --catalog-size "
            f"{n_items}` with the same --set model/data settings"
        )
    return trained_config, best


def bench_step(
    n_items: int,
    samplers: tuple[str, ...] = STEP_SAMPLERS,
    steps: int | None = None,
    warmup_steps: int | None = None,
    device: str = "auto",
    overrides: tuple[str, ...] = (),
    probe_queries: int = 32,
    draws: int = 64,
    exact_draws: int = 10_000,
    max_seconds: float = 120.0,
    min_steps: int = 3,
    softmax_negatives: int = 128,
    seed: int = 0,
    show_progress: bool = True,
    save_probe: str | Path | None = None,
    profile: bool = False,
    from_run: str | Path | None = None,
) -> list[dict]:
    """One record per sampler, timed inside the training step on the same batches and model state.

    Args:
        n_items: synthetic catalog size N (the settings of ``annsample train --catalog-size N``).
        samplers: names from :data:`STEP_SAMPLERS`; with both ``pool`` and ``ann`` an extra
            ``pool@ann_cost`` record runs the pool sampler with the pool size whose sample call
            takes the ann sampler's measured milliseconds (calibrated on one batch).
        steps: timed steps per sampler (None: :func:`default_steps`).
        warmup_steps: uniform-negative training steps before any sampler is timed (None: 300,
            or 0 with ``from_run``).
        device: "cpu", "cuda" or "auto".
        overrides: ``--set KEY=VALUE`` config overrides, applied after the catalog settings
            (``sampler.name`` is set per sampler).
        probe_queries: Q validation users whose last hidden states measure TV, hardness, gap and
            index recall (dense (Q, N+1) float64 matrices: 256 MB each at Q = 32, N = 1M).
        draws: shared pool / tail draws averaged in the pool and ann marginals.
        exact_draws: draws per probe query for the exact sampler's empirical TV.
        max_seconds: a sampler stops after this many seconds of timed steps once it has done
            ``min_steps`` (exact GenNi at 1M takes seconds per step).
        softmax_negatives: negatives per query for the softmax gap.
        save_probe: also write the warmed-up item table (N+1, d) and the probe hidden states
            (Q, d) there (``torch.save`` of a dict), e.g. for ``annsample bench index``.
        profile: after the ann sampler's timed steps, run 3 more under ``torch.profiler`` and
            add its 12 most expensive operators (self CPU ms per step) to the ann record.
        from_run: start from the best checkpoint of this ``annsample train --catalog-size N``
            run folder instead of a fresh model (its optimiser moments start at zero): TV,
            hardness and index recall then describe a trained model, as in training.

    Returns:
        Records with ``sampler, catalog_size, step_ms, sampler_ms, sampler_share,
        ratio_to_uniform, tv_to_exact, tv_method, hardness, softmax_gap`` and, for ann,
        ``index_recall`` (fresh), ``index_recall_stale`` (after the timed steps),
        ``search_ms`` and ``refresh_seconds``; ms are medians over the timed steps.
    """
    from annsample.distributed import resolve_device
    from annsample.model import SASRec
    from annsample.prepare import prepare_data
    from annsample.refresh import make_index_refresher
    from annsample.run import load_model
    from annsample.samplers import build_sampler
    from annsample.train import make_optimizers, step_loss

    unknown = sorted(set(samplers) - set(STEP_SAMPLERS))
    if unknown:
        raise ConfigError(
            f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(STEP_SAMPLERS)}"
        )
    for text in overrides:
        if text.strip().startswith(("sampler.name=", "data.")):
            raise ConfigError(
                f"--set {text!r}: bench step sets the sampler and the catalog itself; use "
                "--sampler NAME and --catalog-size N instead"
            )
    # validated as an ann run, the sampler that reads the most settings; each sampler below
    # replaces the name
    config = load_config(
        None,
        catalog_overrides(n_items)
        + ("sampler.name=ann",)
        + tuple(overrides)
        + (f"train.device={device}",),
    )
    if config.loss.name == "full_ce":
        raise ConfigError("bench step times negative samplers; loss.name=full_ce samples none")
    trained = None
    if from_run is not None:  # checked before the catalog is built (a minute at 1M)
        if warmup_steps:
            raise ConfigError(
                "--from-run starts from a trained model; drop --warmup-steps (or set it to 0)"
            )
        trained = _trained_run(from_run, config, n_items)
    warmup_steps = (0 if from_run is not None else 300) if warmup_steps is None else warmup_steps
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    steps = steps or default_steps(n_items)
    dev = resolve_device(config.train.device)
    torch.manual_seed(seed)
    prepared = prepare_data(config)
    split = prepared.split
    if config.sampler.candidates > split.n_items:
        raise ConfigError(
            f"sampler.candidates={config.sampler.candidates} is more than the catalog's "
            f"{split.n_items} items; lower it with --set sampler.candidates=..."
        )
    model = SASRec(split.n_items, config.data.max_len, config.model).to(dev)
    if trained is not None:
        model.load_state_dict(load_model(*trained, split.n_items, dev).state_dict())
    optimizers = make_optimizers(model, config)
    order = torch.Generator().manual_seed(seed + 2)
    batches, lengths = _batches(prepared, config, warmup_steps + steps, order)
    inputs = torch.as_tensor(prepared.train_inputs)
    targets = torch.as_tensor(prepared.train_targets)
    k = config.sampler.num_negatives
    uniform = UniformSampler()
    sampler_watch = _Stopwatch(dev)
    search_watch = _Stopwatch(dev)

    def train_step(batch: torch.Tensor, sampler, step: int, generator) -> dict[str, float]:
        width = int(lengths[batch].max())
        seq = inputs[batch, -width:].to(dev)
        tgt = targets[batch, -width:].to(dev)
        sampler_watch.seconds = search_watch.seconds = 0.0
        _sync(dev)
        t0 = time.perf_counter()
        active = uniform if step < config.sampler.warmup_steps else sampler
        histories = prepared.histories(batch, dev) if config.sampler.exclude_history else None
        loss = step_loss(model, seq, tgt, config, active, histories, split.n_items, step, generator)
        _sync(dev)
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(dev)
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        _sync(dev)
        t3 = time.perf_counter()
        return {
            "step": t3 - t0,
            "sampler": sampler_watch.seconds,
            "search": search_watch.seconds,
            "forward_loss": t1 - t0 - sampler_watch.seconds,
            "backward": t2 - t1,
            "optimizer": t3 - t2,
            "loss": float(loss.detach()),
        }

    def _pool_size_at(target_ms: float, batch: torch.Tensor, n: int) -> int:
        """The pool size whose sample call on ``batch``'s positions takes ``target_ms``: pool
        sizes doubling from 250, median of 3 calls each, interpolated in log-log (pool cost is
        not linear in its size: the (P, M) softmax, sort and exclusion look-ups grow faster)."""
        from annsample.api import sample_negatives

        width = int(lengths[batch].max())
        seq, tgt = inputs[batch, -width:].to(dev), targets[batch, -width:].to(dev)
        with torch.no_grad():
            h = model.encode(seq)  # (B, T, d)
        histories = None
        if config.sampler.exclude_history:
            users = prepared.train_users[batch.numpy()]
            rows = data_mod.pad_rows(prepared.history_indptr, prepared.history_items, users, 0)
            histories = torch.as_tensor(rows, device=dev)  # (B, H), 0 = padding
        items = model.item_embeddings.detach()
        g = torch.Generator(device=dev).manual_seed(seed)
        points: list[tuple[int, float]] = []
        size = 250
        while True:
            pool = PoolSampler(alpha=config.sampler.alpha, pool_size=size)
            watch = _Stopwatch(dev)
            times = []
            for _ in range(3):
                watch.seconds = 0.0
                watch.time(sample_negatives, pool, h, tgt, items, k, g, histories)
                times.append(watch.seconds * 1000.0)
            points.append((size, float(np.median(times))))
            if points[-1][1] >= target_ms or size >= n:
                break
            size = min(n, size * 2)
        if len(points) == 1 or points[-1][1] < target_ms:
            return points[-1][0] if points[-1][1] < target_ms else points[0][0]
        (m0, t0), (m1, t1) = points[-2], points[-1]
        slope = math.log(m1 / m0) / max(math.log(t1 / max(t0, 1e-9)), 1e-9)
        return int(min(n, max(1, round(m0 * (target_ms / max(t0, 1e-9)) ** slope))))

    t_warm = time.perf_counter()
    generator = torch.Generator(device=dev).manual_seed(seed + 1)
    warm_losses = []
    for step, batch in enumerate(
        tqdm(batches[:warmup_steps], desc="warm-up", disable=not show_progress)
    ):
        warm_losses.append(train_step(batch, uniform, step, generator)["loss"])
    logger.info(
        "warm-up: %d uniform steps in %.1f s, loss %.4f -> %.4f",
        warmup_steps,
        time.perf_counter() - t_warm,
        warm_losses[0] if warm_losses else float("nan"),
        float(np.mean(warm_losses[-20:])) if warm_losses else float("nan"),
    )
    timed_batches = batches[warmup_steps:]
    # every sampler starts from this state: weights, optimiser moments, RNG
    model_state = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer_states = [_clone_state(opt.state_dict()) for opt in optimizers]

    # probe queries and the exact reference on the warmed-up model
    h, items, probe_ex = _probe(model, prepared, config, probe_queries, seed, dev)
    alpha = config.sampler.alpha
    if save_probe is not None:
        torch.save({"item_embeddings": items.cpu(), "queries": h.cpu()}, save_probe)
    exact_p = genni_log_probs(h, items, probe_ex, alpha).exp()  # (Q, N+1) float64
    shares = allowed_percentiles(h, items, probe_ex)  # (Q, N+1) float64
    exact_hardness = float((exact_p * shares).sum(1).mean())

    order_names = [name for name in STEP_SAMPLERS if name in samplers]  # ann before pool
    if "ann" in order_names and "pool" in order_names:
        order_names.remove("pool")
        order_names.insert(order_names.index("ann") + 1, "pool")
        order_names.insert(order_names.index("pool") + 1, POOL_AT_ANN_COST)
    records: list[dict] = []
    by_name: dict[str, dict] = {}
    ic = config.sampler.index
    for name in order_names:
        torch.manual_seed(seed)  # the same dropout masks for every sampler
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, optimizer_states, strict=True):
            opt.load_state_dict(_clone_state(state))
        settings = config.sampler
        extra: dict[str, Any] = {}
        if name == "dns":  # a per-position candidate set (1000, the pool default, is not DNS)
            settings = replace(settings, pool_size=min(settings.pool_size, 100))
            extra["candidates"] = settings.pool_size
        elif name == POOL_AT_ANN_COST:
            size = _pool_size_at(by_name["ann"]["sampler_ms"], timed_batches[0], split.n_items)
            settings = replace(settings, pool_size=size)
        if name in ("pool", POOL_AT_ANN_COST):
            extra["pool_size"] = settings.pool_size
        elif name == "popularity":
            extra["beta"] = settings.beta
        run_config = replace(
            config, sampler=replace(settings, name="pool" if name == POOL_AT_ANN_COST else name)
        )
        refresher = None
        if name == "ann":
            refresher = make_index_refresher(config, items.shape[1], split.n_items)
            t0 = time.perf_counter()
            refresher.build(
                items[1:].contiguous(), step=0, ids=torch.arange(1, split.n_items + 1, device=dev)
            )
            index = refresher.current()
            extra.update(
                nlist=index.nlist,
                nprobe=index.nprobe,
                metric=ic.metric,
                backend=index.backend,
                candidates=settings.candidates,
                epsilon=settings.epsilon,
                tail_samples=settings.tail_samples,
                query=settings.query,
                index_build_seconds=round(time.perf_counter() - t0, 3),
            )
        sampler = build_sampler(
            run_config.sampler,
            prepared.popularity,
            None if refresher is None else _TimedSearch(refresher, search_watch),
        )
        quality = _quality(
            name, sampler, h, items, probe_ex, exact_p, shares, draws, exact_draws,
            softmax_negatives, seed, dev,
        )  # fmt: skip
        if refresher is not None:
            _, I_exact = exact_topk(h, items[1:].contiguous(), settings.candidates)
            _, I_index = refresher.current().search(h, settings.candidates)
            quality["index_recall"] = round(recall_at_k(I_index, I_exact + 1), 4)

        timed = _TimedSampler(sampler, sampler_watch)
        generator = torch.Generator(device=dev).manual_seed(seed + 1)
        rows = []
        started = time.perf_counter()
        bar = tqdm(timed_batches, desc=name, disable=not show_progress, leave=False)
        for i, batch in enumerate(bar):
            rows.append(train_step(batch, timed, warmup_steps + i, generator))
            if len(rows) >= min_steps and time.perf_counter() - started > max_seconds:
                break
        bar.close()
        if profile and name == "ann":
            extra["profile"] = _profile(
                lambda i, s=timed, g=generator: train_step(
                    timed_batches[i % len(timed_batches)], s, warmup_steps + i, g
                ),
                3,
            )
        median = {key: float(np.median([r[key] for r in rows])) * 1000.0 for key in rows[0]}
        record = {
            "sampler": name,
            "catalog_size": split.n_items,
            "step_ms": round(median["step"], 3),
            "sampler_ms": round(median["sampler"], 3),
            "sampler_share": round(median["sampler"] / median["step"], 4),
            "ratio_to_uniform": None,
            **quality,
            "exact_hardness": round(exact_hardness, 4),
            "forward_loss_ms": round(median["forward_loss"], 3),
            "backward_ms": round(median["backward"], 3),
            "optimizer_ms": round(median["optimizer"], 3),
            "steps_timed": len(rows),
            "warmup_steps": warmup_steps,
            "from_run": None if from_run is None else str(from_run),
            "batch_size": config.train.batch_size,
            "hidden_size": config.model.hidden_size,
            "num_negatives": k,
            "alpha": alpha,
            "probe_queries": h.shape[0],
            "device": str(dev),
            "threads": torch.get_num_threads(),
            **extra,
        }
        if refresher is not None:
            record["search_ms"] = round(median["search"], 3)
            record.update(_staleness(model, refresher, prepared, config, probe_queries, seed, dev))
            refresher.close()
        if name == "exact":
            record["max_seconds"] = max_seconds
        logger.info("%s", record)
        records.append(record)
        by_name[name] = record
    if "uniform" in by_name:
        base = by_name["uniform"]["step_ms"]
        for record in records:
            record["ratio_to_uniform"] = round(record["step_ms"] / base, 4)
    return records


def _profile(step: Callable[[int], Any], steps: int) -> list[dict]:
    """The 12 operators with the most self CPU time over ``steps`` calls of ``step(i)``, per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    logger.info(
        "ann step profile:\n%s",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
    )
    return [
        {
            "op": event.key,
            "self_ms_per_step": round(event.self_cpu_time_total / 1000.0 / steps, 2),
            "calls_per_step": event.count / steps,
        }
        for event in averages[:12]
    ]


def _clone_state(state: Any) -> Any:
    """A deep copy of an optimiser state dict (tensors cloned, sparse ones included)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: _clone_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_clone_state(value) for value in state]
    return state


def _quality(
    name, sampler, h, items, exclusions, exact_p, shares, draws, exact_draws, negatives, seed, dev
) -> dict[str, Any]:
    """TV to exact GenNi, hardness and softmax gap of ``sampler`` on the probe queries."""
    generator = torch.Generator(device=dev).manual_seed(seed + 11)
    if isinstance(sampler, AnnSampler) and sampler.query == "sequence":
        # each probe is one sequence's last state, so both query modes see the same candidates
        sampler = copy.copy(sampler)
        sampler.query = "position"
    floor = None
    mass_error = None
    if isinstance(sampler, AnnSampler):
        q, mass_error = ann_marginal(sampler, h, items, exclusions, draws, generator)
        method = "closed_form" if not sampler.tail_samples else f"rao_blackwell_{draws}_tails"
    elif isinstance(sampler, PoolSampler):
        q, mass_error = pool_marginal(sampler, h, items, exclusions, draws, generator)
        method = f"rao_blackwell_{draws}_pools"
    elif isinstance(sampler, DNSSampler):
        q = dns_probabilities(shares, exclusions, sampler.candidates)
        method = "closed_form"
    elif isinstance(sampler, ExactSampler):  # its own draws, beside as many from exact_p
        q = _draw_frequencies(sampler, h, items, exclusions, exact_draws, generator)
        floor = tv_floor(exact_p, exact_draws, generator)
        method = f"empirical_{exact_draws}"
    else:  # uniform, popularity
        q = sampler.probabilities(h, items, exclusions).double()
        method = "closed_form"
    tv = total_variation(q, exact_p)
    gap = None
    if sampler.exact_log_q:
        gap = softmax_gap(sampler, h, items, exclusions, negatives, 20, generator)
    out = {
        "tv_to_exact": round(tv, 4),
        "tv_method": method,
        "tv_floor": None if floor is None else round(floor, 4),
        "hardness": round(float((q * shares).sum(1).mean()), 4),
        "softmax_gap": None if gap is None else round(gap, 4),
    }
    if mass_error is not None:
        out["marginal_mass_error"] = float(f"{mass_error:.3g}")
    return out


def _draw_frequencies(sampler, h, items, exclusions, total: int, generator) -> torch.Tensor:
    """(Q, N+1) float64 frequencies of ``total`` draws per query, 100 per call."""
    counts = torch.zeros(h.shape[0], items.shape[0], dtype=torch.float64, device=h.device)
    per_call = 100
    for _ in range(math.ceil(total / per_call)):
        ids = sampler.sample(h, items, exclusions, per_call, generator).ids
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    return counts / counts.sum(1, keepdim=True)


def _staleness(model, refresher, prepared, config, probe_queries, seed, dev) -> dict[str, Any]:
    """Recall of the index after the timed steps (stale), and after one re_add (timed)."""
    h, items, _ = _probe(model, prepared, config, probe_queries, seed, dev)
    K = config.sampler.candidates
    _, I_exact = exact_topk(h, items[1:].contiguous(), K)
    stale = recall_at_k(refresher.current().search(h, K)[1], I_exact + 1)
    index = refresher.current()
    _sync(dev)
    t0 = time.perf_counter()
    index.re_add(items[1:].contiguous(), step=1)
    _sync(dev)
    seconds = time.perf_counter() - t0
    fresh = recall_at_k(index.search(h, K)[1], I_exact + 1)
    return {
        "index_recall_stale": round(stale, 4),
        "index_recall_after_re_add": round(fresh, 4),
        "refresh_seconds": round(seconds, 3),
        "refresh_ms_per_step": round(1000.0 * seconds / config.sampler.index.refresh_every, 3),
    }


def step_table(records: list[dict]) -> str:
    """Markdown table of :func:`bench_step` records."""
    lines = [
        "| sampler | catalog | steps | step ms | sampler ms (share) | × uniform | TV to exact "
        "(method) | hardness | softmax gap | index recall |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in records:
        method = r["tv_method"] + (f", floor {r['tv_floor']:.4f}" if r.get("tv_floor") else "")
        ratio = "–" if r["ratio_to_uniform"] is None else f"{r['ratio_to_uniform']:.3f}"
        gap = "–" if r.get("softmax_gap") is None else f"{r['softmax_gap']:.4f}"
        recall = "–" if "index_recall" not in r else f"{r['index_recall']:.3f}"
        name = r["sampler"] + (f" (M={r['pool_size']})" if "pool_size" in r else "")
        lines.append(
            f"| {name} | {r['catalog_size']} | {r['steps_timed']} | {r['step_ms']:.1f} "
            f"| {r['sampler_ms']:.1f} ({100 * r['sampler_share']:.0f}%) | {ratio} "
            f"| {r['tv_to_exact']:.4f} ({method}) | {r['hardness']:.3f} | {gap} | {recall} |"
        )
    return "\n".join(lines) + "\n"
