"""Export a finished run for serving, and recommend from the exported folder.

``export_run(run_dir, out_dir)`` writes a self-contained folder that needs neither the dataset nor
the run folder again:

| file | what |
| --- | --- |
| ``manifest.json`` | format version, annsample/torch/faiss/python versions, catalog checksum, index settings and recall, SHA-256 of every file below |
| ``config.yaml`` | the run's resolved config (model architecture and ``max_len`` encode a history) |
| ``model.pt`` | the best checkpoint's weights (``torch.load(..., weights_only=True)``) |
| ``item_embeddings.npy`` | (N, d) float32; row ``i`` is item id ``i + 1`` (padding dropped) |
| ``index.faiss`` | a CPU ``faiss.IndexIVFFlat`` (inner product) whose labels are item ids 1..N |
| ``item_labels.json`` | only for interaction tables: the original id of each item id (row 0 = "") |

``Recommender.load(out_dir).recommend(history, k)`` encodes the history with the model, searches
the IVF index with the history excluded (a FAISS ``IDSelector``), and returns the top-k item ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from annsample import __version__
from annsample.config import RunConfig, dump_config, load_config
from annsample.errors import AnnsampleError, RunError

logger = logging.getLogger(__name__)

FORMAT = "annsample.export/1"
MANIFEST = "manifest.json"
CONFIG, MODEL, EMBEDDINGS, INDEX, LABELS = (
    "config.yaml",
    "model.pt",
    "item_embeddings.npy",
    "index.faiss",
    "item_labels.json",
)
# k-means points per centroid below which FAISS warns; nlist is capped so every list gets as many.
_MIN_POINTS_PER_CENTROID = 39
_RECALL_QUERIES = 256


class ExportError(AnnsampleError, ValueError):
    """An export folder is missing, damaged or of another format, or a request cannot be served
    (unknown item ids, an empty history, k larger than the catalog)."""


# --------------------------------------------------------------------------- export


def default_nlist(n_items: int) -> int:
    """About sqrt(N) lists, capped so k-means sees at least 39 items per list.

    >>> default_nlist(12101), default_nlist(1_000_000), default_nlist(50)
    (110, 1000, 1)
    """
    return max(1, min(round(n_items**0.5), n_items // _MIN_POINTS_PER_CENTROID))


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    nlist: int | None = None,
    nprobe: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a finished run's model, item embeddings, a CPU IVF index and a manifest to ``out_dir``.

    Args:
        run_dir: a finished ``annsample train`` folder (with ``results.json`` and ``best.pt``).
        out_dir: the export folder; must not exist or be empty unless ``overwrite``.
        nlist: IVF lists; default the run's ``sampler.index.nlist`` for ``ann`` runs, else
            :func:`default_nlist`. Capped at N.
        nprobe: lists visited per query at serving time (stored in the index); default the run's
            ``sampler.index.nprobe`` for ``ann`` runs, else nlist // 4 (at least 1).
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        The manifest (also written as ``manifest.json``). ``index["recall@10"]`` is the IVF
        index's recall@10 against exact top-10 on the hidden states of up to 256 users.

    Raises:
        RunError: the run folder is missing or unfinished, or its weights do not fit its config.
        ExportError: ``out_dir`` is a file or non-empty without ``overwrite``, or nlist/nprobe are
            out of range.
    """
    from annsample import checkpoint as checkpoint_mod
    from annsample.prepare import prepare_data
    from annsample.run import load_model, load_run

    run = Path(run_dir)
    _check_finished(run)
    out = _check_out_dir(Path(out_dir), overwrite)
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise ExportError(
            f"export folder {out} would replace the run folder {run}; choose another OUT_DIR"
        )
    config, best = load_run(run)
    prepared = prepare_data(config)
    n_items = prepared.n_items
    model = load_model(config, best, n_items, torch.device("cpu"))
    xb = model.item_embeddings.detach()[1:].float().contiguous()  # (N, d)
    nlist, nprobe = _index_sizes(config, n_items, nlist, nprobe)

    start = time.perf_counter()
    index = build_ivf(xb.numpy(), nlist, nprobe, seed=config.seed)
    build_seconds = time.perf_counter() - start
    recall = _index_recall(model, prepared, config, index, xb)
    labels = _item_labels(config)

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dump_config(config, out / CONFIG)
    torch.save(model.state_dict(), out / MODEL)
    np.save(out / EMBEDDINGS, xb.numpy())
    faiss.write_index(index, str(out / INDEX))
    files = [CONFIG, MODEL, EMBEDDINGS, INDEX]
    if labels is not None:
        (out / LABELS).write_text(json.dumps(labels) + "\n", encoding="utf-8")
        files.append(LABELS)
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_run": str(run.resolve()),
        "versions": _versions(),
        "catalog": checkpoint_mod.catalog_summary(prepared.split),
        "n_items": n_items,
        "dim": int(xb.shape[1]),
        "max_len": config.data.max_len,
        "item_ids": "1..n_items (0 is padding); item_embeddings.npy row i is item i + 1",
        "index": {
            "type": "IndexIVFFlat",
            "metric": "inner_product",
            "nlist": nlist,
            "nprobe": nprobe,
            "build_seconds": round(build_seconds, 3),
            "recall@10": recall,
        },
        "files": {name: _sha256(out / name) for name in files},
    }
    checkpoint_mod.atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    logger.info(
        "exported %s to %s: %d items, nlist %d, nprobe %d, index recall@10 %.3f",
        run,
        out,
        n_items,
        nlist,
        nprobe,
        recall,
    )
    return manifest


