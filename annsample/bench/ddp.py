"""Distributed-training cost: one process against N (DDP over gloo), and what DDP does with sparse
item-embedding gradients.

``annsample bench ddp --config configs/beauty.yaml --steps 100`` runs, in one invocation,
``annsample train`` for ``steps`` steps on 1 and on ``--nproc`` processes (dense and sparse item
gradients), and reads steps/s and samples/s (sequences of the global batch per second) off each
run's ``train/epoch_seconds`` (training only: evaluation excluded). ``--sparse-probe`` adds a
direct measurement of one DDP backward on an embedding table of N rows: the gradient rows each
rank holds before the all-reduce, what DDP hands back (sparse or dense, how many rows), and the
time of a backward + all-reduce with a sparse and a dense table.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def bench_processes(
    config: str, steps: int, nproc: int, overrides: tuple[str, ...] = (), repeats: int = 1
) -> list[dict[str, Any]]:
    """``annsample train`` for ``steps`` steps on 1 and ``nproc`` processes, dense and sparse item
    gradients, ``repeats`` rounds (the four runs of a round back to back); one record per setting
    with the median steps/s and samples/s of the training loop and every round's seconds."""
    rounds = [_bench_round(config, steps, nproc, overrides) for _ in range(repeats)]
    records = []
    for i, first in enumerate(rounds[0]):
        seconds = [round_[i]["seconds"] for round_ in rounds]
        median = statistics.median(seconds)
        records.append(
            {
                **first,
                "seconds": round(median, 3),
                "seconds_each": seconds,
                "steps_per_second": round(first["steps"] / median, 3),
                "samples_per_second": round(first["steps"] * first["batch_size"] / median, 1),
            }
        )
    return records


def _bench_round(
    config: str, steps: int, nproc: int, overrides: tuple[str, ...]
) -> list[dict[str, Any]]:
    records = []
    script = Path(sys.executable).parent / "annsample"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "annsample.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        for sparse in (False, True):
            for processes in (1, nproc):
                out = Path(tmp) / f"run-{processes}-{sparse}"
                sets = (
                    "train.epochs=1",
                    f"train.max_steps_per_epoch={steps}",
                    "train.num_threads=1",
                    "train.eval_users=64",
                    "train.show_progress=false",
                    f"model.sparse_embeddings={str(sparse).lower()}",
                    *overrides,
                )
                args = [*command, "train", "--config", config, "--out", str(out)]
                args += [arg for item in sets for arg in ("--set", item)]
                args += ["--nproc", str(processes)]
                logger.info("running %s", " ".join(args))
                subprocess.run(args, check=True, capture_output=True, text=True)
                lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                seconds = next(
                    r["train/epoch_seconds"]
                    for r in map(json.loads, lines)
                    if "train/epoch_seconds" in r
                )
                results = json.loads((out / "results.json").read_text(encoding="utf-8"))
                batch = int(_setting(out / "config.yaml", "batch_size"))
                records.append(
                    {
                        "processes": processes,
                        "sparse_embeddings": sparse,
                        "steps": results["steps"],
                        "batch_size": batch,
                        "seconds": round(seconds, 3),
                    }
                )
    return records


def _setting(config_yaml: Path, key: str) -> str:
    import yaml

    return yaml.safe_load(config_yaml.read_text(encoding="utf-8"))["train"][key]


def _probe_worker(
    rank: int, world: int, init_file: str, n: int, d: int, rows: int, out: str, repeats: int = 5
) -> None:
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, n, (rows,), generator=generator)
    result: dict[str, Any] = {"rank": rank, "local_rows": int(ids.unique().numel())}
    for sparse in (True, False):
        table = nn.Embedding(n, d, sparse=sparse)
        ddp = nn.parallel.DistributedDataParallel(table)
        times = []
        for _ in range(repeats):
            table.zero_grad(set_to_none=True)
            dist.barrier()
            start = time.perf_counter()
            ddp(ids).sum().backward()
            times.append(time.perf_counter() - start)
        grad = table.weight.grad
        key = "sparse" if sparse else "dense"
        result[f"{key}_seconds"] = statistics.median(times)
        result[f"{key}_grad_is_sparse"] = bool(grad.is_sparse)
        if grad.is_sparse:
            grad = grad.coalesce()
            result["sparse_reduced_rows"] = int(grad.indices().shape[1])
            result["sparse_reduced_nnz_entries"] = int(grad._nnz())
        else:
            result["dense_reduced_rows"] = int((grad != 0).any(dim=1).sum())
    union = torch.zeros(1, dtype=torch.int64)
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_ids, ids)
    union[0] = torch.cat(all_ids).unique().numel()
    result["union_rows"] = int(union[0])
    Path(out, f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    # tear down together, with no DDP reducer left alive (its threads outliving the process
    # group): otherwise a rank can abort with "terminate called without an active exception"
    del ddp, table, grad
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def sparse_probe(
    n: int, d: int = 64, rows: int = 12_800, world: int = 2, repeats: int = 5
) -> dict[str, Any]:
    """One DDP backward over an (n, d) embedding looked up at ``rows`` random ids per rank, with
    sparse and with dense gradients (rank 0's figures; ``union_rows`` = distinct ids over ranks)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(
            _probe_worker,
            args=(world, init_file, n, d, rows, tmp, repeats),
            nprocs=world,
            join=True,
        )
        result = json.loads(Path(tmp, "rank0.json").read_text(encoding="utf-8"))
    return {"n": n, "d": d, "rows_per_rank": rows, "world": world, **result}


def bench_ddp(
    config: str,
    steps: int = 100,
    nproc: int = 2,
    overrides: tuple[str, ...] = (),
    repeats: int = 1,
    sparse_probe_sizes: tuple[int, ...] = (),
    command: str = "annsample bench ddp",
) -> dict[str, Any]:
    """The report of ``annsample bench ddp``: ``{"command", "runs", "sparse_probe"}`` (see
    :func:`bench_processes` and :func:`sparse_probe`)."""
    return {
        "command": command,
        "runs": bench_processes(config, steps, nproc, overrides, repeats),
        "sparse_probe": [sparse_probe(n) for n in sparse_probe_sizes],
    }
