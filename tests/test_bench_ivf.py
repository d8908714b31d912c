"""The IVF / exact-sampler benchmark runs end to end on a tiny catalog and measures what it says."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from annsample.bench import ivf as bench_ivf
from annsample.cli.main import main


def test_full_probe_has_recall_one_and_every_record_is_timed():
    records = bench_ivf.bench_size(
        3000, torch.device("cpu"), dim=8, nlist=12, nprobes=(1, 12), k=10,
        query_counts=(16,), repeats=1, samplers=True,
    )  # fmt: skip
    searches = [r for r in records if r["kind"] == "search"]
    backends = {r["backend"] for r in searches}
    assert {"exact", "torch_ivf/gather", "torch_ivf/lists"} <= backends
    for r in searches:
        assert r["search_ms"] > 0
        if r["nprobe"] in (None, 12):  # exact, or every list probed
            assert r["recall"] == 1.0, r
    one_list = [r["recall"] for r in searches if r["nprobe"] == 1]
    assert one_list and max(one_list) < 1.0  # probing one list of 12 misses neighbours
    samplers = {r["sampler"] for r in records if r["kind"] == "sample"}
    assert samplers == {
        "exact_gumbel/fp32", "exact_gumbel/tf32", "exact_gumbel/bf16", "exact/reservoir"
    }  # fmt: skip
    summary = bench_ivf.crossover(records)
    assert [(r["n"], r["queries"]) for r in summary] == [(3000, 16)]
    # nprobe = nlist reaches recall 1, so some IVF row qualifies; its speedup is exact / its ms.
    best = summary[0]
    assert best["ivf"] is not None and best["speedup"] == best["exact_ms"] / best["ivf_ms"]
    assert bench_ivf.crossover(records, min_recall=1.01)[0]["ivf"] is None
    table = bench_ivf.format_table(records)
    assert "| 3,000 | 16 | torch_ivf/lists | 12 |" in table


def test_the_command_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    args = "bench ivf --n 2000 --dim 8 --nlist 8 --nprobe 2 --k 5 --queries 8 --repeats 1"
    result = CliRunner().invoke(main, [*args.split(), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["machine"]["torch_threads"] == 1
    assert {r["kind"] for r in report["records"]} == {"search", "build"}
    assert "torch_ivf/lists" in result.output