def build_ivf(xb: np.ndarray, nlist: int, nprobe: int, seed: int = 0) -> Any:
    """A CPU ``faiss.IndexIVFFlat`` (inner product) over ``xb`` with labels 1..N.

    Args:
        xb: (N, d) float32 item embeddings; row i is item id i + 1.
        nlist: IVF lists, 1 <= nlist <= N.
        nprobe: lists visited per query, 1 <= nprobe <= nlist (stored in the index).
        seed: k-means seed.
    """
    n, d = xb.shape
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(xb)
    index.add_with_ids(xb, np.arange(1, n + 1, dtype=np.int64))
    index.nprobe = nprobe
    return index


def _check_finished(run: Path) -> None:
    """Refuse a missing or unfinished run folder with a message saying what to do."""
    if not run.is_dir():
        raise RunError(
            f"run folder {run} does not exist; pass the --out folder of a finished `annsample train`"
        )
    if not (run / "results.json").is_file():
        if (run / "checkpoints").is_dir():
            raise RunError(
                f"run {run} has not finished (no results.json, checkpoints present); finish it "
                f"with `annsample train --resume {run}`, then export"
            )
        raise RunError(
            f"run folder {run} has no results.json; it is not a finished training run "
            "(export takes the --out folder of a finished `annsample train`)"
        )


def _check_out_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise ExportError(f"export folder {out} exists and is not a folder; choose another")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"export folder {out} already exists and is not empty; choose another, or pass "
            "--overwrite to replace it"
        )
    return out


