"""Refresh cost of the item index: build, re_add and retrain times, assignment GFLOP/s, recall@k.

Run ``annsample bench refresh --n 100000 --n 1000000 --dim 64 --nlist 1024 --repeats 3
--json out.json``. Embeddings are a clustered synthetic catalog (a gaussian mixture, the shape IVF is
built for; uniform noise would make every index look bad). The assignment step (2 * N * nlist * d
FLOPs) bounds re_add from below, so its achieved GFLOP/s is reported next to a plain sgemm of the
same shape on the same machine.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import torch
from tqdm import tqdm

from annsample.index import ItemIndex, exact_topk, nearest_centroid, recall_at_k

logger = logging.getLogger(__name__)


def gaussian_mixture(
    n: int, dim: int, components: int, spread: float, generator: torch.Generator
) -> torch.Tensor:
    """(n, dim) float32 rows drawn around ``components`` random unit-scale centres."""
    centres = torch.randn(components, dim, generator=generator)
    members = torch.randint(0, components, (n,), generator=generator)
    x = torch.randn(n, dim, generator=generator).mul_(spread)
    return x.add_(centres[members])


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def sgemm_gflops(n: int, nlist: int, dim: int, repeats: int = 3) -> float:
    """Achieved GFLOP/s of a plain torch sgemm (n, dim) @ (dim, nlist): this machine's practical peak."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, dim, generator=g), torch.randn(dim, nlist, generator=g)
    out = torch.empty(n, nlist)
    torch.mm(a, b, out=out)  # warm up
    seconds, _ = _median_seconds(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * n * nlist * dim / seconds / 1e9


def machine() -> dict[str, Any]:
    """CPU model, core count and library versions, for the record."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def bench_one(
    n: int,
    dim: int,
    nlist: int,
    repeats: int,
    nprobes: Sequence[int],
    k: int,
    n_queries: int,
    metric: str,
    seed: int,
    progress: tqdm | None = None,
) -> dict[str, Any]:
    """Time build / re_add / retrain of one catalog size and measure recall@k at each nprobe."""
    g = torch.Generator().manual_seed(seed)
    components = max(16, n // 250)
    xb = gaussian_mixture(n, dim, components, spread=0.5, generator=g)
    moved = xb + 0.05 * torch.randn(xb.shape, generator=g)  # one refresh interval of training
    xq = gaussian_mixture(n_queries, dim, components, spread=0.5, generator=g)
    index = ItemIndex(
        dim, nlist=nlist, nprobe=min(nprobes), backend="faiss", metric=metric, seed=seed
    )

    def tick(phase: str) -> None:
        if progress is not None:
            progress.set_postfix(n=n, phase=phase)
            progress.update(1)

    build_s, build_all = _median_seconds(
        lambda: index.build(xb, ids=torch.arange(n), step=0), repeats
    )
    tick("build")
    step = iter(range(1, 10 * repeats + 1))
    re_add_s, re_add_all = _median_seconds(lambda: index.re_add(moved, step=next(step)), repeats)
    tick("re_add")
    centroids = index.centroids
    assign_s, _ = _median_seconds(lambda: nearest_centroid(moved, centroids), repeats)
    tick("assign")
    retrain_s, retrain_all = _median_seconds(lambda: index.retrain(moved, step=next(step)), repeats)
    tick("retrain")

    flops = 2 * n * nlist * dim
    _, I_exact = exact_topk(xq, moved, k)
    recalls = {}
    for nprobe in nprobes:
        index.nprobe = nprobe
        search_s, _ = _median_seconds(lambda: index.search(xq, k), 1)
        recalls[str(nprobe)] = {
            "recall": recall_at_k(index.search(xq, k)[1], I_exact),
            "search_seconds": search_s,
            "qps": n_queries / search_s,
        }
    tick("recall")
    record = {
        "n": n,
        "dim": dim,
        "nlist": nlist,
        "metric": metric,
        "repeats": repeats,
        "build_seconds": build_s,
        "re_add_seconds": re_add_s,
        "retrain_seconds": retrain_s,
        "assign_seconds": assign_s,
        "add_seconds": max(0.0, re_add_s - assign_s),
        "assign_gflop": flops / 1e9,
        "assign_gflops": flops / assign_s / 1e9,
        "re_add_gflops": flops / re_add_s / 1e9,
        "all_seconds": {"build": build_all, "re_add": re_add_all, "retrain": retrain_all},
        f"recall@{k}": recalls,
        "queries": n_queries,
    }
    logger.info(
        "n=%d build %.2fs re_add %.2fs (assign %.2fs, %.0f GFLOP/s) retrain %.2fs",
        n,
        build_s,
        re_add_s,
        assign_s,
        record["assign_gflops"],
        retrain_s,
    )
    return record


def run_benchmark(
    sizes: Sequence[int],
    dim: int = 64,
    nlist: int = 1024,
    repeats: int = 3,
    nprobes: Sequence[int] = (1, 8, 32, 128),
    k: int = 100,
    n_queries: int = 1000,
    metric: str = "ip",
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Benchmark every catalog size; returns the JSON-ready report."""
    # Other work on a shared machine slows every figure: record the load before and after.
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    peak = sgemm_gflops(65536, nlist, dim)
    results = []
    with tqdm(total=5 * len(sizes), desc="bench_refresh", disable=not show_progress) as progress:
        for n in sizes:
            results.append(
                bench_one(n, dim, nlist, repeats, nprobes, k, n_queries, metric, seed, progress)
            )
    for record in results:
        record["assign_fraction_of_sgemm_peak"] = record["assign_gflops"] / peak
        record["re_add_bound_seconds"] = record["assign_gflop"] / peak
    info = machine()
    info["load_average_before"] = load_before
    return {"machine": info, "sgemm_gflops": peak, "k": k, "results": results}


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of the report."""
    k = report["k"]
    nprobes = list(report["results"][0][f"recall@{k}"]) if report["results"] else []
    header = (
        "| N | build s | re_add s | assign s | assign GFLOP/s | bound s | retrain s | "
        + " | ".join(f"recall@{k} nprobe={p}" for p in nprobes)
        + " |"
    )
    lines = [header, "|" + "---|" * (7 + len(nprobes))]
    for r in report["results"]:
        recall = r[f"recall@{k}"]
        lines.append(
            f"| {r['n']:,} | {r['build_seconds']:.2f} | {r['re_add_seconds']:.2f} | "
            f"{r['assign_seconds']:.2f} | {r['assign_gflops']:.0f} | "
            f"{r['re_add_bound_seconds']:.2f} | {r['retrain_seconds']:.2f} | "
            + " | ".join(f"{recall[p]['recall']:.3f}" for p in nprobes)
            + " |"
        )
    return "\n".join(lines)


def machine_line(report: dict[str, Any]) -> str:
    """One line: the processor, its sgemm GFLOP/s and the load average around the run."""
    m = report["machine"]
    return (
        f"{m['cpu']}, {m['cores']} cores; sgemm {report['sgemm_gflops']:.0f} GFLOP/s; "
        f"1-min load average before {m['load_average_before'][0]:.2f}, "
        f"after {m['load_average_after'][0]:.2f}"
    )
