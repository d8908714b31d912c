"""bench step: the marginal distributions it compares with exact GenNi, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO

from annsample.bench.step import ann_marginal, bench_step, dns_probabilities, pool_marginal
from annsample.cli.main import main
from annsample.errors import ConfigError
from annsample.samplers import AnnSampler, DNSSampler, Exclusions, PoolSampler, genni_log_probs
from annsample.staleness import allowed_percentiles

N, D, Q = 600, 8, 3


class StaleIndex:
    """Exact top-k over a perturbed copy of the table: candidates that miss some of the mass."""

    def __init__(self, xb: torch.Tensor) -> None:
        self.xb = xb

    def search(self, xq: torch.Tensor, k: int):
        D_, I_ = (xq @ self.xb.T).topk(k, dim=1)
        return D_, I_ + 1


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    items = 1.5 * torch.randn(N + 1, D, generator=g)
    items[0] = 0
    queries = torch.randn(Q, D, generator=g)
    history = torch.tensor([[3, 8, 40, N + 1], [1, 2, 5, 9], [N + 1] * 4])
    exclusions = Exclusions(history, torch.arange(Q), torch.tensor([7, 11, 13]), N)
    stale = items[1:] + 0.8 * torch.randn(N, D, generator=g)
    return queries, items, exclusions, StaleIndex(stale)


def frequencies(sampler, queries, items, exclusions, calls: int, k: int, seed: int) -> torch.Tensor:
    """(Q, N+1) frequencies of calls * k draws per query, each call with fresh shared randomness."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(queries.shape[0], N + 1, dtype=torch.float64)
    for _ in range(calls):
        ids = sampler.sample(queries, items, exclusions, k, g, sequence_queries=queries).ids
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    return counts / counts.sum(1, keepdim=True)


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(0.5 * (a - b).abs().sum(1).mean())


def noise_floor(probs: torch.Tensor, n: int) -> float:
    """TV of n ideal draws from ``probs`` to ``probs``: what sampling noise alone scores."""
    g = torch.Generator().manual_seed(2)
    ids = torch.multinomial(probs.float(), n, replacement=True, generator=g)
    counts = torch.zeros_like(probs).scatter_add_(1, ids, torch.ones_like(ids, dtype=probs.dtype))
    return tv(counts / n, probs)


def assert_is_the_marginal(sampler, probe, q: torch.Tensor) -> None:
    """Two independent runs of draws sit as close to ``q`` as to each other, and farther from
    exact GenNi (so the comparison can fail).

    Draws within a call share the pool or tail, so their noise exceeds multinomial noise; the
    distance between two runs measures it (√2 times a run's distance to the truth, unbiased).
    """
    queries, items, exclusions, _ = probe
    first = frequencies(sampler, queries, items, exclusions, 300, 100, seed=1)
    second = frequencies(sampler, queries, items, exclusions, 300, 100, seed=2)
    between = tv(first, second)
    assert tv(first, q) < between and tv(second, q) < between, (tv(first, q), between)
    exact = genni_log_probs(queries, items, exclusions, 1.0).exp()
    assert tv(first, exact) > 1.5 * between


def test_ann_marginal_matches_the_sampler_draws(problem):
    queries, items, exclusions, index = problem
    sampler = AnnSampler(index, candidates=12, epsilon=0.05, tail_samples=8, query="sequence")
    q, mass_error = ann_marginal(sampler, queries, items, exclusions, 400, torch.Generator())
    assert q.shape == (Q, N + 1)
    assert torch.allclose(q.sum(1), torch.ones(Q, dtype=torch.float64))
    assert float(q[exclusions.dense_mask()].abs().max()) == 0.0
    assert mass_error < 0.05
    assert_is_the_marginal(sampler, problem, q)
    # the proposal of one tail draw is not the marginal the sampler draws from
    one_draw = sampler.probabilities(queries, items, exclusions, sequence_queries=queries)
    assert tv(one_draw.double(), q) > 0.1


def test_ann_marginal_without_tail_is_the_closed_form(problem):
    queries, items, exclusions, index = problem
    sampler = AnnSampler(index, candidates=12, epsilon=0.1, query="sequence")
    q, mass_error = ann_marginal(sampler, queries, items, exclusions, 4, torch.Generator())
    expected = sampler.probabilities(queries, items, exclusions, sequence_queries=queries)
    assert mass_error == 0.0
    assert torch.allclose(q, expected.double(), atol=1e-6)


def test_pool_marginal_matches_the_sampler_draws(problem):
    queries, items, exclusions, _ = problem
    sampler = PoolSampler(pool_size=20)
    q, mass_error = pool_marginal(sampler, queries, items, exclusions, 400, torch.Generator())
    assert mass_error < 0.05
    assert float(q[exclusions.dense_mask()].abs().max()) == 0.0
    assert_is_the_marginal(sampler, problem, q)


def test_dns_probabilities_match_the_sampler_draws(problem):
    queries, items, exclusions, _ = problem
    sampler = DNSSampler(candidates=5)
    shares = allowed_percentiles(queries, items, exclusions)
    q = dns_probabilities(shares, exclusions, sampler.candidates)
    assert torch.allclose(q.sum(1), torch.ones(Q, dtype=torch.float64))
    # one draw per position: replicate each query 100 times per call
    reps = 100
    rows = torch.arange(Q).repeat_interleave(reps)
    replicated = Exclusions(exclusions.history, exclusions.row[rows], exclusions.positives[rows], N)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(Q, N + 1, dtype=torch.float64)
    for _ in range(200):
        ids = sampler.sample(queries[rows], items, replicated, 1, g).ids.view(Q, reps)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    assert tv(counts / counts.sum(1, keepdim=True), q) < noise_floor(q, 20_000) + 0.01


