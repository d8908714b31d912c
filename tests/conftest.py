"""Shared test setup: one torch thread, because the suite shares two cores with training runs, and
the IVF-shaped data the index tests share."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


D_MODEL = 16


def gaussian_mixture(
    n: int, d: int = D_MODEL, clusters: int = 32, seed: int = 0, spread: float = 0.35
) -> torch.Tensor:
    """(n, d) float32 rows around `clusters` random centres: IVF-shaped data, unlike uniform noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    members = torch.randint(0, clusters, (n,), generator=g)
    return centres[members] + spread * torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def mixture() -> torch.Tensor:
    return gaussian_mixture(4000)


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return gaussian_mixture(200, seed=1)


def with_bad_rows(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (n >= 8, d >= 2) with NaN in row 3 and inf in row 7."""
    x = x.clone()
    x[3, 0] = float("nan")
    x[7, 1] = float("inf")
    return x