def _index_sizes(
    config: RunConfig, n_items: int, nlist: int | None, nprobe: int | None
) -> tuple[int, int]:
    ann = config.sampler.name == "ann"
    if nlist is None:
        nlist = min(config.sampler.index.nlist, n_items) if ann else default_nlist(n_items)
    if not 1 <= nlist <= n_items:
        raise ExportError(f"nlist={nlist} must be between 1 and the catalog's {n_items} items")
    if nprobe is None:
        nprobe = min(config.sampler.index.nprobe, nlist) if ann else max(1, nlist // 4)
    if not 1 <= nprobe <= nlist:
        raise ExportError(f"nprobe={nprobe} must be between 1 and nlist={nlist}")
    return nlist, nprobe


def _index_recall(model, prepared, config: RunConfig, index: Any, xb: torch.Tensor) -> float:
    """Recall@10 of ``index`` against exact top-10 on the last hidden states of up to 256 users."""
    from annsample import data as data_mod
    from annsample.index import exact_topk, recall_at_k

    inputs, _ = data_mod.eval_tensors(prepared.split, "test", config.data.max_len)
    rows = np.random.default_rng(config.seed).permutation(len(inputs))[:_RECALL_QUERIES]
    with torch.no_grad():
        xq = model.encode(torch.as_tensor(inputs[rows]))[:, -1].contiguous()  # (Q, d)
    k = min(10, xb.shape[0])
    _, I_exact = exact_topk(xq, xb, k)
    _, I = index.search(xq.numpy(), k)
    return round(recall_at_k(torch.from_numpy(I) - 1, I_exact), 4)


def _item_labels(config: RunConfig) -> list[str] | None:
    """The original item ids of an interactions table (remapped to 1..N), else None."""
    from annsample import data as data_mod

    dc = config.data
    if dc.path == "synthetic":
        return None
    table = dc.format == "interactions" or (
        dc.format == "auto" and Path(dc.path).suffix.lower() in (".csv", ".tsv")
    )
    if not table:
        return None
    columns = {"user_col": dc.user_col, "item_col": dc.item_col, "time_col": dc.time_col}
    dataset = data_mod.load_dataset(dc.path, fmt=dc.format, **columns)
    return [str(label) for label in dataset.item_labels]


def _versions() -> dict[str, str]:
    return {
        "annsample": __version__,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- serve


@dataclass
class Recommendations:
    """Top-k items for one history: ``ids`` (k,) int64 item ids (or original labels when the
    dataset had them), best first, and ``scores`` (k,) float32 inner products h · e_j."""

    ids: list
    scores: np.ndarray


class Recommender:
    """Top-k recommendation from an export folder: encode a history, search the IVF index.

    Load with :meth:`load`; :meth:`recommend` takes one history, :meth:`recommend_batch` many.
    The index's nprobe is the one chosen at export; set ``recommender.nprobe`` to trade recall
    for speed (nprobe = nlist is exact).
    """

    def __init__(
        self,
        model,
        index: Any,
        manifest: dict[str, Any],
        labels: list[str] | None = None,
    ) -> None:
        self.model = model.eval()
        self.index = index
        self.manifest = manifest
        self.n_items: int = manifest["n_items"]
        self.max_len: int = manifest["max_len"]
        self.labels = labels
        self._label_to_id = None if labels is None else {s: i for i, s in enumerate(labels) if i}

    @classmethod
    def load(cls, out_dir: str | Path, verify: bool = True) -> Recommender:
        """Load an export folder written by :func:`export_run`.

        Args:
            out_dir: the folder.
            verify: check every file against the SHA-256 in the manifest.

        Raises:
            ExportError: the folder or its manifest is missing, it has another format version,
                a file is missing or altered, or the weights do not fit the config.
        """
        from annsample.model import SASRec

        folder = Path(out_dir)
        manifest = read_manifest(folder)
        for name, digest in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise ExportError(f"export folder {folder} lacks {name}; export the run again")
            if verify and _sha256(path) != digest:
                raise ExportError(
                    f"{path} does not match the checksum in {MANIFEST} (it was changed or "
                    "damaged after export); export the run again"
                )
        _warn_on_version_change(manifest["versions"])
        config = load_config(folder / CONFIG)
        model = SASRec(manifest["n_items"], config.data.max_len, config.model)
        try:
            model.load_state_dict(torch.load(folder / MODEL, map_location="cpu", weights_only=True))
        except Exception as error:  # wrong shapes or keys, or a damaged file
            raise ExportError(
                f"{folder / MODEL} does not fit {folder / CONFIG} ({' '.join(str(error).split())[:200]}); "
                "export the run again"
            ) from None
        index = faiss.read_index(str(folder / INDEX))
        if index.ntotal != manifest["n_items"] or index.d != manifest["dim"]:
            raise ExportError(
                f"{folder / INDEX} holds {index.ntotal} vectors of dimension {index.d} but the "
                f"manifest says {manifest['n_items']} items of dimension {manifest['dim']}; "
                "export the run again"
            )
        labels = None
        if LABELS in manifest["files"]:
            labels = json.loads((folder / LABELS).read_text(encoding="utf-8"))
        recommender = cls(model, index, manifest, labels)
        # The first forward pass and search pay one-off setup costs; pay them here, not per query.
        recommender._recommend_ids([[1]], 1)
        return recommender

    @property
    def nprobe(self) -> int:
        return int(faiss.extract_index_ivf(self.index).nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        nlist = faiss.extract_index_ivf(self.index).nlist
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= nlist:
            raise ExportError(f"nprobe={value!r} must be an integer between 1 and nlist={nlist}")
        faiss.extract_index_ivf(self.index).nprobe = value

    def recommend(self, history: Sequence[int | str], k: int = 10) -> Recommendations:
        """Top-k items for one user's history, oldest item first; items in the history are
        never recommended.

        Args:
            history: item ids 1..N (or original item ids, for a dataset read from a table),
                oldest first; only the last ``max_len`` are encoded.
            k: how many items, 1 <= k <= N minus the distinct items of the history.

        Raises:
            ExportError: empty history, unknown item ids, or k out of range.
        """
        return self.recommend_batch([history], k)[0]

    def recommend_batch(self, histories: Sequence[Sequence[int | str]], k: int = 10) -> list:
        """Top-k items for B histories (see :meth:`recommend`): the B hidden states are encoded
        in one forward pass, (B, max_len) -> (B, d), and searched one by one (each with its own
        history excluded). Returns B :class:`Recommendations`."""
        return self._recommend_ids([self._to_ids(history) for history in histories], k)

    def _recommend_ids(self, histories: list[list[int]], k: int) -> list:
        """:meth:`recommend_batch` for histories already mapped to item ids 1..N."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ExportError(f"k must be a positive integer, got {k!r}")
        seqs = np.zeros((len(histories), self.max_len), dtype=np.int64)
        for row, history in enumerate(histories):
            ids = self._check_ids(history)
            tail = ids[-self.max_len :]
            seqs[row, self.max_len - len(tail) :] = tail
            available = self.n_items - len(np.unique(ids))
            if k > available:
                raise ExportError(
                    f"k={k} is more than the {available} items outside the history of "
                    f"{len(ids)} items (catalog of {self.n_items}); lower k"
                )
        with torch.no_grad():
            xq = self.model.encode(torch.from_numpy(seqs))[:, -1].contiguous().numpy()  # (B, d)
        out = []
        for row, history in enumerate(histories):
            D, I = self._search(
                xq[row : row + 1], np.unique(np.asarray(history, dtype=np.int64)), k
            )
            ids = I.tolist() if self.labels is None else [self.labels[i] for i in I]
            out.append(Recommendations(ids=ids, scores=D))
        return out

    def _search(self, xq: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one query (1, d) with ``exclude`` filtered inside FAISS; when the probed lists
        hold fewer than k admissible items, probe every list (exact)."""
        ivf = faiss.extract_index_ivf(self.index)
        selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude))
        for nprobe in (ivf.nprobe, ivf.nlist):
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            D, I = self.index.search(xq, k, params=params)
            if (I[0] >= 0).all():
                return D[0], I[0]
        raise AssertionError("an exhaustive search returned fewer than k items")  # k was checked

    def _to_ids(self, history: Sequence[int | str]) -> list[int]:
        if self._label_to_id is None:
            return list(history)
        unknown = [item for item in history if str(item) not in self._label_to_id]
        if unknown:
            raise ExportError(
                f"unknown item id(s) {', '.join(map(str, unknown[:5]))}: not in the training "
                "catalog's item column; pass ids that appear in the training data"
            )
        return [self._label_to_id[str(item)] for item in history]

    def _check_ids(self, history: Sequence[int]) -> np.ndarray:
        if len(history) == 0:
            raise ExportError(
                "the history is empty; pass at least one item id (a user with no history has "
                "no hidden state to search with)"
            )
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in history):
            raise ExportError(f"item ids must be integers, got {list(history)[:5]!r}")
        ids = np.asarray(history, dtype=np.int64)
        bad = ids[(ids < 1) | (ids > self.n_items)]
        if bad.size:
            raise ExportError(
                f"unknown item id(s) {', '.join(map(str, bad[:5].tolist()))}: ids run from 1 to "
                f"{self.n_items} in this catalog"
            )
        return ids


