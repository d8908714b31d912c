"""Training stall from index refresh: the same training run with no refresh, sync and async refresh.

Each mode trains the same synthetic catalog (same seed, same steps) through :func:`annsample.train.train`
and reads back from its ``metrics.jsonl`` the training seconds (evaluation excluded) and the seconds
the training thread spent blocked on the refresher (``index/total_wait_seconds``). The stall share is
blocked time / training time; the slowdown compares training time with the no-refresh run, so it
also counts what a background refresh takes from training on a machine with few cores.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from annsample.config import RunConfig, catalog_overrides, load_config
from annsample.train import train

MODES = {
    "never": ("sampler.index.refresh=never",),
    "sync": ("sampler.index.refresh=steps", "sampler.index.asynchronous=false"),
    "async": ("sampler.index.refresh=steps", "sampler.index.asynchronous=true"),
}


def _read(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(r["train/epoch_seconds"] for r in records if "train/epoch_seconds" in r)
    waits = [r["index/total_wait_seconds"] for r in records if "index/total_wait_seconds" in r]
    refreshes = [r["index/refresh_count"] for r in records if "index/refresh_count" in r]
    refresh_seconds = [r["index/last_refresh_seconds"] for r in records if "index/refresh" in r]
    steps = max(r["step"] for r in records)
    return {
        "steps": steps,
        "train_seconds": seconds,
        "ms_per_step": 1000.0 * seconds / max(steps, 1),
        "wait_seconds": waits[-1] if waits else 0.0,
        "refreshes": refreshes[-1] if refreshes else 0,
        "median_refresh_seconds": sorted(refresh_seconds)[len(refresh_seconds) // 2]
        if refresh_seconds
        else 0.0,
    }


def bench_stall(
    n_items: int = 1_000_000,
    steps: int = 400,
    refresh_every: int = 100,
    extra_overrides: tuple[str, ...] = (),
    out_dir: str | Path | None = None,
) -> list[dict]:
    """One record per mode ("never", "sync", "async") with step time, blocked time and shares."""
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="annsample-stall-"))
    records = []
    for mode, config in stall_configs(n_items, steps, refresh_every, extra_overrides).items():
        train(config, root / mode, overwrite=True)
        records.append(
            {
                "mode": mode,
                "catalog_size": n_items,
                "refresh_every": refresh_every,
                **_read(root / mode),
            }
        )
    never = records[0]["train_seconds"]
    for record in records:
        record["stall_share"] = record["wait_seconds"] / max(record["train_seconds"], 1e-9)
        record["slowdown_vs_never"] = record["train_seconds"] / max(never, 1e-9) - 1.0
    return records


def stall_configs(
    n_items: int, steps: int, refresh_every: int, extra_overrides: tuple[str, ...] = ()
) -> dict[str, RunConfig]:
    """The run config of each mode: the ``--catalog-size`` settings, ``steps`` steps of one epoch."""
    # refresh=never reads no refresh_every (setting it is an error): only sync / async get it;
    # retrain_below would probe recall at every refresh, which would count as refresh cost
    dropped = ("sampler.index.refresh_every=", "sampler.index.retrain_below=")
    catalog = tuple(o for o in catalog_overrides(n_items) if not o.startswith(dropped))
    base = catalog + (
        "sampler.name=ann",
        "sampler.query=sequence",
        "train.epochs=1",
        f"train.max_steps_per_epoch={steps}",
        "train.eval_users=200",
        "train.show_progress=false",
        "sampler.index.probe_every=1000000000",  # no probes: they would count as refresh cost
    )
    configs = {}
    for mode, overrides in MODES.items():
        if mode != "never":
            overrides = overrides + (f"sampler.index.refresh_every={refresh_every}",)
        configs[mode] = load_config(None, base + overrides + tuple(extra_overrides))
    return configs


def stall_table(records: list[dict]) -> str:
    """Markdown table of :func:`bench_stall` records."""
    lines = [
        "| mode | steps | refreshes | ms / step | blocked s | stall share | slowdown vs never | refresh s (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['steps']} | {r['refreshes']} | {r['ms_per_step']:.1f} | {r['wait_seconds']:.2f} "
            f"| {100 * r['stall_share']:.1f}% | {100 * r['slowdown_vs_never']:+.1f}% | {r['median_refresh_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"
