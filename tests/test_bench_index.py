"""bench index: recall against the exact top-k, monotone in nprobe, exact when every list is probed."""

from __future__ import annotations

import pytest
import torch

from annsample.bench.index import index_sweep, load_probe, sweep_table
from annsample.errors import ConfigError


@pytest.fixture(scope="module")
def clustered():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(20, 16, generator=g)
    xb = centres[torch.randint(0, 20, (2000,), generator=g)] + torch.randn(2000, 16, generator=g)
    xq = centres[torch.randint(0, 20, (40,), generator=g)] + torch.randn(40, 16, generator=g)
    return xq, xb


def test_ivf_recall_grows_with_nprobe_and_is_exact_at_nlist(clustered):
    xq, xb = clustered
    records = index_sweep(
        xq, xb, 20, nlists=(32,), nprobes=(1, 4, 32), metrics=("ip", "l2_augmented"),
        repeats=1, show_progress=False,
    )  # fmt: skip
    for metric in ("ip", "l2_augmented"):
        recalls = [r["recall"] for r in records if r["metric"] == metric]
        assert recalls == sorted(recalls) and recalls[0] < 1.0
        assert recalls[-1] == 1.0
    assert all(r["search_ms"] > 0 and r["re_add_seconds"] >= 0 for r in records)
    assert "| ivf_flat | 32 | 32 | ip |" in sweep_table(records)


def test_hnsw_kinds_find_most_of_the_exact_top_k(clustered):
    xq, xb = clustered
    records = index_sweep(
        xq, xb, 20, nlists=(32,), nprobes=(32,), kinds=("ivf_hnsw", "hnsw", "exact"),
        ef_searches=(64,), repeats=1, show_progress=False,
    )  # fmt: skip
    assert [r["kind"] for r in records] == ["ivf_hnsw", "hnsw", "exact"]
    assert all(r["recall"] > 0.9 for r in records), records
    assert records[-1]["recall"] == 1.0


def test_bad_inputs_are_clear_errors(clustered, tmp_path):
    xq, xb = clustered
    with pytest.raises(ConfigError, match="unknown index kind"):
        index_sweep(xq, xb, 20, kinds=("ivf_pq",))
    with pytest.raises(ConfigError, match="nlist=5000 is more than"):
        index_sweep(xq, xb, 20, nlists=(5000,), show_progress=False)
    (tmp_path / "bad.pt").write_text("not a tensor file")
    with pytest.raises(ConfigError, match="--save-probe"):
        load_probe(tmp_path / "bad.pt")