def parse_history(text: str, labels: bool = False) -> list[int] | list[str]:
    """``"5,17,42"`` -> ``[5, 17, 42]`` (strings kept as they are when the catalog has labels).

    >>> parse_history("5, 17,42")
    [5, 17, 42]
    """
    tokens = [token.strip() for token in text.split(",")]
    if not any(tokens):
        raise ExportError(
            "the history is empty; pass item ids oldest first, e.g. --history 5,17,42"
        )
    if "" in tokens:
        raise ExportError(f"--history {text!r} has an empty entry; write ids like 5,17,42")
    if labels:
        return tokens
    bad = [token for token in tokens if not token.isdigit()]
    if bad:
        raise ExportError(
            f"unknown item id(s) {', '.join(bad[:5])}: item ids are positive integers, "
            "e.g. --history 5,17,42"
        )
    return [int(token) for token in tokens]


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an export folder, refused if missing or of another format version."""
    if not folder.is_dir():
        raise ExportError(
            f"export folder {folder} does not exist; create one with `annsample export RUN_DIR "
            f"{folder}`"
        )
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(
            f"{folder} has no {MANIFEST}; it is not an annsample export folder (create one with "
            "`annsample export RUN_DIR OUT_DIR`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON ({error}); export the run again") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise ExportError(
            f"{folder} has export format {found!r} but this annsample ({__version__}) reads "
            f"{FORMAT!r}; export the run again with this version"
        )
    return manifest


def _warn_on_version_change(saved: dict[str, str]) -> None:
    now = _versions()
    changed = [
        f"{name} {saved[name]} -> {now[name]}"
        for name in ("annsample", "torch", "faiss")
        if saved.get(name) != now[name]
    ]
    if changed:
        logger.warning("export was written with other versions (%s)", ", ".join(changed))