ARGS = [
    "bench",
    "step",
    "--catalog-size",
    "10k",
    "--steps",
    "2",
    "--warmup-steps",
    "5",
    "--device",
    "cpu",
    "--probe-queries",
    "6",
    "--set",
    "train.num_threads=1",
    "--set",
    "train.batch_size=64",
    "--set",
    "sampler.index.nlist=64",
    "--set",
    "sampler.tail_samples=64",
    "--set",
    "sampler.query=sequence",
    "--profile",
]


def test_bench_step_command_writes_one_record_per_sampler(tmp_path):
    out = tmp_path / "step.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        result = CliRunner().invoke(main, [*ARGS, "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    names = [r["sampler"] for r in records]
    assert names == ["uniform", "popularity", "dns", "ann", "pool", "pool@ann_cost", "exact"]
    assert "| ann |" in result.stdout
    for r in records:
        for key in ("sampler", "catalog_size", "step_ms", "sampler_ms", "ratio_to_uniform"):
            assert r[key] is not None, (r["sampler"], key)
        assert r["catalog_size"] == 10_000
        assert 0 < r["sampler_ms"] <= r["step_ms"]
        assert r["sampler_share"] == pytest.approx(r["sampler_ms"] / r["step_ms"], abs=1e-3)
        assert 0.0 <= r["tv_to_exact"] <= 1.0
        assert 0.0 <= r["hardness"] <= 1.0
        assert r["steps_timed"] == 2
    by_name = {r["sampler"]: r for r in records}
    assert by_name["uniform"]["ratio_to_uniform"] == 1.0
    exact = by_name["exact"]
    # exact GenNi's own draws sit at the noise floor of as many ideal draws
    assert exact["tv_to_exact"] <= 1.2 * exact["tv_floor"] + 0.01
    assert exact["hardness"] == pytest.approx(exact["exact_hardness"], abs=0.02)
    assert exact["softmax_gap"] == pytest.approx(0.0, abs=1e-3)
    # dns keeps the best of 100 uniform candidates: harder than anything GenNi draws
    assert by_name["dns"]["hardness"] > by_name["uniform"]["hardness"]
    ann = by_name["ann"]
    assert 0.0 <= ann["index_recall"] <= 1.0 and 0.0 <= ann["index_recall_stale"] <= 1.0
    assert ann["search_ms"] <= ann["sampler_ms"]
    assert (ann["nlist"], ann["tail_samples"], ann["query"]) == (64, 64, "sequence")
    assert by_name["pool@ann_cost"]["pool_size"] >= 1
    assert ann["profile"] and all(op["self_ms_per_step"] >= 0 for op in ann["profile"])


def test_bench_step_refuses_settings_it_owns():
    with pytest.raises(ConfigError, match="--sampler NAME"):
        bench_step(10_000, ("uniform",), overrides=("sampler.name=ann",))
    with pytest.raises(ConfigError, match="unknown sampler"):
        bench_step(10_000, ("uniformm",))


@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory):
    """A 10k-item `train --catalog-size` run of a few steps, with bench step's batch settings."""
    from annsample import train as train_mod
    from annsample.config import catalog_overrides, load_config

    out = tmp_path_factory.mktemp("catalog") / "run"
    overrides = (
        "train.num_threads=1", "train.batch_size=64", "train.epochs=1",
        "train.max_steps_per_epoch=5", "train.max_seconds=0", "train.eval_users=50",
        "train.valid_users=50",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        train_mod.train(load_config(None, overrides, preset=catalog_overrides(10_000)), out)
    return out


def test_bench_step_from_a_trained_run_starts_from_its_best_checkpoint(catalog_run, tmp_path):
    from annsample.run import load_run

    probe = tmp_path / "probe.pt"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        records = bench_step(
            10_000, ("uniform", "ann"), steps=2, device="cpu", probe_queries=4,
            overrides=("train.num_threads=1", "train.batch_size=64", "sampler.index.nlist=64",
                       "sampler.tail_samples=64"),
            show_progress=False, save_probe=probe, from_run=catalog_run,
        )  # fmt: skip
    assert [r["sampler"] for r in records] == ["uniform", "ann"]
    assert all(r["warmup_steps"] == 0 and r["from_run"] == str(catalog_run) for r in records)
    _, best = load_run(catalog_run)
    trained = torch.load(best, weights_only=True)["item_embedding.weight"]
    # the probe is written before any timed step: the trained table, not a fresh one
    assert torch.equal(torch.load(probe, weights_only=True)["item_embeddings"], trained)


def test_bench_step_refuses_a_run_of_another_model_or_warm_up_steps(catalog_run):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        with pytest.raises(ConfigError, match=r"model\.hidden_size"):
            bench_step(
                10_000, ("uniform",), steps=1, device="cpu", show_progress=False,
                overrides=("model.hidden_size=32",), from_run=catalog_run,
            )  # fmt: skip
        with pytest.raises(ConfigError, match="drop --warmup-steps"):
            bench_step(
                10_000, ("uniform",), steps=1, warmup_steps=5, device="cpu",
                show_progress=False, from_run=catalog_run,
            )  # fmt: skip
