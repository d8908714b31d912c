"""annsample.bench.refresh: build / re_add / retrain cost and recall, and its ``bench refresh`` command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from annsample.bench.refresh import format_table, run_benchmark
from annsample.cli.main import main


def test_bench_refresh_runs_end_to_end(tmp_path):
    report = run_benchmark(
        [3000], dim=8, nlist=8, repeats=1, nprobes=(1, 8), k=10, n_queries=20, show_progress=False
    )
    (record,) = report["results"]
    assert record["recall@10"]["8"]["recall"] == 1.0  # nprobe == nlist is exact
    assert record["recall@10"]["1"]["recall"] <= 1.0
    assert record["assign_gflop"] == pytest.approx(2 * 3000 * 8 * 8 / 1e9)
    assert "| 3,000 |" in format_table(report)
    out = tmp_path / "bench.json"
    args = "bench refresh --n 2000 --dim 8 --nlist 8 --repeats 1 --nprobe 8 --k 5 --queries 10"
    result = CliRunner().invoke(main, [*args.split(), "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| 2,000 |" in result.output and "sgemm" in result.output
    assert json.loads(out.read_text())["results"][0]["n"] == 2000
