"""Sampler-quality benchmark on a trained run: speed, distance to exact GenNi, hardness.

For probe queries (the last hidden state of validation users, with their history and validation
target excluded) each sampler is timed, compared with the exact GenNi distribution
p(j|h) ∝ exp(α·h·e_j) by total-variation distance, scored by the hardness of its negatives
(the mean percentile of a sampled negative among the allowed items under the current model), and,
where its log q is exact, by how far the logQ-corrected sampled softmax it would train sits from
the full softmax it estimates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from annsample import data as data_mod
from annsample.errors import ConfigError
from annsample.index import resolve_nlist_nprobe
from annsample.losses import sampled_softmax_loss
from annsample.samplers import (
    AnnSampler,
    DNSSampler,
    Exclusions,
    genni_log_probs,
)
from annsample.staleness import allowed_percentiles

logger = logging.getLogger(__name__)

# the samplers this bench runs by default, in table order (every config.SAMPLER_NAMES but
# exact_gumbel, which exact stands for, and the in-batch ones, config.BATCH_SAMPLER_NAMES, which
# need a training batch's positives)
BENCH_SAMPLERS = ("uniform", "popularity", "dns", "pool", "exact", "ann")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def _empirical_tv(sampler, queries, items, exclusions, exact_p, draws: int, generator) -> float:
    """TV between exact_p (Q, N+1) and the frequencies of ``draws`` samples per query.

    Draws come from many independent calls, so samplers with shared per-call randomness (the pool)
    are measured on their marginal distribution, not on one pool.
    """
    Q = queries.shape[0]
    per_call = 100
    counts = torch.zeros(Q, exact_p.shape[1], dtype=torch.float64)
    if isinstance(sampler, DNSSampler):  # per-position candidates: replicate rows, one draw each
        reps = per_call
        rows = torch.arange(Q).repeat_interleave(reps)
        rep_ex = Exclusions(
            exclusions.history, exclusions.row[rows], exclusions.positives[rows], exclusions.n_items
        )
        for _ in range(draws // reps):
            ids = sampler.sample(queries[rows], items, rep_ex, 1, generator).ids.view(Q, reps)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    else:
        for _ in range(draws // per_call):
            ids = sampler.sample(queries, items, exclusions, per_call, generator).ids
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    return tv_of_counts(counts, exact_p)


def total_variation(q: torch.Tensor, p: torch.Tensor) -> float:
    """Mean over rows of the total-variation distance between distributions q and p (Q, N+1)."""
    return float(0.5 * (q - p).abs().sum(1).mean())


def tv_of_counts(counts: torch.Tensor, exact_p: torch.Tensor) -> float:
    """Mean over rows of the total-variation distance between draw counts (Q, N+1) and
    ``exact_p`` (Q, N+1)."""
    return total_variation(counts / counts.sum(1, keepdim=True), exact_p)


def tv_floor(exact_p: torch.Tensor, draws: int, generator: torch.Generator) -> float:
    """The TV that ``draws`` draws per row from ``exact_p`` (Q, N+1) itself score: the noise floor
    of an empirical TV measured with as many draws."""
    ideal = torch.multinomial(exact_p.float(), draws, replacement=True, generator=generator)
    counts = torch.zeros_like(exact_p).scatter_add_(
        1, ideal, torch.ones_like(ideal, dtype=exact_p.dtype)
    )
    return tv_of_counts(counts, exact_p)


def softmax_gap(
    sampler, queries, items, exclusions, k: int, repeats: int, generator: torch.Generator
) -> float:
    """Sampled-softmax loss (k negatives from ``sampler``, logQ-corrected) minus the exact softmax
    loss over the allowed items and the positive, averaged over queries and ``repeats`` draws.

    The positive of each query is ``exclusions.positives``. The sampled loss estimates the
    partition function without bias, so by Jensen the gap is ≤ 0 in expectation: the more the
    proposal departs from softmax(h·e), the more the sampled objective underrates the negatives.
    It is 0 exactly when q = softmax(h·e) over the allowed items (exact GenNi at α = 1), since then
    every corrected term equals the partition function.
    """
    logits = (queries @ items.T).double()  # (Q, N+1)
    rows = torch.arange(queries.shape[0])
    positives = exclusions.positives
    mask = exclusions.dense_mask()
    mask[rows, positives] = False
    pos_logits = logits[rows, positives]
    full = torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=1) - pos_logits
    sampled = []
    for _ in range(repeats):
        negatives = sampler.sample(queries, items, exclusions, k, generator)
        neg_logits = logits.gather(1, negatives.ids)
        sampled.append(
            float(sampled_softmax_loss(pos_logits, neg_logits, negatives.log_q.double()))
        )
    return float(np.mean(sampled)) - float(full.mean())


def bench_samplers(
    run_dir: str | Path,
    samplers: tuple[str, ...] = BENCH_SAMPLERS,
    queries: int = 256,
    tv_queries: int = 32,
    draws: int = 100_000,
    repeats: int = 5,
    seed: int = 0,
    show_progress: bool = True,
    softmax_negatives: int = 128,
    overrides: tuple[str, ...] = (),
) -> list[dict]:
    """One record per sampler: ``sampler``, ``catalog_size``, ``ms_per_256_queries``, ``tv_to_exact``,
    ``tv_method`` ("closed_form" or "empirical_<draws>"), ``hardness``, ``softmax_gap`` (nats, see
    :func:`softmax_gap`, with ``softmax_negatives`` negatives over 50 draws on the TV probe queries;
    None for samplers whose log q is only conditional on shared candidates), plus its settings.

    ``overrides`` (``sampler.KEY=VALUE``) change the samplers' settings, not the trained model.
    """
    from annsample.prepare import prepare_data
    from annsample.refresh import make_index_refresher
    from annsample.run import load_model, load_run
    from annsample.samplers import build_sampler

    for text in overrides:
        if not text.strip().startswith("sampler."):
            raise ConfigError(
                f"--set {text!r}: bench samplers only changes sampler settings; use a "
                "sampler.KEY=VALUE override, e.g. --set sampler.candidates=1000"
            )
    config, checkpoint = load_run(run_dir, overrides)
    device = torch.device("cpu")
    prepared = prepare_data(config)
    model = load_model(config, checkpoint, prepared.n_items, device)
    split = prepared.split
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(split.n_users, size=min(queries, split.n_users), replace=False))
    inputs, targets = data_mod.eval_tensors(split, "valid", config.data.max_len)
    indptr, hist_items = data_mod.history_csr(split, "valid")
    with torch.no_grad():
        h = model.encode(torch.as_tensor(inputs[users]))[:, -1].contiguous()  # (Q, d)
        items = model.item_embeddings.detach().clone()  # (N+1, d)
    history = torch.as_tensor(data_mod.pad_rows(indptr, hist_items, users, split.n_items + 1))
    positives = torch.as_tensor(targets[users])
    exclusions = Exclusions(history, torch.arange(len(users)), positives, split.n_items)
    alpha = config.sampler.alpha
    probe = torch.arange(min(tv_queries, len(users)))
    probe_ex = Exclusions(history[probe], probe, positives[probe], split.n_items)
    exact_p = genni_log_probs(h[probe], items, probe_ex, alpha).exp()

    ic = config.sampler.index
    resolved_index = resolve_nlist_nprobe(ic.nlist, ic.nprobe, split.n_items)
    records = []
    for name in tqdm(samplers, desc="samplers", disable=not show_progress):
        # each sampler as training would build it from this run's config (ann: a fresh index)
        sampler_settings = replace(config.sampler, name=name, query="position")
        if name == "dns":  # a per-position candidate set; 1000 (the pool default) is not DNS
            sampler_settings = replace(
                sampler_settings, pool_size=min(config.sampler.pool_size, 100)
            )
        sampler_config = replace(config, sampler=sampler_settings)
        index = None
        if name == "ann":  # the index training would build, from the trained table
            index = make_index_refresher(config, items.shape[1], split.n_items)
            index.build(items[1:].contiguous(), ids=torch.arange(1, split.n_items + 1))
        sampler = build_sampler(sampler_config.sampler, prepared.popularity, index)
        settings = {
            "ann": {
                "nlist": resolved_index[0],
                "nprobe": resolved_index[1],
                "candidates": config.sampler.candidates,
                "epsilon": config.sampler.epsilon,
                "tail_samples": config.sampler.tail_samples,
            },
            "pool": {"pool_size": config.sampler.pool_size},
            "dns": {"candidates": sampler_settings.pool_size},
            "popularity": {"beta": config.sampler.beta},
        }.get(name, {})
        generator = torch.Generator().manual_seed(seed)
        ms = _median_ms(
            lambda s=sampler, g=generator: s.sample(h, items, exclusions, 1, g), repeats
        )
        ms_per_256 = ms * 256.0 / len(users)
        floor = None
        if isinstance(sampler, AnnSampler) and sampler.tail_samples:
            # the draws follow the proposal given the shared tail draw; TV is of its marginal
            # over tail draws (Monte-Carlo over the draws, so a small floor remains)
            tail_draws = max(64, draws // 100)
            q = sampler.marginal_probabilities(
                h[probe], items, probe_ex, h[probe], draws=tail_draws
            ).double()
            tv = total_variation(q, exact_p)
            method = f"closed_form_mean_of_{tail_draws}_tail_draws"
        elif hasattr(sampler, "probabilities"):
            q = sampler.probabilities(h[probe], items, probe_ex).double()
            tv = total_variation(q, exact_p)
            method = "closed_form"
        else:
            tv = _empirical_tv(sampler, h[probe], items, probe_ex, exact_p, draws, generator)
            method = f"empirical_{draws}"
            # what the same number of exact GenNi draws scores: the measurement's noise floor
            floor = tv_floor(exact_p, draws, generator)
        ids = sampler.sample(h[probe], items, probe_ex, 64, generator).ids
        gap = None
        if sampler.exact_log_q:
            gap = softmax_gap(sampler, h[probe], items, probe_ex, softmax_negatives, 50, generator)
        record = {
            "sampler": name,
            "catalog_size": split.n_items,
            "ms_per_256_queries": round(ms_per_256, 3),
            "tv_to_exact": round(tv, 4),
            "tv_method": method,
            "tv_floor": None if floor is None else round(floor, 4),
            "hardness": round(
                float(allowed_percentiles(h[probe], items, probe_ex).gather(1, ids).mean()), 4
            ),
            "softmax_gap": None if gap is None else round(gap, 4),
            "softmax_negatives": softmax_negatives,
            "alpha": alpha,
            "queries": len(users),
            "threads": torch.get_num_threads(),
            **settings,
        }
        logger.info("%s", record)
        records.append(record)
    return records


def records_table(records: list[dict]) -> str:
    """Markdown table of benchmark records."""
    lines = [
        "| sampler | catalog | ms / 256 queries | TV to exact GenNi | TV method (noise floor) "
        "| hardness | softmax gap (nats) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in records:
        method = r["tv_method"]
        if r.get("tv_floor") is not None:
            method += f" ({r['tv_floor']:.4f})"
        gap = "–" if r.get("softmax_gap") is None else f"{r['softmax_gap']:.4f}"
        lines.append(
            f"| {r['sampler']} | {r['catalog_size']} | {r['ms_per_256_queries']:.2f} "
            f"| {r['tv_to_exact']:.4f} | {method} | {r['hardness']:.3f} | {gap} |"
        )
    return "\n".join(lines) + "\n"
