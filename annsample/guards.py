"""Stops for the training loop: the wall-clock budget, and NaN / inf before an update is applied."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from annsample.errors import NumericalError


class Budget:
    """``train.max_seconds`` of wall clock for the training loop (0 = none); a resumed run keeps
    counting from ``already_spent`` seconds.

    ``agree`` turns one process's answer into the answer every process acts on (under DDP: true
    when any rank's clock ran out), so all ranks stop after the same step: a rank that stopped
    alone would leave the others waiting in a collective. Called only when a budget is set.
    """

    def __init__(
        self,
        seconds: float,
        already_spent: float = 0.0,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        self.seconds = seconds
        self.start = time.perf_counter() - already_spent
        self.agree = agree

    def spent(self) -> bool:
        if not self.seconds:
            return False
        local = time.perf_counter() - self.start >= self.seconds
        return self.agree(local) if self.agree is not None else local


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of parameters whose gradient holds NaN or inf (one device sync for all of them)."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    sums = torch.stack(
        [(grad.coalesce().values() if grad.is_sparse else grad).sum() for _, grad in named]
    )
    finite = torch.isfinite(sums).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of parameters holding NaN or inf."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def check_loss(loss_value: float, step: int) -> None:
    """Refuse a NaN / inf loss at ``step`` before the update."""
    if not torch.isfinite(torch.tensor(loss_value)):
        raise NumericalError(
            f"training diverged at step {step}: the loss is {loss_value} (the update was not "
            "applied)"
        )


def check_gradients(model: nn.Module, step: int) -> None:
    """Refuse NaN / inf gradients at ``step`` before the optimiser applies them."""
    _refuse(nonfinite_gradients(model), step, "the gradients of {} hold NaN or inf (the update "
            "was not applied)")  # fmt: skip


def check_parameters(model: nn.Module, step: int) -> None:
    """Refuse to checkpoint NaN / inf parameters."""
    _refuse(nonfinite_parameters(model), step, "parameters {} hold NaN or inf, so they are not "
            "checkpointed")  # fmt: skip


def _refuse(bad: list[str], step: int, what: str) -> None:
    """A NumericalError at ``step`` naming the ``bad`` parameters in ``what``."""
    if bad:
        raise NumericalError(f"training diverged at step {step}: " + what.format(", ".join(bad)))


def check_hidden(h: torch.Tensor, step: int) -> None:
    """Refuse NaN / inf hidden states before a sampler or index sees them (a NaN query would
    surface as an obscure sampler error)."""
    if not bool(torch.isfinite(h).all()):
        raise NumericalError(f"training diverged at step {step}: the hidden states hold NaN or inf")
