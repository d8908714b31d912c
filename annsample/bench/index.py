"""Index recall against search cost, on a trained item table: the table that chooses the index.

For probe queries xq (Q, d) over an item table xb (N, d), every configuration reports recall@k
against :func:`annsample.index.exact_topk` and the search milliseconds per 256 queries (one batch
of sequence queries), plus what it costs to build and to refresh:

- ``ivf_flat``: the product's :class:`annsample.index.ItemIndex` (FAISS IVF-Flat) for each nlist
  and metric, built once and searched at every nprobe; ``re_add_seconds`` is one cheap refresh.
- ``ivf_hnsw``: IVF-Flat whose coarse quantiser is an HNSW graph over the centroids (FAISS
  ``IndexHNSWFlat``), so large nlist stays cheap to probe and to assign.
- ``ivf_pq``: IVF with product-quantised vectors (FAISS ``IndexIVFPQ``, ``pq_m`` bytes per item)
  whose ``refine`` × k best candidates are rescored exactly (``IndexRefineFlat``): a cheaper scan
  of each list, for the same lists.
- ``hnsw``: FAISS ``IndexHNSWFlat`` over all items, at each efSearch (no lists; a refresh is a
  rebuild).
- ``exact``: the ``ItemIndex`` exact backend (chunked matmul + top-k): recall 1 by construction,
  the cost every approximate index has to beat.

Every kind ranks by inner product: ``metric="ip"`` searches it directly
(``METRIC_INNER_PRODUCT``); ``l2_augmented`` appends sqrt(M² - |x|²) to each item (M the largest
norm) and 0 to each query, so the L2 order is the inner-product order and k-means clusters by
position, not by norm (the product's default metric). Recall of ids, not of scores.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from annsample.errors import ConfigError
from annsample.index import ItemIndex, exact_topk, recall_at_k

logger = logging.getLogger(__name__)

KINDS = ("ivf_flat", "ivf_hnsw", "ivf_pq", "hnsw", "exact")


def _search_ms(search, xq: torch.Tensor, k: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Median ms of ``search(xq, k)`` scaled to 256 queries, and the ids it returned."""
    _, I = search(xq, k)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, I = search(xq, k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0 * 256 / xq.shape[0], I


def _faiss_search(index: Any):
    def search(xq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        D, I = index.search(xq.contiguous().numpy(), k)
        return torch.from_numpy(D), torch.from_numpy(I)

    return search


def _faiss_space(
    xb: torch.Tensor, xq: torch.Tensor, metric: str, multiple: int = 1
) -> tuple[np.ndarray, torch.Tensor, int]:
    """Items (N, w) as a float32 array, queries (Q, w) and the FAISS metric under which a search
    ranks by inner product: the vectors themselves for ``ip``; for ``l2_augmented`` the items
    with sqrt(M² - |x|²) appended and the queries with 0, under L2 (|q - x|² = |q|² + M² -
    2 q·x). w is padded with zero columns to a multiple of ``multiple`` (PQ sub-quantisers)."""
    if metric == "ip":
        return xb.numpy(), xq, faiss.METRIC_INNER_PRODUCT
    n, d = xb.shape
    width = -(-(d + 1) // multiple) * multiple
    norms2 = xb.double().pow(2).sum(1)
    items = torch.zeros(n, width)
    items[:, :d] = xb
    items[:, d] = (norms2.max() - norms2).clamp_min(0).sqrt().float()
    queries = torch.zeros(xq.shape[0], width)
    queries[:, :d] = xq
    return items.numpy(), queries, faiss.METRIC_L2


def index_sweep(
    xq: torch.Tensor,
    xb: torch.Tensor,
    k: int,
    nlists: tuple[int, ...] = (1000,),
    nprobes: tuple[int, ...] = (8, 16, 32, 64),
    metrics: tuple[str, ...] = ("ip",),
    kinds: tuple[str, ...] = ("ivf_flat",),
    ef_searches: tuple[int, ...] = (256, 512),
    hnsw_m: int = 32,
    pq_m: int = 16,
    refines: tuple[int, ...] = (2, 4),
    repeats: int = 3,
    seed: int = 0,
    show_progress: bool = True,
) -> list[dict]:
    """Recall@k and search cost of each index configuration.

    Args:
        xq: (Q, d) float32 probe queries (e.g. hidden states of validation users).
        xb: (N, d) float32 item table without its padding row; result ids are row numbers.
        k: results per query (the ann sampler's candidates K).
        nlists, nprobes, metrics: the IVF grid; nprobe values above nlist are skipped.
            ``ivf_flat`` takes the :class:`ItemIndex` metrics, the FAISS kinds ``ip`` and
            ``l2_augmented``.
        kinds: any of :data:`KINDS`.
        ef_searches: HNSW search breadth (``hnsw``; and the coarse quantiser's for ``ivf_hnsw``).
        hnsw_m: HNSW graph degree.
        pq_m: bytes per item of ``ivf_pq`` (sub-quantisers of 8 bits; must divide d for ``ip``,
            ``l2_augmented`` pads its d + 1 columns to a multiple).
        refines: ``ivf_pq`` rescoring breadth: the refine × k best PQ candidates are rescored
            exactly.

    Returns:
        One record per configuration: ``kind, nlist, nprobe, metric, ef_search, refine,
        recall, search_ms`` (per 256 queries, median of ``repeats``), ``build_seconds`` and, for
        ivf_flat, ``re_add_seconds``.
    """
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ConfigError(f"unknown index kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    xq, xb = xq.float().contiguous(), xb.float().contiguous()
    n, d = xb.shape
    if not 1 <= k <= n:
        raise ConfigError(f"k={k} must be between 1 and the number of items {n}")
    if "ivf_pq" in kinds and "ip" in metrics and d % pq_m:
        raise ConfigError(
            f"pq_m={pq_m} must divide the embedding size {d} (metric ip); choose a divisor of {d}"
        )
    native = [kind for kind in kinds if kind in ("ivf_hnsw", "ivf_pq", "hnsw")]
    if native and "cosine" in metrics:
        raise ConfigError(
            f"metric cosine is an ivf_flat metric; {', '.join(native)} take ip or l2_augmented"
        )
    _, I_exact = exact_topk(xq, xb, k)
    records: list[dict] = []

    def record(**values: Any) -> None:
        values.update(catalog_size=n, k=k, queries=xq.shape[0], threads=torch.get_num_threads())
        logger.info("%s", values)
        records.append(values)

    jobs = [
        ("ivf_flat", nlist, metric) for nlist in nlists for metric in metrics if "ivf_flat" in kinds
    ]
    for kind in ("ivf_hnsw", "ivf_pq"):
        jobs += [(kind, nlist, metric) for nlist in nlists for metric in metrics if kind in kinds]
    jobs += [("hnsw", 0, metric) for metric in metrics] if "hnsw" in kinds else []
    jobs += [("exact", 0, "ip")] if "exact" in kinds else []
    rows = torch.arange(n)  # results are compared with exact_topk, which returns row numbers
    rng = np.random.default_rng(seed)

    def training_sample(items: np.ndarray, nlist: int) -> np.ndarray:
        return items[rng.choice(n, size=min(n, 256 * nlist), replace=False)]

    for kind, nlist, metric in tqdm(jobs, desc="index configs", disable=not show_progress):
        if nlist > n:
            raise ConfigError(f"nlist={nlist} is more than the {n} items; lower it")
        t0 = time.perf_counter()
        if kind == "ivf_flat":
            index = ItemIndex(d, nlist=nlist, nprobe=1, backend="faiss", metric=metric, seed=seed)
            index.build(xb, ids=rows)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            index.re_add(xb, step=1)
            re_add = time.perf_counter() - t0
            for nprobe in (p for p in nprobes if p <= nlist):
                index.nprobe = nprobe
                ms, I = _search_ms(index.search, xq, k, repeats)
                record(
                    kind=kind, nlist=nlist, nprobe=nprobe, metric=metric, ef_search=None,
                    recall=round(recall_at_k(I, I_exact), 4), search_ms=round(ms, 3),
                    build_seconds=round(build, 3), re_add_seconds=round(re_add, 3),
                )  # fmt: skip
        elif kind == "ivf_hnsw":
            items, queries, space = _faiss_space(xb, xq, metric)
            width = items.shape[1]
            quantizer = faiss.IndexHNSWFlat(width, hnsw_m, space)
            ivf = faiss.IndexIVFFlat(quantizer, width, nlist, space)
            ivf.train(training_sample(items, nlist))
            ivf.add(items)
            build = time.perf_counter() - t0
            for ef in ef_searches:
                quantizer.hnsw.efSearch = ef
                for nprobe in (p for p in nprobes if p <= nlist):
                    ivf.nprobe = nprobe
                    ms, I = _search_ms(_faiss_search(ivf), queries, k, repeats)
                    record(
                        kind=kind, nlist=nlist, nprobe=nprobe, metric=metric, ef_search=ef,
                        recall=round(recall_at_k(I, I_exact), 4), search_ms=round(ms, 3),
                        build_seconds=round(build, 3),
                    )  # fmt: skip
        elif kind == "ivf_pq":
            items, queries, space = _faiss_space(xb, xq, metric, multiple=pq_m)
            width = items.shape[1]
            ivf = faiss.IndexIVFPQ(faiss.IndexFlat(width, space), width, nlist, pq_m, 8, space)
            # the sample also trains the 256-word codebooks
            ivf.train(training_sample(items, max(nlist, 256)))
            refined = faiss.IndexRefineFlat(ivf)
            refined.add(items)
            build = time.perf_counter() - t0
            for refine in refines:
                refined.k_factor = float(refine)
                for nprobe in (p for p in nprobes if p <= nlist):
                    ivf.nprobe = nprobe
                    ms, I = _search_ms(_faiss_search(refined), queries, k, repeats)
                    record(
                        kind=kind, nlist=nlist, nprobe=nprobe, metric=metric, ef_search=None,
                        refine=refine, pq_m=pq_m, recall=round(recall_at_k(I, I_exact), 4),
                        search_ms=round(ms, 3), build_seconds=round(build, 3),
                    )  # fmt: skip
        elif kind == "exact":
            index = ItemIndex(d, nlist=1, nprobe=1, backend="exact").build(xb, ids=rows)
            build = time.perf_counter() - t0
            ms, I = _search_ms(index.search, xq, k, repeats)
            record(
                kind=kind, nlist=None, nprobe=None, metric=metric, ef_search=None,
                recall=round(recall_at_k(I, I_exact), 4), search_ms=round(ms, 3),
                build_seconds=round(build, 3),
            )  # fmt: skip
        else:
            items, queries, space = _faiss_space(xb, xq, metric)
            hnsw = faiss.IndexHNSWFlat(items.shape[1], hnsw_m, space)
            hnsw.add(items)
            build = time.perf_counter() - t0
            for ef in ef_searches:
                hnsw.hnsw.efSearch = max(ef, k)
                ms, I = _search_ms(_faiss_search(hnsw), queries, k, repeats)
                record(
                    kind=kind, nlist=None, nprobe=None, metric=metric, ef_search=max(ef, k),
                    recall=round(recall_at_k(I, I_exact), 4), search_ms=round(ms, 3),
                    build_seconds=round(build, 3),
                )  # fmt: skip
    return records


def load_probe(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe queries (Q, d) and item table without padding (N, d) from ``bench step --save-probe``."""
    if Path(path).is_dir():
        raise ConfigError(
            f"{path} is a folder; pass a file written by annsample bench step --save-probe FILE, "
            "or use probe_from_run for a training run folder"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["queries"].float(), state["item_embeddings"][1:].float()
    except Exception as error:  # missing, torn, not a torch file, or not a probe dict
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"cannot read probe file {path} ({type(error).__name__}: {reason}); write one with "
            "annsample bench step --save-probe FILE"
        ) from None


def probe_from_run(run_dir: str | Path, queries: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe queries (Q, d) and item table without padding (N, d) of a finished training run.

    The queries are the last hidden states of ``queries`` validation users (the staleness probe's
    users, :func:`annsample.prepare.probe_set`) under the run's best checkpoint, on CPU; the
    table is that checkpoint's item embeddings: the trained table an index has to serve.
    """
    from annsample.prepare import prepare_data, probe_set
    from annsample.run import load_model, load_run

    config, best = load_run(run_dir, (f"sampler.index.probe_queries={queries}",))
    cpu = torch.device("cpu")
    prepared = prepare_data(config)
    model = load_model(config, best, prepared.n_items, cpu)
    inputs, _ = probe_set(prepared, config, cpu)
    with torch.no_grad():
        xq = model.encode(inputs)[:, -1].contiguous()
        xb = model.item_embeddings.detach()[1:].contiguous()
    return xq, xb


def sweep_table(records: list[dict]) -> str:
    """Markdown table of :func:`index_sweep` records."""
    lines = [
        "| kind | nlist | nprobe | metric | efSearch | refine | recall@k | search ms / 256 q "
        "| build s | re_add s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        cells = [
            r["kind"], r["nlist"], r["nprobe"], r["metric"], r["ef_search"], r.get("refine"),
            f"{r['recall']:.3f}", f"{r['search_ms']:.1f}", f"{r['build_seconds']:.1f}",
            r.get("re_add_seconds"),
        ]  # fmt: skip
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
