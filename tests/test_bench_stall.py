"""annsample.bench.stall: the training stall of no refresh, sync and async refresh, and the configs
of the three modes."""

from __future__ import annotations

from annsample.bench.stall import bench_stall, stall_configs, stall_table
from annsample.config import IndexConfig


def test_bench_stall_runs_three_modes(tmp_path):
    records = bench_stall(
        n_items=2000,
        steps=12,
        refresh_every=4,
        extra_overrides=(
            "data.synthetic_users=4000",  # 16 batches, so the 12 steps fit in the one epoch
            "train.num_threads=1",
            "sampler.index.nlist=16",
            "sampler.index.nprobe=4",
            "sampler.candidates=50",
        ),
        out_dir=tmp_path,
    )
    by_mode = {r["mode"]: r for r in records}
    assert list(by_mode) == ["never", "sync", "async"]
    assert all(r["steps"] == 12 for r in records)
    assert by_mode["never"]["refreshes"] == 0 and by_mode["never"]["wait_seconds"] == 0.0
    assert by_mode["sync"]["refreshes"] == 3  # steps 4, 8, 12
    assert (
        by_mode["async"]["refreshes"] >= 1
    )  # a request arriving while one runs replaces the queued one
    assert by_mode["sync"]["wait_seconds"] > 0.0
    assert all(0.0 <= r["stall_share"] < 1.0 for r in records)
    assert "| sync | 12 | 3 |" in stall_table(records)


def test_bench_stall_configs_load_at_a_million_items():
    # --catalog-size sets a refresh interval; refresh=never must not carry it (ignored settings
    # are errors), sync / async must
    configs = stall_configs(1_000_000, steps=400, refresh_every=100)
    assert configs["never"].sampler.index.refresh == "never"
    assert configs["never"].sampler.index.refresh_every == IndexConfig().refresh_every
    assert configs["sync"].sampler.index.refresh_every == 100
    assert configs["async"].sampler.index.asynchronous
