"""Stub ablation runners for tests/test_ablation.py, in a module light enough for worker processes
to import quickly (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from annsample.config import RunConfig, dump_config


def fake_ndcg(config: RunConfig) -> float:
    """The stub's test NDCG@10: a known function of the settings and the seed."""
    ic = config.sampler.index
    interval = {"never": 1000, "epoch": 20}.get(ic.refresh, ic.refresh_every)
    return 0.1 - interval / 1e4 + config.seed / 1e3


def stub_runner(config: RunConfig, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Writes what `annsample train` writes, without training; fails where nprobe is 3."""
    if config.sampler.index.nprobe == 3:
        raise RuntimeError("stub failure\non two lines")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    ndcg = fake_ndcg(config)
    records = [
        {"step": s, "index/recall@k": 1.0 - s / 100, "sampler/tv_to_exact": s / 100}
        for s in (10, 20)
    ]
    records += [{"step": 20, "train/epoch_seconds": 1.5}, {"step": 40, "train/epoch_seconds": 2.5}]
    records += [{"step": s, "train/epoch_loss": 1.0 - s / 100} for s in (20, 40)]
    records += [{"step": s, "eval/valid/ndcg@10": ndcg * s / 40} for s in (20, 40)]
    records.append({"step": 40, "index/refresh_count": 4, "index/total_wait_seconds": 0.5})
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(lines, encoding="utf-8")
    metrics = {"hr@10": 2 * ndcg, "ndcg@10": ndcg}
    results = {
        "name": config.name,
        "best_epoch": 2,
        "epochs_run": 2,
        "steps": 40,
        "seconds_per_epoch": 2.0,
        "valid": metrics,
        "test": metrics,
    }
    (run_dir / "results.json").write_text(json.dumps(results), encoding="utf-8")


def dying_runner(config: RunConfig, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Kills its own process (as an out-of-memory kill would) where nprobe is 3."""
    if config.sampler.index.nprobe == 3:
        os._exit(7)
    stub_runner(config, run_dir, resume, overwrite)
