"""The plug-in API: GenNi negatives from a refreshed item index, for any torch recommender.

Everything an engineer with their own model needs, and what annsample's own trainer uses for its
sampling step: a :class:`NegativeSampler` built from the item table (or from a callable returning
item vectors, for item towers) and a :class:`RefreshPolicy`; per step ``hidden states, positives,
histories -> negative ids, log q``; loss helpers; a step hook that refreshes the index and reports
staleness; ``state_dict`` / ``load_state_dict`` for checkpoints. Ids are 1-based everywhere: row 0
of an item table is padding and is never drawn.

Example (runs as a doctest):
    >>> import torch
    >>> from annsample import NegativeSampler, RefreshPolicy, sampled_logits, sampled_loss
    >>> items = torch.nn.Parameter(torch.randn(201, 8))  # (N+1, d), row 0 padding
    >>> sampler = NegativeSampler(items, num_negatives=2, candidates=20,
    ...                           refresh=RefreshPolicy(every=5), seed=0)
    >>> h = torch.randn(4, 3, 8, requires_grad=True)  # (B, T, d) hidden states
    >>> positives = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 3], [1, 2, 4]])  # 0 = padding
    >>> negatives = sampler.sample(h, positives, histories=positives)
    >>> tuple(negatives.ids.shape), tuple(negatives.log_q.shape)  # (P, k) for P real positions
    ((9, 2), (9, 2))
    >>> h_pos = h[negatives.mask]  # (P, d)
    >>> pos, neg = sampled_logits(h_pos, items[negatives.positives], items[negatives.ids])
    >>> loss = sampled_loss("sampled_softmax", pos, neg, negatives.log_q)
    >>> loss.backward()
    >>> stats = sampler.step()  # after optimizer.step(): refreshes on schedule
    >>> stats["index/staleness_steps"]
    1
    >>> sampler.close()
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from annsample.config import SAMPLED_LOSS_NAMES, SAMPLER_NAMES
from annsample.errors import SamplerError
from annsample.index import ItemIndex, default_nlist, exact_topk, recall_at_k
from annsample.losses import (
    bce_loss,
    corrected_logq_loss,
    gbce_loss,
    sampled_softmax_loss,
    scaled_ce_loss,
)
from annsample.refresh import IndexRefresher, RefreshSchedule, embedding_drift, schedule_for
from annsample.samplers import AnnSampler, Exclusions, Sampler, make_sampler

logger = logging.getLogger(__name__)

LOSS_NAMES = SAMPLED_LOSS_NAMES  # the losses sampled_loss computes (full_ce needs no sampler)

Histories = torch.Tensor | np.ndarray | tuple[Any, Any]
"""A padded (B, H) id array (0 = padding) or CSR ``(indptr (B+1,), items (nnz,))``."""


# --------------------------------------------------------------------------- refresh policy


@dataclass(frozen=True)
class RefreshPolicy:
    """When the index follows the item vectors, and whether training waits for it.

    Attributes:
        schedule: "steps" (every ``every`` steps), "epoch" (at ``step(epoch_end=True)``), "never",
            or "adaptive" (when drift or index recall, checked every ``check_every`` steps,
            crosses ``drift_threshold`` / ``recall_threshold``).
        every: steps between refreshes for "steps".
        retrain_every: every M-th refresh re-runs k-means warm-started (0 = never); the others
            re-add the current vectors under the old centroids.
        asynchronous: build on a background thread from a snapshot and swap atomically, so the
            step does not wait; the index then lags by the build time.
        drift_threshold, recall_threshold, check_every: the adaptive schedule's settings.
        retrain_below: "steps" only: a refresh is a retrain when the index recall, measured on
            ``step(probe_queries=...)`` just before it, is below this (0 = never).
        worker_threads: FAISS threads on the background thread (None = FAISS's default).
    """

    schedule: str = "steps"
    every: int = 100
    retrain_every: int = 10
    asynchronous: bool = False
    drift_threshold: float | None = None
    recall_threshold: float | None = None
    check_every: int = 50
    retrain_below: float = 0.0
    worker_threads: int | None = None

    def __post_init__(self) -> None:
        self.make_schedule()  # one clear ConfigError now, not at the first step

    def make_schedule(self) -> RefreshSchedule:
        """A fresh schedule object (see :mod:`annsample.refresh`) for this policy."""
        return schedule_for(
            self.schedule,
            every=self.every,
            retrain_every=self.retrain_every,
            drift_threshold=self.drift_threshold,
            recall_threshold=self.recall_threshold,
            check_every=self.check_every,
            retrain_below=self.retrain_below,
        )


# --------------------------------------------------------------------------- input checks


def _check_int_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise SamplerError(f"{name} must be a torch.Tensor of int64 ids, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise SamplerError(
            f"{name} must hold integer item ids (got dtype {x.dtype}); convert with .long()"
        )
    return x.long()


def _check_id_range(ids: torch.Tensor, name: str, low: int, n_items: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < low or hi > n_items:
        padding = "0 is padding, " if low == 0 else ""
        raise SamplerError(
            f"{name} holds ids {lo}..{hi} but must lie in {low}..{n_items} ({padding}ids are "
            f"1-based: item i is row i of the (N+1, d) item table); shift 0-based ids by +1"
        )


def _check_items(item_table: Any) -> torch.Tensor:
    if not isinstance(item_table, torch.Tensor) or item_table.dim() != 2:
        shape = tuple(item_table.shape) if isinstance(item_table, torch.Tensor) else None
        raise SamplerError(
            f"the item table must be a 2-D (N+1, d) float tensor with row 0 the padding row, got "
            f"{type(item_table).__name__} of shape {shape}"
        )
    if not item_table.dtype.is_floating_point:
        raise SamplerError(f"the item table must be floating point, got dtype {item_table.dtype}")
    if item_table.shape[0] < 2:
        raise SamplerError(
            f"the item table has {item_table.shape[0]} row(s); it needs row 0 (padding) and at "
            "least one item"
        )
    return item_table


def normalize_histories(
    histories: Histories, batch_size: int, n_items: int, device: torch.device | None = None
) -> torch.Tensor:
    """Each row's excluded items, sorted ascending, each once, right-padded with ``n_items + 1``.

    Args:
        histories: a padded (B, H) integer array whose rows list item ids in 1..N in any order,
            repeats allowed, 0 = padding; or CSR ``(indptr (B+1,), items (nnz,))`` with items in
            1..N, one row per batch row (numpy or torch).
        batch_size: B, the rows the hidden states have.
        n_items: catalog size N.

    Returns:
        (B, W) int64 with W = max(1, most distinct items in a row), on ``device``.

    Example:
        >>> normalize_histories(torch.tensor([[3, 1, 3, 0], [0, 0, 0, 0]]), 2, n_items=5)
        tensor([[1, 3],
                [6, 6]])
        >>> normalize_histories((np.array([0, 1, 3]), np.array([4, 2, 2])), 2, n_items=5)
        tensor([[4],
                [2]])
    """
    fill = n_items + 1
    if isinstance(histories, tuple):
        if len(histories) != 2:
            raise SamplerError("CSR histories must be a pair (indptr (B+1,), items (nnz,))")
        indptr = _check_int_tensor(histories[0], "histories indptr").to(device)
        items = _check_int_tensor(histories[1], "histories items").to(device)
        if indptr.dim() != 1 or items.dim() != 1:
            raise SamplerError("CSR histories need 1-D indptr (B+1,) and 1-D items (nnz,)")
        if indptr.shape[0] != batch_size + 1:
            raise SamplerError(
                f"CSR histories indptr has {indptr.shape[0]} entries but the batch has "
                f"{batch_size} rows; it needs B+1 = {batch_size + 1} (one row per batch row)"
            )
        lengths = indptr.diff()
        if int(indptr[0]) != 0 or int(indptr[-1]) != items.shape[0] or bool((lengths < 0).any()):
            raise SamplerError(
                f"CSR histories indptr must start at 0, never decrease and end at len(items) = "
                f"{items.shape[0]}; got {indptr[0]}..{indptr[-1]}"
            )
        _check_id_range(items, "histories items", 1, n_items)
        width = max(int(lengths.max()) if batch_size else 0, 1)
        offsets = torch.arange(width, device=indptr.device)
        inside = offsets[None, :] < lengths[:, None]  # (B, W)
        padded = torch.full((batch_size, width), fill, dtype=torch.int64, device=indptr.device)
        padded[inside] = items[(indptr[:-1, None] + offsets)[inside]]
    else:
        padded = _check_int_tensor(histories, "histories").to(device)
        if padded.dim() != 2 or padded.shape[0] != batch_size:
            raise SamplerError(
                f"padded histories must be (B, H) = ({batch_size}, H), got shape "
                f"{tuple(padded.shape)}; pass CSR (indptr, items) for ragged rows"
            )
        _check_id_range(padded, "histories", 0, n_items)
        padded = torch.where(padded == 0, fill, padded)
        if padded.shape[1] == 0:
            padded = torch.full((batch_size, 1), fill, dtype=torch.int64, device=padded.device)
    # rows already ascending and repeat-free (fill at the end) skip the sorts: one pass to check
    tidy = bool(((padded[:, 1:] > padded[:, :-1]) | (padded[:, 1:] == fill)).all())
    if not tidy:
        # sort, blank out repeats, sort again: every row ascending, each item once, fill at the end
        padded = padded.sort(dim=1).values
        repeat = torch.zeros_like(padded, dtype=torch.bool)
        repeat[:, 1:] = padded[:, 1:] == padded[:, :-1]
        padded = padded.masked_fill(repeat, fill).sort(dim=1).values
    width = max(int((padded <= n_items).sum(dim=1).max()) if batch_size else 0, 1)
    return padded[:, :width].contiguous()


# --------------------------------------------------------------------------- one sampling step


@dataclass(frozen=True)
class SampledNegatives:
    """Negatives for the P real positions of a batch (those whose positive is not 0).

    Attributes:
        ids: (P, k) int64 negative item ids in 1..N.
        log_q: (P, k) float32 log probability of drawing each id under the sampler's proposal
            (what :func:`sampled_loss` needs for the logQ correction).
        mask: bool, the shape of ``positives`` as given ((B, T) or (B,)): True at the P real
            positions, in the order of ``ids`` (``hidden[mask]`` gives their (P, d) states).
        positives: (P,) int64 positive item of each real position.
    """

    ids: torch.Tensor
    log_q: torch.Tensor
    mask: torch.Tensor
    positives: torch.Tensor


def sample_negatives(
    sampler: Sampler,
    hidden: torch.Tensor,
    positives: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    generator: torch.Generator,
    histories: Histories | None = None,
) -> SampledNegatives:
    """Draw ``k`` negatives for every real position of a batch with any annsample sampler.

    The functional form of :meth:`NegativeSampler.sample`, for callers that own their sampler,
    index and refresh (annsample's trainer is one). Nothing here takes gradients.

    Args:
        sampler: an annsample sampler (``annsample.samplers``: uniform, popularity, exact, pool,
            dns, ann, in_batch, mixed, tron). The in-batch ones draw from ``positives`` itself:
            the positives of the batch's real positions.
        hidden: (B, T, d) or (B, d) float hidden states.
        positives: (B, T) or (B,) int64 positive ids in 1..N; with (B, T), 0 marks a padding
            position, which gets no negatives. Each position's positive is never drawn.
        item_table: (N+1, d) float item vectors the sampler scores with, row 0 padding.
        k: negatives per position.
        generator: the ``torch.Generator`` all randomness comes from (on the tensors' device).
        histories: items each batch row must not draw (see :func:`normalize_histories`), or None
            to exclude only the positive.

    Returns:
        :class:`SampledNegatives` with (P, k) ids and log q.

    With (B, T) states, a sequence-level query (``AnnSampler(query="sequence")``) is each row's
    state at its last real position.
    """
    item_table = _check_items(item_table)
    n_items, dim = item_table.shape[0] - 1, item_table.shape[1]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise SamplerError(f"hidden states must be a (B, T, d) or (B, d) tensor, got {shape}")
    if not hidden.dtype.is_floating_point:
        raise SamplerError(f"hidden states must be floating point, got dtype {hidden.dtype}")
    if hidden.shape[-1] != dim:
        raise SamplerError(
            f"hidden states have d = {hidden.shape[-1]} but the item vectors have d = {dim}; "
            "the sampler scores h·e_j, so both must live in the same space"
        )
    positives = _check_int_tensor(positives, "positives")
    if tuple(positives.shape) != tuple(hidden.shape[:-1]):
        raise SamplerError(
            f"positives have shape {tuple(positives.shape)} but hidden states "
            f"{tuple(hidden.shape)}; positives must be hidden.shape[:-1] (one id per position)"
        )
    _check_id_range(positives, "positives", 0 if hidden.dim() == 3 else 1, n_items)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SamplerError(f"k (negatives per position) must be a positive integer, got {k!r}")
    hidden3 = hidden if hidden.dim() == 3 else hidden[:, None]  # (B, T, d)
    positives2 = positives if positives.dim() == 2 else positives[:, None]  # (B, T)
    mask = positives2 > 0
    h_pos = hidden3[mask].detach()  # (P, d)
    if not bool(torch.isfinite(h_pos).all()):
        raise SamplerError(
            "hidden states hold NaN or inf at real positions; the model diverged (lower the "
            "learning rate) or the inputs hold NaN"
        )
    pos = positives2[mask]  # (P,)
    row = mask.nonzero()[:, 0]  # (P,) batch row of each position
    B, T = positives2.shape
    if histories is None:
        history = torch.empty((B, 0), dtype=torch.int64, device=hidden.device)
    else:
        history = normalize_histories(histories, B, n_items, hidden.device)
    if pos.shape[0] == 0:
        empty = torch.empty((0, k), dtype=torch.int64, device=hidden.device)
        return SampledNegatives(empty, empty.float(), mask.view_as(positives), pos)
    # the state at each row's last real position (the last column with left padding)
    last = (mask * torch.arange(1, T + 1, device=mask.device)).argmax(dim=1)
    sequence_queries = hidden3[torch.arange(B, device=hidden.device), last].detach()  # (B, d)
    exclusions = Exclusions(history, row, pos, n_items)
    with torch.no_grad():
        drawn = sampler.sample(
            h_pos, item_table.detach(), exclusions, k, generator, sequence_queries=sequence_queries
        )
    return SampledNegatives(drawn.ids, drawn.log_q, mask.view_as(positives), pos)


# --------------------------------------------------------------------------- losses


def sampled_logits(
    hidden: torch.Tensor, positive_vectors: torch.Tensor, negative_vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dot-product logits of the positives and the sampled negatives.

    Args:
        hidden: (P, d) states of the real positions (``hidden[negatives.mask]``).
        positive_vectors: (P, d) item vectors of the positives.
        negative_vectors: (P, k, d) item vectors of the negatives.

    Returns:
        pos_logits (P,) and neg_logits (P, k).
    """
    if hidden.dim() != 2 or positive_vectors.shape != hidden.shape:
        raise SamplerError(
            f"sampled_logits needs hidden (P, d) and positive_vectors (P, d) of the same shape, "
            f"got {tuple(hidden.shape)} and {tuple(positive_vectors.shape)}"
        )
    if negative_vectors.dim() != 3 or negative_vectors.shape[::2] != hidden.shape:
        raise SamplerError(
            f"sampled_logits needs negative_vectors (P, k, d) = ({hidden.shape[0]}, k, "
            f"{hidden.shape[1]}), got {tuple(negative_vectors.shape)}"
        )
    pos_logits = (hidden * positive_vectors).sum(dim=1)  # (P,)
    neg_logits = torch.einsum("pd,pkd->pk", hidden, negative_vectors)  # (P, k)
    return pos_logits, neg_logits


def sampled_loss(
    name: str,
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    log_q: torch.Tensor | None = None,
    *,
    n_items: int | None = None,
    gbce_t: float = 0.75,
    sce_scale: float = 100.0,
    corrected_logq: bool = False,
) -> torch.Tensor:
    """A sampled-negative loss over P positions (see :mod:`annsample.losses`).

    Args:
        name: "bce" (SASRec / GenNi), "sampled_softmax" (logQ-corrected when ``log_q`` is
            given), "gbce" (gSASRec; needs ``n_items``) or "scaled_ce" (SCE: the negatives'
            sum scaled by ``sce_scale``).
        pos_logits: (P,) float; neg_logits: (P, k) float.
        log_q: (P, k) log proposal probability of each negative (``SampledNegatives.log_q``);
            only "sampled_softmax" reads it.
        n_items: catalog size N, for "gbce".
        gbce_t: gSASRec's calibration t in [0, 1].
        sce_scale: SCE's α > 0, for "scaled_ce".
        corrected_logq: "sampled_softmax" with Khrylchenko et al.'s corrected logQ
            (:func:`annsample.losses.corrected_logq_loss`); needs ``log_q``.
    """
    if name not in LOSS_NAMES:
        raise SamplerError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    if pos_logits.dim() != 1 or neg_logits.dim() != 2 or neg_logits.shape[0] != pos_logits.shape[0]:
        raise SamplerError(
            f"losses take pos_logits (P,) and neg_logits (P, k), got {tuple(pos_logits.shape)} "
            f"and {tuple(neg_logits.shape)}"
        )
    if corrected_logq and name != "sampled_softmax":
        raise SamplerError(
            f"corrected_logq=True corrects a sampled softmax's logQ; loss {name!r} has none "
            "(use name='sampled_softmax')"
        )
    if name == "scaled_ce":
        if not math.isfinite(sce_scale) or sce_scale <= 0:
            raise SamplerError(f"scaled_ce needs sce_scale > 0 (finite), got {sce_scale!r}")
        return scaled_ce_loss(pos_logits, neg_logits, sce_scale)
    if name == "bce":
        return bce_loss(pos_logits, neg_logits)
    if name == "gbce":
        if n_items is None:
            raise SamplerError(
                "gbce needs n_items (the catalog size N): sampled_loss(..., n_items=N)"
            )
        return gbce_loss(pos_logits, neg_logits, n_items, gbce_t)
    if log_q is not None and log_q.shape != neg_logits.shape:
        raise SamplerError(
            f"log_q has shape {tuple(log_q.shape)} but neg_logits {tuple(neg_logits.shape)}"
        )
    if corrected_logq:
        if log_q is None:
            raise SamplerError(
                "corrected_logq=True needs log_q, the (P, k) log probability each negative was "
                "drawn with (SampledNegatives.log_q)"
            )
        return corrected_logq_loss(pos_logits, neg_logits, log_q)
    return sampled_softmax_loss(pos_logits, neg_logits, log_q)


# --------------------------------------------------------------------------- the sampler


class NegativeSampler:
    """GenNi negatives for your model, from an item index that follows your item vectors.

    Build it once from the item table, or from a callable that encodes the catalog; call
    :meth:`sample` each step and :meth:`step` after each optimiser step (it refreshes the index
    on the :class:`RefreshPolicy`'s schedule and returns step-keyed staleness figures).

    Args:
        items: the (N+1, d) float item table the model trains (e.g. ``model.items.weight``, the
            Parameter itself, so the sampler reads its current values), row 0 padding; or a
            callable ``() -> (N+1, d)`` that encodes the whole catalog (an item tower). With a
            callable the catalog is re-encoded, under ``torch.no_grad``, at construction and at
            every refresh, and the sampler scores with the vectors of the latest refresh (what
            ANCE-style training does); ``stats()["index/encode_seconds"]`` is that cost.
        sampler: "ann" (the product: IVF top-``candidates``, rescored, GenNi over them), or
            "exact", "exact_gumbel", "pool", "dns", "uniform", "popularity", "in_batch",
            "mixed", "tron" (baselines).
        num_negatives: k per position (default for :meth:`sample`).
        alpha: GenNi inverse temperature; candidates: K; epsilon: uniform mass;
            tail_samples: uniform items estimating the mass outside the candidates;
            query: "position" or "sequence" (see :class:`annsample.samplers.AnnSampler`).
        pool_size: M for "pool" and "dns". popularity: (N+1,) counts for "popularity"; beta: its
            exponent.
        in_batch_negatives: of each call's k, the negatives "mixed" draws from the batch (the
            rest uniform; k must exceed it), or "tron"'s in-batch candidates.
        uniform_candidates: "tron"'s uniform candidates shared by the batch (it keeps the k
            best-scoring of all its candidates).
        nlist, nprobe: IVF lists and lists probed (None: about sqrt(N), and nlist / 8).
        metric, backend: see :class:`annsample.index.ItemIndex`.
        refresh: the refresh policy (default: re-add every 100 steps, retrain every 10th).
        seed: seeds the sampler's generator and k-means.
    """

    def __init__(
        self,
        items: torch.Tensor | Callable[[], torch.Tensor],
        *,
        sampler: str = "ann",
        num_negatives: int = 1,
        alpha: float = 1.0,
        candidates: int = 200,
        epsilon: float = 0.05,
        tail_samples: int = 0,
        query: str = "position",
        pool_size: int = 1000,
        popularity: np.ndarray | torch.Tensor | None = None,
        beta: float = 1.0,
        in_batch_negatives: int = 127,
        uniform_candidates: int = 16384,
        nlist: int | None = None,
        nprobe: int | None = None,
        metric: str = "l2_augmented",
        backend: str = "auto",
        refresh: RefreshPolicy | None = None,
        seed: int = 0,
    ) -> None:
        if sampler not in SAMPLER_NAMES:
            raise SamplerError(
                f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}"
            )
        if (
            isinstance(num_negatives, bool)
            or not isinstance(num_negatives, int)
            or num_negatives < 1
        ):
            raise SamplerError(f"num_negatives must be a positive integer, got {num_negatives!r}")
        self._encode: Callable[[], torch.Tensor] | None = None
        self._items: torch.Tensor | None = None
        self._encode_seconds = 0.0
        self._shape: tuple[int, int] | None = (
            None  # the tower's output shape, fixed at the first call
        )
        if isinstance(items, torch.Tensor):
            self._items = _check_items(items)
            table = self._items.detach()
        elif callable(items):
            self._encode = items
            table = self._encoded()
        else:
            raise SamplerError(
                "items must be the (N+1, d) item table tensor or a callable returning it, got "
                f"{type(items).__name__}"
            )
        self._table = table if self._encode is not None else None  # the tower's latest encoding
        self.n_items, self.dim = table.shape[0] - 1, table.shape[1]
        self.name = sampler
        self.num_negatives = num_negatives
        self.policy = refresh or RefreshPolicy()
        self.generator = torch.Generator(device=table.device).manual_seed(seed)
        self._settings = {
            "sampler": sampler,
            "n_items": self.n_items,
            "dim": self.dim,
            "refresh": asdict(self.policy),
        }
        self._step = 0
        self.refresher: IndexRefresher | None = None
        self.schedule: RefreshSchedule | None = None
        self._built: torch.Tensor | None = None
        if sampler == "ann":
            if candidates > self.n_items:
                raise SamplerError(
                    f"candidates={candidates} is more than the catalog's {self.n_items} items; "
                    f"lower it to at most {self.n_items}"
                )
            nlist = nlist or default_nlist(self.n_items)
            nprobe = nprobe or max(1, nlist // 8)

            def factory() -> ItemIndex:
                return ItemIndex(
                    self.dim, nlist=nlist, nprobe=nprobe, backend=backend, metric=metric, seed=seed
                )

            self.refresher = IndexRefresher(
                factory,
                asynchronous=self.policy.asynchronous,
                worker_threads=self.policy.worker_threads,
            )
            self.schedule = self.policy.make_schedule()
            xb = self._snapshot(table)
            ids = torch.arange(1, self.n_items + 1, device=table.device)
            self.refresher.build(xb, step=0, ids=ids)
            self._built = xb if self._tracks_drift() else None
            self.core: Sampler = make_sampler(
                "ann",
                alpha=alpha,
                candidates=candidates,
                epsilon=epsilon,
                query=query,
                tail_samples=tail_samples,
                index_source=self.refresher,
            )
        else:
            self.core = make_sampler(
                sampler,
                alpha=alpha,
                pool_size=pool_size,
                popularity=popularity,
                beta=beta,
                in_batch_negatives=in_batch_negatives,
                uniform_candidates=uniform_candidates,
            )

    # ----------------------------------------------------------------------------- per step

    def item_table(self) -> torch.Tensor:
        """(N+1, d) the vectors the sampler scores with now (no grad)."""
        if self._items is not None:
            return self._items.detach()
        assert self._table is not None
        return self._table

    def sample(
        self,
        hidden: torch.Tensor,
        positives: torch.Tensor,
        histories: Histories | None = None,
        k: int | None = None,
    ) -> SampledNegatives:
        """Negatives for every real position of a batch.

        Args:
            hidden: (B, T, d) or (B, d) float hidden states (gradients are not taken).
            positives: (B, T) or (B,) int64 positive ids in 1..N; with (B, T), 0 marks padding
                positions, which get no negatives.
            histories: items each row must not draw besides its positives: a padded (B, H)
                array (0 = padding) or CSR ``(indptr (B+1,), items)``; order and repeats do not
                matter. None excludes only the positive.
            k: negatives per position (default ``num_negatives``).

        Returns:
            :class:`SampledNegatives`: ids and log q (P, k), and the (B, T) / (B,) mask of the
            P real positions.
        """
        return sample_negatives(
            self.core,
            hidden,
            positives,
            self.item_table(),
            self.num_negatives if k is None else k,
            self.generator,
            histories,
        )

    def step(
        self,
        epoch_end: bool = False,
        probe_queries: torch.Tensor | None = None,
        stats: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """The step hook: call once after every optimiser step (and once with ``epoch_end=True``
        after an epoch's last step, for the "epoch" schedule).

        Refreshes the index when the policy says so (blocking, or handing a snapshot to the
        background thread), and surfaces a background failure.

        Args:
            epoch_end: this call marks the end of an epoch; the step count does not advance.
            probe_queries: (Q, d) hidden states to measure index recall on, when the adaptive
                schedule checks recall (see :meth:`staleness`).
            stats: figures you measured yourself ("drift", "recall") for the adaptive schedule.

        Returns:
            ``index/...`` figures: version, staleness_steps (steps since the vectors the index
            holds), refresh counts and seconds, and ``index/refresh`` (None, "re_add" or
            "retrain") for this call.
        """
        if not epoch_end:
            self._step += 1
        step = self._step
        if self.refresher is None or self.schedule is None:
            return {"step": step, "index/refresh": None}
        self.refresher.poll()
        measured = dict(stats or {})
        if self.schedule.needs_stats(step):
            if "drift" not in measured and self._built is not None:
                now = self._snapshot(self._current(True))  # a tower is re-encoded to measure it
                measured["drift"] = embedding_drift(now, self._built)
            reads_recall = self.policy.recall_threshold is not None or self.policy.retrain_below
            if "recall" not in measured and reads_recall:
                if probe_queries is None:
                    which, every = (
                        ("recall_threshold", self.policy.check_every)
                        if self.policy.recall_threshold is not None
                        else ("retrain_below", self.policy.every)
                    )
                    raise SamplerError(
                        f"RefreshPolicy({which}=...) checks index recall every "
                        f"{every} steps, and step {step} is one: pass "
                        "step(probe_queries=...) with (Q, d) hidden states of held-out users, or "
                        "stats={'recall': ...}"
                    )
                measured["recall"] = self.staleness(probe_queries)["index/recall@k"]
        kind = self.schedule.should_refresh(step, epoch_end, measured)
        if kind is not None:
            xb = self._snapshot(self._current(True))
            if self._tracks_drift():
                self._built = xb
            self.refresher.request(kind, xb, step)
        return {
            "step": step,
            **self.stats(),
            "index/refresh": kind,
            **{f"index/{key}": value for key, value in measured.items()},
        }

    def refresh(self, kind: str = "re_add") -> None:
        """Refresh the index now from the current vectors ("re_add" or "retrain")."""
        if self.refresher is None:
            raise SamplerError(f"sampler {self.name!r} has no index to refresh; use sampler='ann'")
        xb = self._snapshot(self._current(True))
        if self._tracks_drift():
            self._built = xb
        self.refresher.request(kind, xb, self._step)

    @torch.no_grad()
    def staleness(self, probe_queries: torch.Tensor) -> dict[str, float]:
        """How far the index lags the current vectors, on probe hidden states.

        Args:
            probe_queries: (Q, d) float hidden states (e.g. the last states of held-out users).

        Returns:
            ``index/recall@k``: share of the exact top-K under the current vectors that the index
            returns (K = candidates), and ``index/staleness_steps``. With a callable ``items``
            the current vectors are the latest encoding.
        """
        if self.refresher is None or not isinstance(self.core, AnnSampler):
            raise SamplerError(f"sampler {self.name!r} has no index; staleness needs sampler='ann'")
        if probe_queries.dim() != 2 or probe_queries.shape[1] != self.dim:
            raise SamplerError(
                f"probe_queries must be (Q, {self.dim}), got {tuple(probe_queries.shape)}"
            )
        xq = probe_queries.detach().float().contiguous()
        K = self.core.candidates
        xb = self.item_table()[1:].float()
        _, I_exact = exact_topk(xq, xb, K)
        _, I_index = self.refresher.current().search(xq, K)
        return {
            "index/recall@k": recall_at_k(I_index, I_exact + 1),
            "index/staleness_steps": self.stats()["index/staleness_steps"],
        }

    def stats(self) -> dict[str, Any]:
        """``index/...`` refresh and staleness figures at the current step (empty without an index)."""
        if self.refresher is None:
            return {}
        return {
            **self.refresher.stats(self._step),
            "index/encode_seconds": self._encode_seconds,
        }

    @property
    def step_count(self) -> int:
        """Optimiser steps counted by :meth:`step`."""
        return self._step

    def wait(self) -> None:
        """Block until no background refresh is running or queued."""
        if self.refresher is not None:
            self.refresher.wait()

    def close(self) -> None:
        """Stop the background refresh thread (idempotent); re-raises its failure, if any."""
        if self.refresher is not None:
            self.refresher.close()

    def __enter__(self) -> NegativeSampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume sampling exactly: step, generator, index and refresh counters,
        the schedule's refresh count, and with an item tower its latest encoding. A refresh still
        running on the background thread is not included (call :meth:`wait` first to keep it)."""
        state: dict[str, Any] = {
            "settings": self._settings,
            "step": self._step,
            "generator": self.generator.get_state(),
            "table": self._table,
            "built": self._built,
            "encode_seconds": self._encode_seconds,
            "refresher": None,
            "schedule_refreshes": None,
        }
        if self.refresher is not None:
            state["refresher"] = self.refresher.state_dict()
            state["schedule_refreshes"] = getattr(self.schedule, "refreshes", None)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a sampler built with the same settings."""
        if state.get("settings") != self._settings:
            raise SamplerError(
                f"this state belongs to a sampler with {state.get('settings')}, not "
                f"{self._settings}; build the NegativeSampler with the settings it was saved from"
            )
        self._step = int(state["step"])
        self.generator.set_state(state["generator"])
        self._encode_seconds = float(state["encode_seconds"])
        if self._encode is not None:
            self._table = state["table"]
        self._built = state["built"]
        if self.refresher is not None:
            device = self.item_table().device
            self.refresher.load_state_dict(state["refresher"], device)
            if state["schedule_refreshes"] is not None:
                self.schedule.refreshes = state["schedule_refreshes"]

    # ----------------------------------------------------------------------------- internals

    def _tracks_drift(self) -> bool:
        return self.policy.schedule == "adaptive" and self.policy.drift_threshold is not None

    def _encoded(self) -> torch.Tensor:
        """Run the item tower over the catalog; checks and times it."""
        assert self._encode is not None
        start = time.perf_counter()
        with torch.no_grad():
            table = self._encode()
        self._encode_seconds = time.perf_counter() - start
        table = _check_items(table).detach()
        if self._shape is None:
            self._shape = tuple(table.shape)
        elif tuple(table.shape) != self._shape:
            raise SamplerError(
                f"the item encoder returned {tuple(table.shape)} but returned {self._shape} "
                "before; the catalog must keep its size (build a new NegativeSampler for a new one)"
            )
        return table

    def _current(self, reencode: bool) -> torch.Tensor:
        """(N+1, d) the current vectors; a tower is re-encoded when ``reencode``."""
        if self._encode is not None and reencode:
            self._table = self._encoded()
        return self.item_table()

    def _snapshot(self, table: torch.Tensor) -> torch.Tensor:
        """(N, d) float32 copy without the padding row, checked finite (what the index holds)."""
        xb = table.detach()[1:].float().clone()
        if not bool(torch.isfinite(xb).all()):
            raise SamplerError(
                f"the item vectors hold NaN or inf at step {self._step}, so the index is not "
                "built from them; the model diverged (lower the learning rate)"
            )
        return xb
