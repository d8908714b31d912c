"""annsample.errors: every user error is an AnnsampleError (what the CLI prints as one line), and
each keeps the builtin base callers may already catch."""

from __future__ import annotations

import inspect

import pytest

from annsample import errors


def test_every_error_of_the_module_is_an_annsample_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)]
    assert len(classes) == 8
    assert all(issubclass(c, errors.AnnsampleError) for c in classes)


@pytest.mark.parametrize(
    ("error", "base"),
    [
        (errors.DataError, ValueError),
        (errors.ConfigError, ValueError),
        (errors.SamplerError, ValueError),
        (errors.ItemIndexError, ValueError),
        (errors.CheckpointError, errors.RunError),
        (errors.NumericalError, ArithmeticError),
    ],
)
def test_errors_keep_the_base_callers_catch(error, base):
    assert issubclass(error, base)
    with pytest.raises(base, match="the message"):
        raise error("the message")
