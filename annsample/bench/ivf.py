"""Search and exact-sampling cost on one device: torch IVF vs FAISS IVF vs exact scoring.

Run ``annsample bench ivf --device cpu --n 100000 --n 1000000 --json out.json`` (CPU: the
``torch_ivf`` and ``faiss`` backends against ``exact_topk``) or ``--device cuda --samplers`` (also
the exact GenNi samplers: chunked Gumbel-max in fp32 / tf32 / bf16 and the reservoir
``ExactSampler``). Nothing here needs FAISS: its rows are skipped when it is not installed (or,
on CUDA, when it sees no GPU), so the script runs on a CUDA box with torch alone.

Embeddings are a clustered synthetic catalog, a gaussian mixture with N / 250 components, σ = 0.5
around unit-scale centres (uniform noise would make every IVF index look bad); queries come from
the same mixture. Times are medians over ``--repeats`` runs after one warm-up; recall@k is against
``exact_topk`` over the same vectors. Each backend builds its own index (k-means included) with
the same nlist and seed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from annsample.errors import RunError
from annsample.exact_gumbel import GumbelExactSampler
from annsample.index import ItemIndex, exact_topk, faiss_ivf, recall_at_k
from annsample.index.torch_ivf import SEARCH_METHODS, search_inverted_lists
from annsample.samplers import ExactSampler, Exclusions

logger = logging.getLogger(__name__)


def clustered_catalog(
    n: int, dim: int, device: torch.device, seed: int = 0, spread: float = 0.5
) -> torch.Tensor:
    """(n, dim) float32 rows around n / 250 random unit-scale centres, generated on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(max(1, n // 250), dim, generator=g, device=device)
    members = torch.randint(0, centres.shape[0], (n,), generator=g, device=device)
    return torch.randn(n, dim, generator=g, device=device).mul_(spread).add_(centres[members])


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[list[float], Any]:
    """Milliseconds of ``repeats`` calls after one warm-up (device-synchronised), and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return times, out


def available_backends(device: torch.device) -> list[str]:
    """The IVF backends that can run on ``device`` here."""
    if device.type == "cuda":
        return ["torch_ivf"] + (["faiss-gpu"] if faiss_ivf.gpu_available() else [])
    return ["torch_ivf"] + (["faiss"] if faiss_ivf.available() else [])


def bench_size(
    n: int,
    device: torch.device,
    dim: int = 64,
    nlist: int | None = None,
    nprobes: Sequence[int] = (8, 16, 32),
    k: int = 100,
    query_counts: Sequence[int] = (256,),
    repeats: int = 5,
    samplers: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Records for one catalog size: exact search, each backend's build and search, samplers.

    Args:
        n: catalog size N; dim: embedding dimension d.
        nlist: IVF lists; default about sqrt(N), as ``train --catalog-size`` uses.
        nprobes: lists probed per query, one search record each.
        k: results per query (the ann sampler's K candidates).
        query_counts: Q queries per search (256 = one per sequence of a 256-batch, 12,800 = one
            per position of 256 x 50).
        samplers: also time the exact GenNi samplers drawing one negative for each of the
            largest query count's positions (no exclusions beyond the positive).

    Returns:
        Dicts with ``kind`` "build", "search" or "sample" and their timings in ms or s.
    """
    nlist = nlist or int(min(max(16, round(n**0.5)), n // 39))
    xb = clustered_catalog(n, dim, device, seed)
    records: list[dict[str, Any]] = []
    queries = {
        q: clustered_catalog(q, dim, device, seed + 1 + i) for i, q in enumerate(query_counts)
    }
    exact_I = {}
    for q, xq in queries.items():
        times, (_, I) = _timed(lambda xq=xq: exact_topk(xq, xb, k), device, max(1, repeats // 2))
        exact_I[q] = I
        records.append(
            dict(kind="search", backend="exact", n=n, queries=q, k=k, nprobe=None,
                 search_ms=statistics.median(times), search_ms_all=times, recall=1.0)
        )  # fmt: skip
    for backend in available_backends(device):
        start = time.perf_counter()
        index = ItemIndex(dim, nlist=nlist, nprobe=1, backend=backend, seed=seed).build(
            xb, ids=torch.arange(n)
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        records.append(
            dict(kind="build", backend=backend, n=n, nlist=nlist,
                 build_seconds=time.perf_counter() - start)
        )  # fmt: skip
        records += _search_records(index, queries, exact_I, nprobes, k, device, repeats)
    if samplers:
        records += _sampler_records(xb, queries[max(query_counts)], device, repeats, seed)
    return records


def _search_records(
    index: ItemIndex,
    queries: dict[int, torch.Tensor],
    exact_I: dict[int, torch.Tensor],
    nprobes: Sequence[int],
    k: int,
    device: torch.device,
    repeats: int,
) -> list[dict[str, Any]]:
    """Search ms and recall@k of one built index (both torch_ivf search methods for torch_ivf)."""
    records = []
    variants: list[tuple[str, Callable[[torch.Tensor, int], Any]]] = [
        (index.backend, lambda xq, nprobe: index.search(xq, k))
    ]
    if index.backend == "torch_ivf":
        lists = index.contents  # metric "ip": the stored space is the caller's space
        variants = [
            (f"torch_ivf/{method}",
             lambda xq, nprobe, method=method: search_inverted_lists(
                 lists, xq, k, nprobe, method=method))
            for method in SEARCH_METHODS
        ]  # fmt: skip
    for name, search in variants:
        for q, xq in queries.items():
            for nprobe in nprobes:
                index.nprobe = min(nprobe, index.nlist)
                times, (_, I) = _timed(
                    lambda xq=xq, p=index.nprobe, search=search: search(xq, p), device, repeats
                )
                records.append(
                    dict(kind="search", backend=name, n=index.ntotal, queries=q, k=k,
                         nprobe=index.nprobe, search_ms=statistics.median(times),
                         search_ms_all=times, recall=recall_at_k(I, exact_I[q]))
                )  # fmt: skip
    return records


def _sampler_records(
    xb: torch.Tensor, hidden: torch.Tensor, device: torch.device, repeats: int, seed: int
) -> list[dict[str, Any]]:
    """ms per call of the exact GenNi samplers drawing one negative per position of ``hidden``."""
    n, dim = xb.shape
    positions = hidden.shape[0]
    items = torch.cat([xb.new_zeros(1, dim), xb])  # row 0 = padding
    g = torch.Generator(device=device).manual_seed(seed)
    positives = torch.randint(1, n + 1, (positions,), generator=g, device=device)
    exclusions = Exclusions.from_positives(positives, n)
    contenders: dict[str, Any] = {
        f"exact_gumbel/{p}": GumbelExactSampler(precision=p) for p in ("fp32", "tf32", "bf16")
    }
    contenders["exact/reservoir"] = ExactSampler(
        chunk_elements=1 << 28 if device.type == "cuda" else 1 << 24
    )
    records = []
    for name, sampler in contenders.items():
        times, _ = _timed(
            lambda s=sampler: s.sample(hidden, items, exclusions, 1, g),
            device,
            max(1, repeats // 2),
        )
        records.append(
            dict(kind="sample", sampler=name, n=n, positions=positions, k=1,
                 sample_ms=statistics.median(times), sample_ms_all=times)
        )  # fmt: skip
    return records


def machine(device: torch.device) -> dict[str, Any]:
    """Processor or GPU, threads, load and library versions, for the record."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "faiss": faiss_ivf.faiss.__version__ if faiss_ivf.available() else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "cpu": platform.processor() or "unknown",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def crossover(records: list[dict[str, Any]], min_recall: float = 0.95) -> list[dict[str, Any]]:
    """Per (N, Q): exact search ms against the fastest IVF search reaching ``min_recall``.

    Where ``speedup`` > 1 the index beats exact scoring at that catalog size; ``ivf`` is None when
    no measured nprobe reaches the recall.
    """
    out = []
    exact = [r for r in records if r["kind"] == "search" and r["backend"] == "exact"]
    for e in exact:
        good = [
            r for r in records
            if r["kind"] == "search" and r["backend"] != "exact" and r["n"] == e["n"]
            and r["queries"] == e["queries"] and r["recall"] >= min_recall
        ]  # fmt: skip
        best = min(good, key=lambda r: r["search_ms"]) if good else None
        out.append(
            dict(n=e["n"], queries=e["queries"], exact_ms=e["search_ms"],
                 ivf=None if best is None else f"{best['backend']} nprobe={best['nprobe']}",
                 ivf_ms=None if best is None else best["search_ms"],
                 speedup=None if best is None else e["search_ms"] / best["search_ms"])
        )  # fmt: skip
    return out


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown tables: search ms and recall per backend and nprobe; build s; sampler ms."""
    lines = ["| N | Q | backend | nprobe | search ms | recall@k |", "|---|---|---|---|---|---|"]
    for r in records:
        if r["kind"] == "search":
            lines.append(
                f"| {r['n']:,} | {r['queries']:,} | {r['backend']} | {r['nprobe'] or '-'} | "
                f"{r['search_ms']:.1f} | {r['recall']:.3f} |"
            )
    summary = crossover(records)
    if summary:
        lines += ["", "| N | Q | exact ms | fastest IVF at recall >= 0.95 | ms | × faster |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['n']:,} | {r['queries']:,} | {r['exact_ms']:.1f} | {r['ivf'] or 'none'} | "
            + (f"{r['ivf_ms']:.1f} | {r['speedup']:.1f} |" if r["ivf"] else "- | - |")
            for r in summary
        ]
    lines += _kind_table(
        records,
        "build",
        "| N | backend | nlist | build s |",
        lambda r: f"| {r['n']:,} | {r['backend']} | {r['nlist']} | {r['build_seconds']:.2f} |",
    )
    lines += _kind_table(
        records, "sample", "| N | positions | sampler | ms per call (k=1) |",
        lambda r: f"| {r['n']:,} | {r['positions']:,} | {r['sampler']} | {r['sample_ms']:.1f} |",
    )  # fmt: skip
    return "\n".join(lines) + "\n"


def bench_ivf(
    device: str,
    ns: Sequence[int],
    threads: int = 1,
    json_path: Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Every catalog size of ``ns`` through :func:`bench_size` (``settings`` are its keyword
    arguments) with ``threads`` torch and FAISS threads; returns ``{"machine", "args", "records"}``,
    written to ``json_path`` after each size too (partial results survive a timeout)."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(threads)
    faiss_ivf.set_threads(threads)
    args = {"device": device, "n": list(ns), "threads": threads, **settings}
    report: dict[str, Any] = {"machine": machine(torch_device), "args": args}
    records: list[dict[str, Any]] = []
    for n in tqdm(ns, desc="catalog sizes"):
        records += bench_size(n, torch_device, **settings)
        if json_path is not None:
            report["records"] = records
            json_path.write_text(json.dumps(report, indent=2, default=str))
    report["records"] = records
    report["machine"]["load_average_after"] = os.getloadavg()
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2, default=str))
    return report


def _kind_table(
    records: list[dict[str, Any]], kind: str, header: str, row: Callable[[dict[str, Any]], str]
) -> list[str]:
    """A markdown table (after a blank line) of the records of ``kind``; none when there are none."""
    chosen = [r for r in records if r["kind"] == kind]
    if not chosen:
        return []
    separator = "|" + "---|" * (header.count("|") - 1)
    return ["", header, separator, *(row(r) for r in chosen)]
