"""The synthetic catalog: determinism, its planted distribution, the exact oracle, the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from annsample import data as data_mod
from annsample.errors import ConfigError
from annsample.synthetic import (
    SyntheticCatalog,
    SyntheticParams,
    oracle_metrics,
    synthetic_catalog,
    synthetic_dataset,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNSAMPLE_CACHE", str(tmp_path / "cache"))


def test_same_seed_same_data_other_seed_other_data():
    a = synthetic_dataset(3000, n_users=500, seed=3)
    b = SyntheticCatalog(SyntheticParams(3000, n_users=500, seed=3)).sample_sequences(500, 3)
    c = synthetic_dataset(3000, n_users=500, seed=4)
    assert np.array_equal(a.indptr, b[0]) and np.array_equal(a.items, b[1])
    assert not np.array_equal(a.items[:100], c.items[:100])


def test_sequences_are_valid_and_never_repeat_an_item():
    ds = synthetic_dataset(2000, n_users=800, seed=1)
    assert ds.items.min() >= 1 and ds.items.max() <= 2000
    lengths = ds.lengths
    assert lengths.min() >= 3 and lengths.max() <= SyntheticParams(2000).max_length
    for u in range(ds.n_users):
        seq = ds.sequence(u)
        assert len(np.unique(seq)) == len(seq)


def test_popularity_is_skewed():
    ds = synthetic_dataset(20_000, seed=0)
    counts = np.sort(np.bincount(ds.items, minlength=20_001)[1:])[::-1]
    top_share = counts[: 20_000 // 100].sum() / counts.sum()
    assert top_share > 0.15  # the top 1% of items take far more than 1% of interactions


def test_next_item_draws_follow_next_prob():
    catalog = SyntheticCatalog(SyntheticParams(1000, cluster_size=50, seed=2))
    rng = np.random.default_rng(0)
    everything = np.arange(1, 1001)
    for previous in (1, 437, 1000):
        draws = catalog.sample_next(np.full(200_000, previous), rng)
        empirical = np.bincount(draws, minlength=1001)[1:] / len(draws)
        exact = catalog.next_prob(np.array([previous]), everything[None])[0]
        assert exact.sum() == pytest.approx(1.0)
        assert 0.5 * np.abs(empirical - exact).sum() < 0.03  # TV noise floor ~0.02 here


def test_oracle_ranks_match_dense_ranking():
    catalog, ds = synthetic_catalog(600, n_users=400, seed=5, cluster_size=40)
    split = data_mod.leave_one_out(ds)
    inputs, targets = data_mod.eval_tensors(split, "test", 50)
    indptr, items = data_mod.history_csr(split, "test")
    users = np.arange(split.n_users)
    history = data_mod.pad_rows(indptr, items, users, 0)
    ranks = catalog.oracle_ranks(inputs[:, -1], targets, history)
    everything = np.broadcast_to(np.arange(1, 601), (len(users), 600))
    dense = catalog.next_prob(inputs[:, -1], everything)  # (U, N)
    p_target = dense[users, targets - 1]
    for u in users:
        dense[u, history[u][history[u] > 0] - 1] = -np.inf
    dense[users, targets - 1] = -np.inf
    expected = (dense > p_target[:, None]).sum(axis=1)
    assert np.array_equal(ranks, expected)
    metrics, chunked = oracle_metrics(catalog, inputs, targets, indptr, items, chunk=64)
    assert np.array_equal(chunked, expected)
    assert 0.0 < metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0


def test_oracle_beats_popularity_ranking():
    catalog, ds = synthetic_catalog(5000, seed=0)
    split = data_mod.leave_one_out(ds)
    inputs, targets = data_mod.eval_tensors(split, "test", 50)
    indptr, items = data_mod.history_csr(split, "test")
    oracle, _ = oracle_metrics(catalog, inputs, targets, indptr, items)
    popular = np.argsort(-data_mod.item_popularity(split))[:10]  # ids ranked by count, no mask
    hr_popular = np.isin(targets, popular).mean()
    assert oracle["hr@10"] > 2 * hr_popular


def test_cache_is_reused_and_a_torn_file_regenerated(tmp_path):
    _, first = synthetic_catalog(2000, n_users=300, seed=9)
    files = list((tmp_path / "cache" / "synthetic").glob("2000-*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"torn")
    _, again = synthetic_catalog(2000, n_users=300, seed=9)
    assert np.array_equal(first.items, again.items)
    with np.load(files[0]) as saved:  # rewritten whole
        assert np.array_equal(saved["items"], first.items)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"stay": 0.8, "move": 0.3}, "stay \\+ move <= 1"),
        ({"n_users": -1}, "synthetic_users must be >= 0"),
        ({"colour": 1}, "valid knobs are SyntheticParams fields"),
    ],
)
def test_bad_parameters_are_refused(knobs, match):
    n_users = knobs.pop("n_users", 0)
    with pytest.raises(ConfigError, match=match):
        synthetic_catalog(1000, n_users=n_users, **knobs)


def test_training_on_a_synthetic_catalog_reports_the_oracle_within_the_budget(tmp_path):
    from annsample.config import load_config
    from annsample.train import train

    config = load_config(
        "configs/tiny.yaml",
        (
            "data.path=synthetic",
            "data.synthetic_items=3000",
            "data.synthetic_users=1500",
            "data.synthetic_seed=4",
            "data.max_len=20",
            "train.num_threads=1",
            "train.epochs=50",
            "train.patience=50",
            "train.max_seconds=2",
            "train.max_steps_per_epoch=5",
        ),
    )
    results = train(config, tmp_path / "run")
    assert results["epochs_run"] < 50  # the budget stopped it
    assert 0.0 < results["oracle"]["ndcg@10"] <= 1.0
    fraction = results["fraction_of_oracle"]["ndcg@10"]
    assert fraction == pytest.approx(results["test"]["ndcg@10"] / results["oracle"]["ndcg@10"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["oracle"] == results["oracle"]


def test_budget_must_be_finite_and_non_negative():
    from annsample.config import load_config

    with pytest.raises(ConfigError, match="train.max_seconds must be a finite number >= 0"):
        load_config(None, ("train.max_seconds=-1",))


def test_cli_refuses_a_catalog_too_large_before_generating_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from annsample.cli.main import main

    monkeypatch.setenv("ANNSAMPLE_MAX_MEMORY_GB", "6")
    result = CliRunner().invoke(
        main, ["train", "--catalog-size", "10M", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code != 0
    assert "needs about" in result.output and "6.0 GB are available" in result.output
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cache").exists()  # nothing was generated
