"""Data preparation for a run: the dataset a config names, as the arrays training needs.

``prepare_data(config)`` loads the dataset (a file or the synthetic catalog), splits it leave-one-out
and returns the training tensors, the per-user training histories (CSR) and item popularity;
``check_sampler_fits`` refuses sampler settings the catalog cannot satisfy before any file is
written; ``probe_set`` is the fixed validation probe the staleness monitor queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from annsample import data as data_mod
from annsample.config import RunConfig
from annsample.errors import ConfigError, DataError, ItemIndexError, SamplerError
from annsample.evaluate import eval_users
from annsample.samplers import Exclusions


@dataclass
class Prepared:
    """Everything derived from the dataset that training and evaluation need."""

    split: data_mod.LeaveOneOutSplit
    train_inputs: np.ndarray  # (U', T) users with at least one training position
    train_targets: np.ndarray  # (U', T)
    train_users: np.ndarray  # (U',) row of each training sample in the split
    history_indptr: np.ndarray
    history_items: np.ndarray
    popularity: np.ndarray
    catalog: Any = None  # the SyntheticCatalog (for its oracle) when data.path == "synthetic"

    @property
    def n_items(self) -> int:
        return self.split.n_items

    def histories(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(B, H) int64 training histories of the rows ``batch`` (B,) of ``train_inputs``,
        0 = padding."""
        users = self.train_users[batch.numpy()]
        rows = data_mod.pad_rows(self.history_indptr, self.history_items, users, 0)
        return torch.as_tensor(rows, device=device)


def prepare_data(config: RunConfig) -> Prepared:
    """Load the dataset named by the config and build the leave-one-out tensors."""
    if "\0" in config.data.path:
        raise DataError(f"data.path {config.data.path!r} contains a NUL byte; fix the path")
    catalog = None
    dc = config.data
    if dc.path == "synthetic":
        from annsample.scale import check_memory
        from annsample.synthetic import SyntheticParams, synthetic_catalog

        users = SyntheticParams(dc.synthetic_items, dc.synthetic_users).resolved_users()
        check_memory(config, dc.synthetic_items, users)
        catalog, dataset = synthetic_catalog(
            n_items=dc.synthetic_items, n_users=dc.synthetic_users, seed=dc.synthetic_seed
        )
    else:
        table = dc.format == "interactions" or (
            dc.format == "auto" and Path(dc.path).suffix.lower() in (".csv", ".tsv")
        )
        columns = {"user_col": dc.user_col, "item_col": dc.item_col, "time_col": dc.time_col}
        dataset = data_mod.load_dataset(dc.path, fmt=dc.format, **(columns if table else {}))
    split = data_mod.leave_one_out(dataset)
    inputs, targets = data_mod.training_tensors(split, dc.max_len)
    users = np.flatnonzero((targets > 0).any(axis=1))
    indptr, items = data_mod.history_csr(split, "train")
    return Prepared(
        split=split,
        train_inputs=inputs[users],
        train_targets=targets[users],
        train_users=users,
        history_indptr=indptr,
        history_items=items,
        popularity=data_mod.item_popularity(split),
        catalog=catalog,
    )


def check_sampler_fits(config: RunConfig, prepared: Prepared) -> None:
    """Refuse, before any file is written, sampler settings the catalog cannot satisfy."""
    s, n_items = config.sampler, prepared.n_items
    if config.loss.name == "full_ce":
        return
    if s.name == "ann":
        from annsample.index import resolve_nlist_nprobe

        try:
            resolve_nlist_nprobe(s.index.nlist, s.index.nprobe, n_items)
        except ItemIndexError as error:
            raise ConfigError(f"sampler.index: {error}") from None
    if s.name == "ann" and s.candidates > n_items:
        raise ConfigError(
            f"sampler.candidates={s.candidates} is more than the catalog's {n_items} items; "
            f"lower it to at most {n_items} (a few hundred is typical)"
        )
    if s.exclude_history:
        seen = np.diff(prepared.history_indptr)[prepared.train_users]  # distinct items per user
        full = int((seen >= n_items).sum())
        if full:
            raise SamplerError(
                f"{full} user(s) have interacted with all {n_items} items, so no negative can be "
                "drawn for them; drop those users from the dataset or set "
                "sampler.exclude_history=false"
            )


def probe_set(
    prepared: Prepared, config: RunConfig, device: torch.device
) -> tuple[torch.Tensor, Exclusions]:
    """The staleness probe: (Q, T) validation inputs of ``sampler.index.probe_queries`` fixed
    users, and their exclusions (history and validation target)."""
    from annsample.staleness import probe_exclusions

    split = prepared.split
    users = eval_users(split.n_users, config.sampler.index.probe_queries, config.seed + 7)
    users = np.arange(split.n_users) if users is None else users
    inputs, targets = data_mod.eval_tensors(split, "valid", config.data.max_len)
    indptr, items = data_mod.history_csr(split, "valid")
    history = torch.as_tensor(
        data_mod.pad_rows(indptr, items, users, split.n_items + 1), device=device
    )
    exclusions = probe_exclusions(
        torch.as_tensor(targets[users], device=device), history, split.n_items
    )
    return torch.as_tensor(inputs[users], device=device), exclusions
