"""Input checks shared by the index modules: integers, and 2-D float32 tensors of finite values."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from annsample.errors import ItemIndexError


def as_int(value: Any, name: str) -> int:
    """An int from an int-like value (not bool), else ItemIndexError."""
    if isinstance(value, bool):
        raise ItemIndexError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ItemIndexError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None


def check_2d(x: Any, name: str, shape: str) -> torch.Tensor:
    """``x`` if it is a 2-D tensor, else ItemIndexError naming the ``shape`` expected (``"(N, d)"``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ItemIndexError(f"{name} must be a 2-D {shape} tensor, got {found}")
    return x


def check_matrix(x: Any, name: str, dim: int | None) -> torch.Tensor:
    """Validate a (rows, dim) float32 tensor of finite values and return it detached."""
    if not isinstance(x, torch.Tensor):
        hint = "; wrap it with torch.from_numpy(...)" if isinstance(x, np.ndarray) else ""
        raise ItemIndexError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.dim() != 2:
        raise ItemIndexError(
            f"{name} must be 2-D (rows, d), got shape {tuple(x.shape)}; "
            f"for a single vector use {name}[None]"
        )
    if x.dtype != torch.float32:
        raise ItemIndexError(
            f"{name} must be float32, got {x.dtype}; convert it with {name}.float()"
        )
    if dim is not None and x.shape[1] != dim:
        raise ItemIndexError(
            f"{name} has d={x.shape[1]} columns but the index was created with dim={dim}"
        )
    x = x.detach()
    # One cheap pass: a row sum is non-finite iff the row has NaN/inf (or overflows float32).
    suspect = ~torch.isfinite(x.sum(dim=1))
    if bool(suspect.any()):
        rows = suspect.nonzero().flatten()
        bad = rows[~torch.isfinite(x[rows]).all(dim=1)]
        if bad.numel():
            raise ItemIndexError(
                f"{name} has {bad.numel()} of {x.shape[0]} rows with NaN or inf "
                f"(first at row {int(bad[0])}); the embeddings diverged or were not initialised"
            )
        raise ItemIndexError(
            f"{name} has {rows.numel()} rows whose values are so large their sum overflows "
            f"float32 (first at row {int(rows[0])}); rescale the embeddings"
        )
    return x
