"""annsample.bench.samplers: records of every sampler on a tiny trained run, sampler-only
overrides, and the sampled-softmax gap."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DATA
from conftest import TINY_PATH as TINY

from annsample.bench.samplers import bench_samplers
from annsample.config import load_config
from annsample.errors import ConfigError
from annsample.train import train

FAST = ("train.epochs=1", "train.num_threads=1", TINY_DATA)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    overrides = (
        *FAST,
        "sampler.index.nlist=16",
        "sampler.index.nprobe=16",
        "sampler.candidates=3354",  # the whole tiny catalog
        "sampler.epsilon=0.0",
        "sampler.tail_samples=0",
    )
    # a uniform run whose saved config carries the ann settings the bench builds its ann from
    train(load_config(TINY, overrides, check_ignored=False), out)
    return out


def test_bench_samplers_records(tiny_run):
    records = bench_samplers(
        tiny_run, queries=16, tv_queries=4, draws=2000, repeats=1, show_progress=False
    )
    by_name = {r["sampler"]: r for r in records}
    assert set(by_name) == {"uniform", "popularity", "dns", "pool", "exact", "ann"}
    for record in records:
        assert record["catalog_size"] == 3354
        assert record["ms_per_256_queries"] > 0
        assert 0.0 <= record["tv_to_exact"] <= 1.0
        assert 0.0 <= record["hardness"] <= 1.0
    assert by_name["exact"]["tv_to_exact"] < 1e-6 and by_name["exact"]["tv_method"] == "closed_form"
    # every item is a candidate and the index probes every list: ann is exact GenNi
    assert by_name["ann"]["tv_to_exact"] < 1e-4
    assert by_name["pool"]["tv_method"] == "empirical_2000"
    # sampled-softmax gap: 0 for q = the model's softmax (exact at α = 1, and ann here, which is
    # exact); not defined where log q is conditional on shared candidates
    assert by_name["exact"]["alpha"] == 1.0
    assert abs(by_name["exact"]["softmax_gap"]) < 1e-4 and abs(by_name["ann"]["softmax_gap"]) < 1e-4
    assert isinstance(by_name["uniform"]["softmax_gap"], float)  # near 0: a 1-epoch model is flat
    assert by_name["pool"]["softmax_gap"] is None and by_name["dns"]["softmax_gap"] is None
    # model-aware negatives are harder than uniform ones
    assert by_name["exact"]["hardness"] > by_name["uniform"]["hardness"]


def test_bench_samplers_overrides_change_the_sampler_not_the_model(tiny_run):
    (record,) = bench_samplers(
        tiny_run,
        samplers=("ann",),
        queries=8,
        tv_queries=2,
        draws=200,
        repeats=1,
        show_progress=False,
        overrides=("sampler.candidates=50", "sampler.tail_samples=32"),
    )
    assert (record["candidates"], record["tail_samples"]) == (50, 32)
    assert record["tv_to_exact"] > 1e-3  # 50 of 3,354 items: no longer exact GenNi
    with pytest.raises(ConfigError, match="only changes sampler settings"):
        bench_samplers(tiny_run, samplers=("ann",), overrides=("model.hidden_size=8",))


def test_softmax_gap_vanishes_for_the_model_softmax_and_grows_with_a_poorer_proposal():
    from annsample.bench.samplers import softmax_gap
    from annsample.samplers import ExactSampler, Exclusions, UniformSampler

    g = torch.Generator().manual_seed(0)
    items = 3.0 * torch.randn(201, 8, generator=g)  # peaked logits: proposals differ a lot
    items[0] = 0.0
    queries = torch.randn(16, 8, generator=g)
    seen = torch.stack([torch.randperm(200, generator=g)[:6] + 1 for _ in range(16)])
    positives, history = seen[:, 0], seen[:, 1:].sort(dim=1).values  # 5 distinct history items
    ex = Exclusions(history, torch.arange(16), positives, 200)

    def gap(sampler, k, repeats=20):
        return softmax_gap(
            sampler, queries, items, ex, k, repeats, torch.Generator().manual_seed(1)
        )

    # q = softmax(h·e) over the allowed items: every corrected term is the partition function
    assert abs(gap(ExactSampler(alpha=1.0), 8, repeats=3)) < 1e-5
    uniform, flatter = gap(UniformSampler(), 32), gap(ExactSampler(alpha=0.5), 32)
    assert uniform < flatter < -1e-3  # Jensen: the sampled loss underrates the partition function
    assert gap(UniformSampler(), 512) > uniform  # more negatives, smaller gap


def test_total_variation_is_hand_computed_and_the_draw_floor_shrinks_with_draws():
    from annsample.bench.samplers import total_variation, tv_floor, tv_of_counts

    p = torch.tensor([[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert total_variation(q, p) == pytest.approx(0.25)  # rows 0.5 and 0
    assert tv_of_counts(torch.tensor([[0.0, 3.0, 1.0]]), p[:1]) == pytest.approx(0.25)
    exact_p = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), 1)
    few = tv_floor(exact_p.double(), 100, torch.Generator().manual_seed(1))
    many = tv_floor(exact_p.double(), 100_000, torch.Generator().manual_seed(1))
    assert 0.0 < many < few < 1.0
