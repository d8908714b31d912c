"""Samplers draw from their stated distributions, never draw exclusions, and report exact log q."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    SAMPLING_DIM,
    SAMPLING_ITEMS,
    assert_draws_follow,
    draw_counts,
    sampling_problem,
)

from annsample.errors import SamplerError
from annsample.samplers import (
    AnnSampler,
    BatchPositives,
    DNSSampler,
    ExactSampler,
    Exclusions,
    InBatchSampler,
    MixedSampler,
    PoolSampler,
    PopularitySampler,
    TronSampler,
    UniformSampler,
    genni_log_probs,
    make_sampler,
    sample_from_logits,
)

N, D = SAMPLING_ITEMS, SAMPLING_DIM


class BruteForceIndex:
    """Exact top-k over a fixed snapshot: the reference the ANN sampler is compared with."""

    def __init__(self, xb: torch.Tensor, ids: torch.Tensor) -> None:
        self.xb, self.ids = xb, ids

    def search(self, xq: torch.Tensor, k: int):
        scores = xq @ self.xb.T
        k_eff = min(k, self.xb.shape[0])
        D_, I_ = scores.topk(k_eff, dim=1)
        ids = self.ids[I_]
        if k_eff < k:  # under-filled: pad like FAISS
            pad = k - k_eff
            D_ = torch.cat([D_, torch.full((xq.shape[0], pad), float("-inf"))], 1)
            ids = torch.cat([ids, torch.full((xq.shape[0], pad), -1)], 1)
        return D_, ids


@pytest.fixture
def problem():
    return sampling_problem()


def dense_allowed(exclusions: Exclusions) -> torch.Tensor:
    """Reference exclusion mask built with Python sets."""
    allowed = torch.ones(exclusions.row.shape[0], N + 1, dtype=torch.bool)
    allowed[:, 0] = False
    for p in range(exclusions.row.shape[0]):
        for item in exclusions.history[exclusions.row[p]].tolist():
            if item <= N:
                allowed[p, item] = False
        allowed[p, exclusions.positives[p]] = False
    return allowed


def empirical(ids: torch.Tensor) -> torch.Tensor:
    """(P, N+1) frequencies of ids (P, n)."""
    return draw_counts(ids) / ids.shape[1]


def test_exclusions_match_reference(problem):
    _, _, ex = problem
    allowed = dense_allowed(ex)
    ids = torch.arange(-1, N + 3)[None].expand(6, -1)
    expected = torch.ones_like(ids, dtype=torch.bool)
    expected[:, 1 : N + 2] = ~allowed
    assert torch.equal(ex.contains(ids), expected)
    assert torch.equal(~ex.dense_mask(), allowed)
    assert torch.equal(ex.n_allowed, allowed.sum(1))


def test_rank_to_item_enumerates_allowed_items_in_order(problem):
    _, _, ex = problem
    allowed = dense_allowed(ex)
    width = int(ex.n_allowed.max())
    ranks = torch.arange(width)[None].expand(6, -1).clone()
    ranks = torch.minimum(ranks, ex.n_allowed[:, None] - 1)
    items = ex.rank_to_item(ranks)
    for p in range(6):
        expected = allowed[p].nonzero()[:, 0]
        assert torch.equal(items[p, : len(expected)], expected)


def test_uniform_matches_distribution_and_log_q(problem):
    queries, items, ex = problem
    sampler = UniformSampler()
    out = sampler.sample(queries, items, ex, 20000, torch.Generator().manual_seed(1))
    probs = sampler.probabilities(queries, items, ex)
    assert torch.allclose(probs.sum(1), torch.ones(6))
    assert_draws_follow(out.ids, probs)
    assert torch.allclose(out.log_q, probs.gather(1, out.ids).log())


def test_popularity_matches_distribution_and_log_q(problem):
    queries, items, ex = problem
    counts = np.arange(N + 1) ** 2
    sampler = PopularitySampler(counts, beta=0.75)
    out = sampler.sample(queries, items, ex, 20000, torch.Generator().manual_seed(2))
    probs = sampler.probabilities(queries, items, ex)
    assert_draws_follow(out.ids, probs)
    assert torch.allclose(out.log_q, probs.gather(1, out.ids).log(), atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(6))


def test_popularity_fallback_when_history_holds_the_mass():
    # item 30 holds almost all the mass and is in the history: rejection alone would loop forever
    counts = np.ones(N + 1)
    counts[30] = 1e9
    history = torch.tensor([[30, 31]])
    ex = Exclusions(history, torch.tensor([0, 0]), torch.tensor([1, 2]), N)
    sampler = PopularitySampler(counts, beta=1.0, max_rounds=2)
    out = sampler.sample(None, None, ex, 500, torch.Generator().manual_seed(0))
    assert not bool(ex.contains(out.ids).any())
    assert torch.allclose(
        out.log_q, sampler.probabilities(None, None, ex).gather(1, out.ids).log(), atol=1e-5
    )


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7 * 6])  # one chunk; chunks of 7 items
def test_exact_matches_genni_softmax(problem, chunk_elements):
    queries, items, ex = problem
    sampler = ExactSampler(alpha=1.5, chunk_elements=chunk_elements)
    out = sampler.sample(queries, items, ex, 1, torch.Generator().manual_seed(3))
    log_p = genni_log_probs(queries, items, ex, 1.5)
    assert torch.allclose(out.log_q.double(), log_p.gather(1, out.ids), atol=1e-5)
    draws = torch.cat(
        [
            sampler.sample(queries, items, ex, 1000, torch.Generator().manual_seed(s)).ids
            for s in range(20)
        ],
        1,
    )
    assert_draws_follow(draws, log_p.exp())


def test_sample_from_logits_never_draws_masked_slots():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")], [float("-inf")] * 3 + [2.0]])
    slots, log_p = sample_from_logits(logits, 5000, torch.Generator().manual_seed(0))
    assert set(slots[0].tolist()) == {0, 2}
    assert set(slots[1].tolist()) == {3}
    assert torch.allclose(log_p[1], torch.zeros(5000))


def test_ann_with_every_item_as_candidate_equals_exact(problem):
    queries, items, ex = problem
    index = BruteForceIndex(items[1:], torch.arange(1, N + 1))
    ann = AnnSampler(index, alpha=1.5, candidates=N, epsilon=0.0)
    probs = ann.probabilities(queries, items, ex)
    exact = genni_log_probs(queries, items, ex, 1.5).exp()
    assert torch.allclose(probs.double(), exact, atol=1e-6)
    out = ann.sample(queries, items, ex, 20000, torch.Generator().manual_seed(4))
    assert_draws_follow(out.ids, exact)
    assert torch.allclose(out.log_q.double(), exact.gather(1, out.ids).log(), atol=1e-5)


def test_ann_faiss_ivf_full_probe_equals_exact(problem):
    from annsample.index import ItemIndex

    queries, items, ex = problem
    index = ItemIndex(D, nlist=4, nprobe=4, backend="faiss").build(
        items[1:].contiguous(), torch.arange(1, N + 1)
    )
    ann = AnnSampler(index, alpha=1.0, candidates=N, epsilon=0.0)
    exact = genni_log_probs(queries, items, ex, 1.0).exp()
    assert torch.allclose(ann.probabilities(queries, items, ex).double(), exact, atol=1e-6)


@pytest.mark.parametrize("query", ["position", "sequence"])
def test_ann_mixture_is_a_distribution_with_exact_log_q(problem, query):
    queries, items, ex = problem
    # a stale index: candidates come from old embeddings, scores from the current ones
    stale = items[1:] + 0.5 * torch.randn(N, D, generator=torch.Generator().manual_seed(9))
    index = BruteForceIndex(stale, torch.arange(1, N + 1))
    ann = AnnSampler(index, alpha=2.0, candidates=6, epsilon=0.1, query=query)
    seq_q = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    probs = ann.probabilities(queries, items, ex, sequence_queries=seq_q)
    assert torch.allclose(probs.sum(1), torch.ones(6), atol=1e-6)
    allowed = dense_allowed(ex)
    assert bool((probs[allowed] > 0).all()), "ε mass must keep every allowed item reachable"
    assert float(probs[~allowed].abs().max()) == 0.0
    out = ann.sample(
        queries, items, ex, 20000, torch.Generator().manual_seed(6), sequence_queries=seq_q
    )
    assert_draws_follow(out.ids, probs)
    assert torch.allclose(out.log_q, probs.gather(1, out.ids).log(), atol=1e-5)


def test_ann_rows_without_usable_candidates_fall_back_to_uniform(problem):
    queries, items, ex = problem
    # the index only knows items that every row excludes or -1 padding
    index = BruteForceIndex(items[[1, 30]], torch.tensor([1, 30]))
    ann = AnnSampler(index, alpha=1.0, candidates=4, epsilon=0.0)
    probs = ann.probabilities(queries, items, ex)
    uniform = UniformSampler().probabilities(queries, items, ex)
    rows = torch.tensor([2, 3, 4])  # positions whose history holds both 1 and 30
    assert torch.allclose(probs[rows], uniform[rows])
    out = ann.sample(queries, items, ex, 200, torch.Generator().manual_seed(0))
    assert not bool(ex.contains(out.ids).any())


def test_pool_draws_softmax_over_pool_and_never_exclusions(problem):
    queries, items, ex = problem
    sampler = PoolSampler(alpha=1.0, pool_size=N * 20)  # the pool then covers the catalog
    out = sampler.sample(queries, items, ex, 4000, torch.Generator().manual_seed(7))
    assert not bool(ex.contains(out.ids).any())
    assert bool((out.log_q <= 0).all())
    exact = genni_log_probs(queries, items, ex, 1.0).exp()
    tv = 0.5 * (empirical(out.ids) - exact.float()).abs().sum(1)
    assert float(tv.max()) < 0.15  # a big pool approaches exact GenNi


def test_dns_picks_the_best_candidate(problem):
    queries, items, ex = problem
    sampler = DNSSampler(
        candidates=400
    )  # misses the best allowed item with prob (1-1/26)^400 ≈ 1e-7
    out = sampler.sample(queries, items, ex, 1, torch.Generator().manual_seed(8))
    scores = (queries @ items.T).masked_fill(ex.dense_mask(), float("-inf"))
    assert torch.equal(out.ids[:, 0], scores.argmax(1))


SAMPLERS = {
    "uniform": lambda: UniformSampler(),
    "popularity": lambda: PopularitySampler(np.arange(N + 1)),
    "exact": lambda: ExactSampler(alpha=1.0),
    "pool": lambda: PoolSampler(alpha=1.0, pool_size=10),
    "dns": lambda: DNSSampler(candidates=80),
    "in_batch": lambda: InBatchSampler(),
    "mixed": lambda: MixedSampler(in_batch_negatives=16),
    "tron": lambda: TronSampler(in_batch_negatives=40, uniform_candidates=60),
}


@pytest.mark.parametrize("name", [*SAMPLERS, "ann"])
def test_same_seed_same_samples_and_no_exclusions(problem, name):
    queries, items, ex = problem
    make = SAMPLERS.get(name) or (
        lambda: AnnSampler(
            BruteForceIndex(items[1:], torch.arange(1, N + 1)), candidates=5, epsilon=0.2
        )
    )
    a = make().sample(queries, items, ex, 64, torch.Generator().manual_seed(11))
    b = make().sample(queries, items, ex, 64, torch.Generator().manual_seed(11))
    c = make().sample(queries, items, ex, 64, torch.Generator().manual_seed(12))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.log_q, b.log_q)
    assert not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (6, 64) and a.log_q.shape == (6, 64)
    assert not bool(ex.contains(a.ids).any())


@pytest.mark.parametrize("name", [*SAMPLERS, "ann"])
def test_user_who_has_seen_everything_is_a_clear_error(problem, name):
    queries, items, _ = problem
    history = torch.arange(1, N + 1)[None]
    ex = Exclusions(history, torch.tensor([0]), torch.tensor([3]), N)
    make = SAMPLERS.get(name) or (
        lambda: AnnSampler(BruteForceIndex(items[1:], torch.arange(1, N + 1)))
    )
    with pytest.raises(SamplerError, match="interacted with all 30 items"):
        make().sample(queries[:1], items, ex, 1, torch.Generator().manual_seed(0))


def test_one_allowed_item_left_is_always_drawn():
    history = torch.tensor([[i for i in range(1, N + 1) if i != 17]])
    ex = Exclusions(history, torch.tensor([0]), torch.tensor([2]), N)
    out = UniformSampler().sample(None, None, ex, 50, torch.Generator().manual_seed(0))
    assert set(out.ids.flatten().tolist()) == {17}
    assert torch.allclose(out.log_q, torch.zeros(1, 50))


@pytest.mark.parametrize("query", ["position", "sequence"])
def test_ann_tail_draws_follow_the_conditional_proposal(problem, query):
    queries, items, ex = problem
    index = BruteForceIndex(items[1:], torch.arange(1, N + 1))
    ann = AnnSampler(index, alpha=1.0, candidates=4, epsilon=0.01, query=query, tail_samples=16)
    seq_q = queries[[0, 2, 5]]
    out = ann.sample(
        queries, items, ex, 20000, torch.Generator().manual_seed(3), sequence_queries=seq_q
    )
    probs = ann.probabilities(queries, items, ex, seq_q, torch.Generator().manual_seed(3))
    assert torch.allclose(probs.sum(1), torch.ones(6), atol=1e-6)
    assert_draws_follow(out.ids, probs)


def test_ann_tail_log_q_gives_an_unbiased_partition_estimate(problem):
    """Σ exp(α·s_j) / q_j over draws estimates the allowed partition function without bias
    (over tail draws too): what makes the logQ-corrected sampled softmax track full softmax."""
    queries, items, ex = problem
    index = BruteForceIndex(items[1:], torch.arange(1, N + 1))
    ann = AnnSampler(index, alpha=1.0, candidates=4, epsilon=0.0, tail_samples=8)
    logits = (queries @ items.T).double()
    z = torch.logsumexp(logits.masked_fill(ex.dense_mask(), float("-inf")), dim=1).exp()
    generator = torch.Generator().manual_seed(5)
    estimates = []
    for _ in range(3000):
        out = ann.sample(queries, items, ex, 4, generator)
        estimates.append((logits.gather(1, out.ids) - out.log_q.double()).exp().mean(1))
    estimates = torch.stack(estimates)  # (calls, P)
    error = (estimates.mean(0) - z).abs() / (estimates.std(0) / len(estimates) ** 0.5)
    assert float(error.max()) < 4.0  # within 4 standard errors for every position
    # the conditional q (given one tail draw) would count each tail item once: biased low
    probs = ann.probabilities(queries, items, ex, generator=torch.Generator().manual_seed(6))
    out = ann.sample(queries, items, ex, 4, torch.Generator().manual_seed(6))
    assert not torch.allclose(out.log_q.double(), probs.double().gather(1, out.ids).log())


def test_ann_tail_keeps_the_sampled_softmax_close_to_full_softmax():
    from annsample.bench.samplers import softmax_gap

    n, d = 2000, 16
    g = torch.Generator().manual_seed(0)
    items = torch.randn(n + 1, d, generator=g)
    items[0] = 0.0
    queries = torch.randn(32, d, generator=g)
    seen = torch.stack([torch.randperm(n, generator=g)[:6] + 1 for _ in range(32)])
    ex = Exclusions(seen[:, 1:].sort(dim=1).values, torch.arange(32), seen[:, 0], n)
    index = BruteForceIndex(items[1:], torch.arange(1, n + 1))

    def gap(tail_samples):
        ann = AnnSampler(index, candidates=20, epsilon=0.01, tail_samples=tail_samples)
        return softmax_gap(ann, queries, items, ex, 128, 10, torch.Generator().manual_seed(1))

    # 20 candidates of 2,000 items: without the tail the sampled softmax misses much of the mass
    assert gap(200) > -0.02 > -0.05 > gap(0)


def test_ann_tail_estimate_tracks_where_the_mass_is(problem):
    queries, items, ex = problem
    index = BruteForceIndex(items[1:], torch.arange(1, N + 1))
    exact = genni_log_probs(queries, items, ex, 1.0).exp()

    def tv(sampler):
        q = sampler.probabilities(queries, items, ex, generator=torch.Generator().manual_seed(0))
        return float(0.5 * (q.double() - exact).abs().sum(1).mean())

    fixed = AnnSampler(index, alpha=1.0, candidates=4, epsilon=0.01)
    tail = AnnSampler(index, alpha=1.0, candidates=4, epsilon=0.01, tail_samples=200)
    # 4 candidates hold only part of a fairly flat distribution: estimating the tail mass helps
    assert tv(tail) < tv(fixed)
    # when the candidates are the whole catalog, nothing is left for the tail: ε stays at its floor
    everything = AnnSampler(index, alpha=1.0, candidates=N, epsilon=0.0, tail_samples=64)
    assert tv(everything) < 1e-6


def test_ann_tail_marginal_approaches_exact_genni(problem):
    queries, items, ex = problem
    index = BruteForceIndex(items[1:], torch.arange(1, N + 1))
    exact = genni_log_probs(queries, items, ex, 1.0).exp()
    ann = AnnSampler(index, alpha=1.0, candidates=4, epsilon=0.0, tail_samples=20)
    marginal = ann.marginal_probabilities(queries, items, ex, draws=200).double()
    assert torch.allclose(marginal.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-5)
    fixed = AnnSampler(index, alpha=1.0, candidates=4, epsilon=0.05).probabilities(
        queries, items, ex
    )
    tv_tail = float(0.5 * (marginal - exact).abs().sum(1).mean())
    tv_fixed = float(0.5 * (fixed.double() - exact).abs().sum(1).mean())
    assert tv_tail < 0.1 < tv_fixed


@pytest.mark.parametrize("permute", [False, True])
def test_ann_sequence_logits_match_the_per_position_path(problem, permute):
    queries, items, exclusions = problem
    if permute:  # positions need not come grouped by sequence
        order = torch.tensor([4, 0, 5, 2, 1, 3])
        queries = queries[order]
        exclusions = Exclusions(
            exclusions.history[:, :5], exclusions.row[order], exclusions.positives[order], N
        )
    index = BruteForceIndex(items[1:], torch.arange(1, N + 1))
    sampler = AnnSampler(index, candidates=10, alpha=1.5, query="sequence")
    sequence_queries = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    logits, candidates = sampler.candidate_logits(queries, items, exclusions, sequence_queries)
    reference_ids = sampler.candidate_ids(queries, exclusions, sequence_queries)
    blocked = (reference_ids < 1) | exclusions.contains(reference_ids.clamp(min=0))
    reference = sampler.rescore(queries, items, reference_ids).masked_fill(blocked, float("-inf"))
    assert torch.equal(candidates, reference_ids)
    assert torch.equal(torch.isinf(logits), torch.isinf(reference)) and bool(blocked.any())
    finite = torch.isfinite(reference)
    assert torch.allclose(logits[finite], reference[finite], atol=1e-5)


class RepeatingIndex(BruteForceIndex):
    """Returns each of its top k // 2 ids twice: an index whose candidates repeat an id."""

    def search(self, xq: torch.Tensor, k: int):
        D_, ids = super().search(xq, k // 2)
        return torch.cat([D_, D_], 1), torch.cat([ids, ids], 1)


@pytest.mark.parametrize("tail", [0, 16])
@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_ann_sequence_draws_report_the_proposal_log_q(problem, tail, epsilon):
    """The sequence path draws from _proposal's slots and reports log q = log[(1-ε)·exp(α·s_j) / W
    + ε / n_allowed] (with a tail; without one, the exact mixture) for every drawn id."""
    queries, items, ex = problem
    index = BruteForceIndex(items[1:], torch.arange(1, N + 1))
    ann = AnnSampler(
        index, alpha=1.5, candidates=4, epsilon=epsilon, query="sequence", tail_samples=tail
    )
    seq_q = queries[[0, 2, 5]]
    out = ann.sample(queries, items, ex, 4000, torch.Generator().manual_seed(3), seq_q)
    probs = ann.probabilities(queries, items, ex, seq_q, torch.Generator().manual_seed(3))
    assert_draws_follow(out.ids, probs)
    assert not bool(ex.contains(out.ids).any())
    if not tail:
        reference = probs.double().gather(1, out.ids).log()
    else:
        logits, _, _ = ann._proposal(queries, items, ex, seq_q, torch.Generator().manual_seed(3))
        log_w = torch.logsumexp(logits.double(), dim=1, keepdim=True)
        p = (1.5 * (queries @ items.T).double().gather(1, out.ids) - log_w).exp()
        reference = ((1 - epsilon) * p + epsilon / ex.n_allowed.double()[:, None]).log()
    assert torch.allclose(out.log_q.double(), reference, atol=1e-5)


def test_ann_sequence_candidates_with_a_repeated_id_add_up_its_slots(problem):
    queries, items, ex = problem
    ann = AnnSampler(
        RepeatingIndex(items[1:], torch.arange(1, N + 1)), candidates=8, epsilon=0.1,
        query="sequence",
    )  # fmt: skip
    seq_q = queries[[0, 2, 5]]
    out = ann.sample(queries, items, ex, 4000, torch.Generator().manual_seed(2), seq_q)
    probs = ann.probabilities(queries, items, ex, seq_q)
    assert_draws_follow(out.ids, probs)
    assert torch.allclose(out.log_q.double(), probs.double().gather(1, out.ids).log(), atol=1e-5)


@pytest.mark.parametrize("spread", [0.0, 0.02])
def test_default_ann_sampler_is_close_to_exact_genni_on_a_flat_model(spread):
    # Early in training every score is about equal, so GenNi is about uniform. The default ann
    # settings (tail on, nlist / nprobe from the catalog rule) must track it; the former defaults
    # (no tail, epsilon 0.05) put 95% of the mass on 200 of the items (TV 0.89 in issue 11). The marginal is a mean over
    # 200 tail draws, whose Monte-Carlo error alone is a TV of about 0.04.
    from annsample.config import config_from_dict
    from annsample.index import ItemIndex, resolve_nlist_nprobe

    n, d = 1000, 16
    g = torch.Generator().manual_seed(0)
    items = spread * torch.randn(n + 1, d, generator=g)
    items[0] = 0
    queries = spread * torch.randn(8, d, generator=g)
    exclusions = Exclusions.from_positives(torch.arange(1, 9), n)
    exact = genni_log_probs(queries, items, exclusions, 1.0).exp()
    s = config_from_dict({"sampler": {"name": "ann"}}).sampler
    nlist, nprobe = resolve_nlist_nprobe(s.index.nlist, s.index.nprobe, n)
    index = ItemIndex(d, nlist=nlist, nprobe=nprobe, backend="faiss", metric=s.index.metric)
    index.build(items[1:].contiguous(), ids=torch.arange(1, n + 1))

    def tv(**settings) -> float:
        sampler = AnnSampler(index, **settings)
        q = sampler.marginal_probabilities(queries, items, exclusions, draws=200).double()
        return float(0.5 * (q - exact).abs().sum(1).mean())

    default = tv(
        alpha=s.alpha, candidates=s.candidates, epsilon=s.epsilon, tail_samples=s.tail_samples
    )
    former = tv(alpha=1.0, candidates=200, epsilon=0.05, tail_samples=0)
    assert default < 0.1, default
    assert former > 0.5, former  # the measurement can tell the two apart


def test_exclusions_normalise_unsorted_repeated_and_zero_history_ids():
    # the same sets as `problem`'s history, shuffled, repeated, with 0 / negative / > N padding
    messy = torch.tensor([[7, 0, 5, 2, 5, 2], [9, 30, 4, 1, 3, -2], [0, 0, 31, 40, 0, 0]])
    clean = torch.tensor([[2, 5, 7, 31, 31], [1, 3, 4, 9, 30], [31, 31, 31, 31, 31]])
    row = torch.tensor([0, 0, 1, 1, 1, 2])
    positives = torch.tensor([5, 11, 9, 12, 3, 6])
    a, b = Exclusions(messy, row, positives, N), Exclusions(clean, row, positives, N)
    assert torch.equal(a.dense_mask(), b.dense_mask())
    assert torch.equal(a.n_allowed, b.n_allowed)
    rank = torch.arange(int(a.n_allowed.min()))[None, :].expand(6, -1)
    assert torch.equal(a.rank_to_item(rank), b.rank_to_item(rank))
    ids = UniformSampler().sample(None, None, a, 500, torch.Generator().manual_seed(0)).ids
    assert not bool(a.dense_mask().gather(1, ids).any())  # no excluded item is ever drawn


@pytest.mark.parametrize(
    ("history", "row", "positives", "message"),
    [
        (torch.tensor([[1, 2]]), torch.tensor([0]), torch.tensor([0]), "positives hold 0..0"),
        (torch.tensor([[1, 2]]), torch.tensor([0]), torch.tensor([N + 1]), "run from 1 to"),
        (torch.tensor([[1, 2]]), torch.tensor([1]), torch.tensor([3]), "history has 1 rows"),
        (torch.tensor([[1.0, 2.0]]), torch.tensor([0]), torch.tensor([3]), "history must be"),
        (torch.tensor([[1, 2]]), torch.tensor([0, 0]), torch.tensor([3]), "one entry per position"),
    ],
)
def test_exclusions_reject_malformed_input(history, row, positives, message):
    with pytest.raises(SamplerError, match=message):
        Exclusions(history, row, positives, N)


def test_ann_accepts_default_item_ids_and_refuses_an_index_of_row_numbers(problem):
    from annsample.index import ItemIndex

    queries, items, exclusions = problem
    table = items[1:].contiguous()
    rows = ItemIndex(D, nlist=2, nprobe=2, backend="faiss").build(table, ids=torch.arange(N))
    with pytest.raises(SamplerError, match=r"ids=torch.arange\(1, N \+ 1\)"):
        AnnSampler(rows, candidates=N)
    # the default ids are the item ids the samplers expect: no ids needed for the table[1:] case
    default = ItemIndex(D, nlist=2, nprobe=2, backend="faiss").build(table)
    assert torch.equal(default.ids, torch.arange(1, N + 1))
    negatives = AnnSampler(default, candidates=N).sample(
        queries, items, exclusions, 1, torch.Generator().manual_seed(0)
    )
    assert int(negatives.ids.min()) >= 1 and int(negatives.ids.max()) <= N
    # an index the sampler cannot inspect is caught at the first search that returns id 0
    wrapped = BruteForceIndex(items[1:], torch.arange(N))
    with pytest.raises(SamplerError, match="returns item id 0, which is padding"):
        AnnSampler(wrapped, candidates=N).sample(
            queries, items, exclusions, 1, torch.Generator().manual_seed(0)
        )


# --------------------------------------------------------------------------- in-batch negatives


def batch_problem() -> tuple[torch.Tensor, torch.Tensor, Exclusions]:
    """The sampling problem's queries and items, with ten positions of four sequences whose
    positives repeat (item 5 three times, 11 twice), as a batch's do."""
    queries, items, _ = sampling_problem()
    queries = torch.cat([queries, queries[:4] + 0.5])  # (10, d)
    history = torch.tensor([[2, 5, 7, 31], [1, 3, 4, 9], [31, 31, 31, 31], [11, 20, 31, 31]])
    row = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    positives = torch.tensor([5, 11, 9, 12, 3, 5, 6, 5, 11, 20])
    return queries, items, Exclusions(history, row, positives, N)


def test_batch_positives_count_allowed_slots_by_hand():
    _, _, ex = batch_problem()
    pool = BatchPositives(ex)
    assert pool.counts(torch.tensor([5, 11, 20, 1])).tolist() == [3, 2, 1, 0]
    # position 0 (history 2, 5, 7; positive 5) may not use the three slots of item 5: 7 left;
    # position 3 (history 1, 3, 4, 9; positive 12) loses 9, 3 and its own 12: 7 left;
    # position 8 (history 11, 20; positive 11) loses 11 twice and 20: 7 left
    assert pool.allowed_slots[[0, 3, 8]].tolist() == [7, 7, 7]
    # position 6 (no history, positive 6) loses only its own slot
    assert int(pool.allowed_slots[6]) == 9
    probs = InBatchSampler().probabilities(None, None, ex)
    assert probs[0, 11].item() == pytest.approx(2 / 7) and probs[0, 5].item() == 0.0


@pytest.mark.parametrize(
    "sampler",
    [InBatchSampler(), InBatchSampler(max_rounds=0, chunk_elements=20_000)],
    ids=["rejection", "exact-rows-in-chunks"],
)
def test_in_batch_matches_distribution_and_log_q(sampler):
    queries, items, ex = batch_problem()
    out = sampler.sample(queries, items, ex, 20000, torch.Generator().manual_seed(1))
    probs = sampler.probabilities(queries, items, ex)
    assert torch.allclose(probs.sum(1), torch.ones(10))
    assert not bool(ex.contains(out.ids).any())
    assert set(out.ids.flatten().tolist()) <= set(ex.positives.tolist())
    assert_draws_follow(out.ids, probs)
    assert torch.allclose(out.log_q, probs.gather(1, out.ids).log())


def test_in_batch_without_an_allowed_slot_draws_uniformly():
    # one sequence whose positives are all in its history: no slot is allowed for any position
    ex = Exclusions(torch.tensor([[1, 2, 3]]), torch.tensor([0, 0, 0]), torch.tensor([1, 2, 3]), N)
    out = InBatchSampler().sample(None, None, ex, 5000, torch.Generator().manual_seed(2))
    assert not bool(ex.contains(out.ids).any())
    assert torch.allclose(out.log_q, torch.full((3, 5000), -math.log(N - 3)))
    assert_draws_follow(out.ids, UniformSampler().probabilities(None, None, ex))


def partition_estimates(sampler, queries, items, ex, k, calls):
    """(calls, P) float64 draws of (1/k)·Σ_j exp(s_j)/q_j, and the scores (P, N+1)."""
    logits = (queries @ items.T).double()
    generator = torch.Generator().manual_seed(5)
    estimates = []
    for _ in range(calls):
        out = sampler.sample(queries, items, ex, k, generator)
        estimates.append((logits.gather(1, out.ids) - out.log_q.double()).exp().mean(1))
    return torch.stack(estimates), logits


def assert_unbiased(estimates: torch.Tensor, expected: torch.Tensor) -> None:
    error = (estimates.mean(0) - expected).abs() / (estimates.std(0) / len(estimates) ** 0.5)
    assert float(error.max()) < 4.0, error  # within 4 standard errors at every position


def test_in_batch_log_q_is_conditional_on_the_batch():
    """With in-batch q the partition estimate is unbiased for the batch's allowed items only."""
    queries, items, ex = batch_problem()
    estimates, logits = partition_estimates(InBatchSampler(), queries, items, ex, 4, 2000)
    in_batch = torch.zeros(N + 1, dtype=torch.bool)
    in_batch[ex.positives] = True
    allowed = ~ex.dense_mask() & in_batch
    assert_unbiased(estimates, logits.masked_fill(~allowed, float("-inf")).logsumexp(1).exp())


def test_mixed_matches_the_mixture_proposal():
    queries, items, ex = batch_problem()
    sampler = MixedSampler(in_batch_negatives=6000)
    out = sampler.sample(queries, items, ex, 20000, torch.Generator().manual_seed(3))
    assert not bool(ex.contains(out.ids).any())
    probs = sampler.probabilities(queries, items, ex, 20000)
    assert torch.allclose(probs.sum(1), torch.ones(10))
    # a slot picked at random among the k is drawn from the mixture (the slots are stratified:
    # 6,000 in-batch and 14,000 uniform, which only lowers the chi-square statistic)
    assert_draws_follow(out.ids, probs)
    assert torch.allclose(out.log_q, probs.gather(1, out.ids).log(), atol=1e-6)
    # the first 6,000 come from the batch's positives
    assert set(out.ids[:, :6000].flatten().tolist()) <= set(ex.positives.tolist())


def test_mixed_log_q_gives_an_unbiased_partition_estimate():
    """k₁ in-batch plus k₂ uniform draws with the mixture q: Σ exp(s_j)/(k q_j) is unbiased for the
    whole allowed catalog's partition function (what the logQ-corrected sampled softmax needs)."""
    queries, items, ex = batch_problem()
    estimates, logits = partition_estimates(MixedSampler(2), queries, items, ex, 4, 2000)
    assert_unbiased(
        estimates, logits.masked_fill(ex.dense_mask(), float("-inf")).logsumexp(1).exp()
    )


def test_mixed_needs_more_negatives_than_its_in_batch_share():
    queries, items, ex = batch_problem()
    with pytest.raises(SamplerError, match="k must exceed 4, got k=4"):
        MixedSampler(4).sample(queries, items, ex, 4, torch.Generator().manual_seed(0))
    with pytest.raises(SamplerError, match="in_batch_negatives >= 1"):
        MixedSampler(0)


def test_tron_keeps_the_best_scoring_allowed_items():
    queries, items, ex = batch_problem()
    # 3,000 uniform draws from 30 items miss one with probability 30·(29/30)^3000 ≈ 1e-43
    sampler = TronSampler(in_batch_negatives=8, uniform_candidates=3000)
    out = sampler.sample(queries, items, ex, 5, torch.Generator().manual_seed(4))
    scores = (queries @ items.T).masked_fill(ex.dense_mask(), float("-inf"))
    best = scores.topk(5, dim=1).indices
    assert torch.equal(out.ids.sort(1).values, best.sort(1).values)
    assert torch.equal(out.log_q, torch.zeros(10, 5))  # a top-k choice has no proposal q


def test_tron_with_in_batch_candidates_only_picks_among_the_batch():
    queries, items, ex = batch_problem()
    sampler = TronSampler(in_batch_negatives=50, uniform_candidates=0)
    out = sampler.sample(queries, items, ex, 2, torch.Generator().manual_seed(5))
    candidates, _ = sampler.candidates(ex, torch.Generator().manual_seed(5))  # the same draw
    for p in range(10):
        row = sorted(set(candidates[p].tolist()), key=lambda j: -float(queries[p] @ items[j]))
        assert out.ids[p].tolist() == row[:2], p


def test_tron_drops_repeats_and_fills_short_rows_uniformly():
    queries, items, ex = batch_problem()
    out = TronSampler(in_batch_negatives=30, uniform_candidates=400).sample(
        queries, items, ex, 12, torch.Generator().manual_seed(6)
    )
    assert all(len(set(row)) == 12 for row in out.ids.tolist())  # distinct candidates
    # 3 distinct in-batch items at most and 2 uniform draws: fewer than k = 8 candidates
    short = TronSampler(in_batch_negatives=3, uniform_candidates=5).sample(
        queries, items, ex, 8, torch.Generator().manual_seed(7)
    )
    assert not bool(ex.contains(short.ids).any())
    # 40 uniform draws from 30 items hold fewer than 35 distinct ones: the rest are uniform fills
    padded = TronSampler(in_batch_negatives=0, uniform_candidates=40).sample(
        queries, items, ex, 35, torch.Generator().manual_seed(9)
    )
    assert padded.ids.shape == (10, 35) and not bool(ex.contains(padded.ids).any())
    with pytest.raises(SamplerError, match="k=9 best of in_batch_negatives"):
        TronSampler(3, 5).sample(queries, items, ex, 9, torch.Generator().manual_seed(7))


def test_tron_position_chunks_do_not_change_the_draw():
    queries, items, ex = batch_problem()
    draws = [
        TronSampler(10, 100, chunk_elements=chunk).sample(
            queries, items, ex, 6, torch.Generator().manual_seed(8)
        )
        for chunk in (1, 333, 1 << 24)
    ]
    assert all(torch.equal(draws[0].ids, d.ids) for d in draws[1:])


@pytest.mark.parametrize("name", ["in_batch", "mixed", "tron"])
def test_make_sampler_builds_the_in_batch_samplers(name):
    sampler = make_sampler(name, in_batch_negatives=3, uniform_candidates=7)
    assert sampler.name == name
    if name != "in_batch":
        assert sampler.in_batch_negatives == 3


def test_blend_draws_each_negative_from_the_first_sampler_with_its_share():
    from annsample.samplers import BlendSampler, PopularitySampler, UniformSampler

    n, P, k = 50, 400, 8
    counts = torch.zeros(n + 1)
    counts[1] = 1e9  # popularity puts (almost) all its mass on item 1
    first = PopularitySampler(counts, beta=1.0)
    second = UniformSampler()
    history = torch.zeros((P, 0), dtype=torch.int64)
    exclusions = Exclusions(history, torch.arange(P), torch.full((P,), n), n)
    items = torch.randn(n + 1, 4)
    queries = torch.randn(P, 4)
    for share in (0.0, 0.3, 1.0):
        blend = BlendSampler(first, second, share)
        drawn = blend.sample(queries, items, exclusions, k, torch.Generator().manual_seed(0))
        is_one = drawn.ids == 1
        # the uniform sampler draws item 1 too, with probability 1 / 49 per negative
        expected = share + (1 - share) / (n - 1)
        se = max((expected * (1 - expected) / is_one.numel()) ** 0.5, 1e-3)
        assert abs(is_one.float().mean().item() - expected) < 4 * se
        # each negative carries the log q of the sampler that drew it: uniform's for the others
        others = drawn.log_q[~is_one]
        assert torch.allclose(others, torch.full_like(others, -math.log(n - 1)))
    assert not blend.exact_log_q and blend.model_aware is False
    with pytest.raises(SamplerError, match="share must be in"):
        BlendSampler(first, second, 1.5)


def test_blend_calls_a_per_position_sampler_only_for_the_positions_it_serves(problem):
    from annsample.samplers import BlendSampler

    queries, items, ex = problem
    seen = []

    class Spy(UniformSampler):
        def sample(self, queries, item_embeddings, exclusions, k, generator, sequence_queries=None):
            seen.append(exclusions.positives.clone())
            return super().sample(queries, item_embeddings, exclusions, k, generator)

    g = torch.Generator().manual_seed(1)
    blend = BlendSampler(PopularitySampler(np.ones(N + 1)), Spy(), 0.5)
    coins = torch.rand((6, 1), generator=torch.Generator().manual_seed(1)) < 0.5
    out = blend.sample(queries, items, ex, 1, g)
    assert 0 < int(coins.sum()) < 6  # the seed gives both kinds of position
    assert torch.equal(seen[0], ex.positives[~coins[:, 0]])
    assert not bool(ex.contains(out.ids).any())
    # the in-batch samplers draw from the call's own positives: always called for all of them
    seen.clear()
    Spy.per_position = False
    blend.sample(queries, items, ex, 1, torch.Generator().manual_seed(1))
    assert torch.equal(seen[0], ex.positives)


def test_selected_exclusions_are_those_of_the_selected_positions(problem):
    _, _, ex = problem
    at = torch.tensor([4, 1, 5])
    part = ex.select(at)
    ids = torch.arange(N + 2)[None, :].expand(3, -1)
    assert torch.equal(part.contains(ids), ex.contains(torch.arange(N + 2)[None].expand(6, -1))[at])
    assert torch.equal(part.n_allowed, ex.n_allowed[at])
    rank = torch.stack([torch.arange(20)] * 3)
    full = ex.rank_to_item(torch.stack([torch.arange(20)] * 6))
    assert torch.equal(part.rank_to_item(rank), full[at])
    assert torch.equal(ex.rank_to_item(rank, at), full[at])


def test_history_hits_match_the_per_key_look_up():
    g = torch.Generator().manual_seed(4)
    n, R = 50, 7
    history = torch.randint(0, n + 3, (R, 9), generator=g)  # padding values on both sides
    ex = Exclusions(history, torch.arange(R), torch.randint(1, n + 1, (R,), generator=g), n)
    ids = torch.randint(-1, n + 1, (R, 12), generator=g).sort(dim=1).values  # -1 = missing
    hits = ex.history_hits(ex.row_keys(ids).view(-1)).view(R, 12)
    # repeated ids are marked once, so compare on each row's distinct ids only
    distinct = torch.cat([torch.ones(R, 1, dtype=torch.bool), ids[:, 1:] != ids[:, :-1]], 1)
    reference = ex._in_history(ids.clamp(min=0), torch.arange(R)) & (ids > 0)
    assert torch.equal(hits & distinct, reference & distinct) and bool(reference.any())


@pytest.mark.parametrize("k", [1, 3])
def test_two_level_slot_draws_follow_the_mass(k):
    from annsample.samplers import _DRAW_BLOCK, _draw_slots

    g = torch.Generator().manual_seed(6)
    width = 4 * _DRAW_BLOCK
    mass = torch.rand(5, width, generator=g) ** 4
    mass[:, ::3] = 0.0  # blocked slots
    mass[1, :] = 0.0
    mass[1, 2 * _DRAW_BLOCK + 7] = 1.0  # one slot with mass: always drawn
    mass[2, : 3 * _DRAW_BLOCK] = 0.0  # all mass in the last block
    mass[3, _DRAW_BLOCK:] = 0.0  # all mass in the first block
    slots, total = _draw_slots(mass, k * 6000, g)
    assert torch.allclose(total, mass.sum(1))
    assert bool((slots[1] == 2 * _DRAW_BLOCK + 7).all())
    rows = [0, 2, 3, 4]  # a one-slot row has no χ² to compute
    probs = mass[rows].double() / mass[rows].double().sum(1, keepdim=True)
    assert_draws_follow(slots[rows], probs)


def test_ann_sequence_draws_follow_the_proposal_over_several_blocks():
    """Candidates and tail fill several blocks of the two-level draw."""
    n, d = 300, 8
    g = torch.Generator().manual_seed(7)
    items = torch.randn(n + 1, d, generator=g)
    items[0] = 0
    queries = torch.randn(6, d, generator=g)
    history = torch.stack([torch.randperm(n, generator=g)[:40] + 1 for _ in range(3)])
    ex = Exclusions(
        history, torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([5, 11, 9, 12, 3, 6]), n
    )
    index = BruteForceIndex(items[1:], torch.arange(1, n + 1))
    ann = AnnSampler(
        index, alpha=0.7, candidates=50, epsilon=0.0, query="sequence", tail_samples=60
    )
    seq_q = queries[[0, 2, 5]]
    out = ann.sample(queries, items, ex, 6000, torch.Generator().manual_seed(3), seq_q)
    probs = ann.probabilities(queries, items, ex, seq_q, torch.Generator().manual_seed(3))
    assert_draws_follow(out.ids, probs)
    assert not bool(ex.contains(out.ids).any())
