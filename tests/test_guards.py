"""annsample.guards: NaN / inf refusals name the step and the parameters; the budget counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from annsample import guards
from annsample.errors import NumericalError


def test_nonfinite_gradients_and_parameters_are_named():
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    assert guards.nonfinite_gradients(model) == [] and guards.nonfinite_parameters(model) == []
    model.bias.grad[0] = float("nan")
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="at step 7: the gradients of bias hold NaN"):
        guards.check_gradients(model, 7)
    with pytest.raises(NumericalError, match="at step 8: parameters weight hold NaN or inf"):
        guards.check_parameters(model, 8)


def test_loss_and_hidden_checks():
    guards.check_loss(0.5, 1)
    with pytest.raises(NumericalError, match="at step 3: the loss is nan"):
        guards.check_loss(float("nan"), 3)
    with pytest.raises(NumericalError, match="at step 4: the hidden states hold NaN or inf"):
        guards.check_hidden(torch.tensor([[1.0, float("inf")]]), 4)


def test_budget_counts_time_already_spent():
    assert not guards.Budget(0).spent()  # 0 = no budget
    assert guards.Budget(10, already_spent=11).spent()
    assert not guards.Budget(10, already_spent=0).spent()


def test_budget_acts_on_the_agreed_answer_and_asks_only_when_a_budget_is_set():
    asked: list[bool] = []

    def agree(local: bool) -> bool:  # as if another rank's clock had run out
        asked.append(local)
        return True

    assert guards.Budget(10, already_spent=0, agree=agree).spent()
    assert asked == [False]  # this process's own answer went in
    assert not guards.Budget(0, agree=agree).spent()
    assert asked == [False]  # no budget: no collective
