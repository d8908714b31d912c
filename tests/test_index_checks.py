"""The input checks the index modules share: each refusal names the argument and how to fix it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import with_bad_rows

from annsample.errors import ItemIndexError
from annsample.index.checks import as_int, check_2d, check_matrix


@pytest.mark.parametrize(
    ("make_xb", "message"),
    [
        (
            lambda x: x.numpy(),
            r"xb must be a torch.Tensor, got ndarray; wrap it with torch.from_numpy",
        ),
        (lambda x: x[0], r"xb must be 2-D \(rows, d\), got shape \(16,\)"),
        (
            lambda x: x.double(),
            r"xb must be float32, got torch.float64; convert it with xb.float\(\)",
        ),
        (with_bad_rows, r"xb has 2 of 4000 rows with NaN or inf \(first at row 3\)"),
        (lambda x: x.abs() * 3e37, "overflows float32"),
    ],
)
def test_check_matrix_names_what_is_wrong(make_xb, message, mixture):
    with pytest.raises(ItemIndexError, match=message):
        check_matrix(make_xb(mixture), "xb", 16)


def test_check_matrix_returns_a_detached_tensor_and_checks_dim_only_when_given(mixture):
    x = mixture[:10].clone().requires_grad_()
    checked = check_matrix(x, "xb", None)  # any width
    assert not checked.requires_grad and torch.equal(checked, mixture[:10])
    with pytest.raises(ItemIndexError, match="xb has d=16 columns but the index was created"):
        check_matrix(x, "xb", 8)


def test_as_int_takes_int_likes_and_refuses_bools_and_floats():
    assert as_int(np.int64(7), "k") == 7 and as_int(torch.tensor(3), "k") == 3
    with pytest.raises(ItemIndexError, match="k must be an integer, got True"):
        as_int(True, "k")
    with pytest.raises(ItemIndexError, match="k must be an integer, got float 2.0"):
        as_int(2.0, "k")


def test_check_2d_names_the_expected_shape():
    x = torch.zeros(3, 2, dtype=torch.int64)
    assert check_2d(x, "I", "(Q, k)") is x
    with pytest.raises(ItemIndexError, match=r"I must be a 2-D \(Q, k\) tensor, got \(3,\)"):
        check_2d(torch.zeros(3), "I", "(Q, k)")
    with pytest.raises(ItemIndexError, match=r"I must be a 2-D \(Q, k\) tensor, got list"):
        check_2d([[1]], "I", "(Q, k)")
