"""annsample.quality: the model-free transition-count reference, the table and the plot, and
``annsample quality`` that prints them."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from annsample import data as data_mod
from annsample.cli.main import main
from annsample.errors import RunError
from annsample.quality import (
    plot_curves,
    quality_table,
    read_run,
    sampler_label,
    transition_count_ranks,
)
from annsample.synthetic import synthetic_catalog


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNSAMPLE_CACHE", str(tmp_path / "cache"))


def test_transition_counts_match_a_dense_ranking():
    _, ds = synthetic_catalog(800, n_users=1500, seed=1, cluster_size=40)
    split = data_mod.leave_one_out(ds)
    n = split.n_items
    inputs, targets = data_mod.eval_tensors(split, "test", 20)
    indptr, items = data_mod.history_csr(split, "test")
    users = np.arange(300)
    history = data_mod.pad_rows(indptr, items, users, 0)
    ranks = transition_count_ranks(
        split.train_indptr, split.train_items, n, inputs[users, -1], targets[users], history
    )
    pairs = np.zeros((n + 1, n + 1))
    for u in range(split.n_users):
        seq = split.train_items[split.train_indptr[u] : split.train_indptr[u + 1]]
        np.add.at(pairs, (seq[:-1], seq[1:]), 1.0)
    popularity = np.bincount(split.train_items, minlength=n + 1).astype(float)
    for q, u in enumerate(users):
        score = pairs[inputs[u, -1]] * 1e6 + popularity
        score[0] = -np.inf
        target = targets[u]
        best = score[target]
        score[history[q][history[q] > 0]] = -np.inf
        score[target] = -np.inf
        assert ranks[q] == int((score > best).sum())
    assert (ranks < 10).mean() > 0.1  # the data is learnable from transitions alone


def test_table_and_plot_read_a_finished_run(tmp_path):
    from annsample.config import load_config
    from annsample.train import train

    config = load_config(
        "configs/tiny.yaml",
        (
            "data.path=synthetic",
            "data.synthetic_items=2000",
            "data.synthetic_users=800",
            "data.max_len=20",
            "train.num_threads=1",
            "train.epochs=2",
            "train.max_steps_per_epoch=3",
        ),
    )
    train(config, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert run["catalog_size"] == 2000 and len(run["curve"]) == 2
    table = quality_table([run])
    assert "| 2,000 | uniform bce |" in table and "oracle" in table
    with pytest.raises(RunError, match="not a finished run folder"):
        read_run(tmp_path)
    pytest.importorskip("matplotlib", reason="the plot needs the optional matplotlib (.[plot])")
    plot_curves([run], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_dataset_run_is_tabulated_and_plotted_without_an_oracle(tmp_path):
    from annsample.config import load_config
    from annsample.train import train

    settings = ("train.num_threads=1", "train.epochs=2", "train.max_steps_per_epoch=3")
    train(load_config("configs/tiny.yaml", settings), tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert run["catalog"] == "tiny" and run["oracle"] is None and len(run["curve"]) == 2
    table = quality_table([run])
    assert "| tiny | uniform bce |" in table and "| – (no oracle) |" in table
    assert "nan" not in table and "oracle (true" not in table
    pytest.importorskip("matplotlib", reason="the plot needs the optional matplotlib (.[plot])")
    plot_curves([run], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # the command prints the same table and writes the same plot
    result = CliRunner().invoke(
        main, ["quality", str(tmp_path / "run"), "--png", str(tmp_path / "cli.png")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == table + "\n"
    assert (tmp_path / "cli.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "name finished run folders, or --counts N_ITEMS TEST_USERS"),
        (["--counts", "100k", "0"], "0 is not in the range x>=1"),
        (["--counts", "lots", "10"], "catalog size 'lots' is not a number"),
        (["--png", "q.png"], "--png plots the runs named"),
        (["{tmp}"], "is not a finished run folder"),
        (["{tmp}", "--png", "{tmp}/none/q.png"], "does not exist; create it or write elsewhere"),
    ],
)
def test_command_errors_are_one_line(argv, message, tmp_path):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    result = CliRunner().invoke(main, ["quality", *argv])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


def test_a_run_label_names_the_candidates_and_the_warmup():
    ann = {"name": "ann", "candidates": 200, "pool_size": 1000, "warmup_steps": 0}
    assert sampler_label({"sampler": ann}) == " (200 candidates)"
    warm = {**ann, "warmup_steps": 500, "warmup_sampler": "popularity"}
    assert sampler_label({"sampler": warm}) == " (200 candidates), 500 popularity warm-up steps"
    # run folders written before warmup_sampler existed warmed up with uniform negatives
    old = {"name": "pool", "pool_size": 1000, "warmup_steps": 50}
    assert sampler_label({"sampler": old}) == " (pool 1000), 50 uniform warm-up steps"
    blend = {**warm, "warmup_blend_steps": 300}
    assert sampler_label({"sampler": blend}) == (
        " (200 candidates), 500 popularity warm-up steps, 300 steps blended from popularity"
    )
    kept = {**blend, "warmup_share": 0.5}
    assert sampler_label({"sampler": kept}).endswith(
        "300 steps blended from popularity, 0.5 of the negatives from popularity throughout"
    )
