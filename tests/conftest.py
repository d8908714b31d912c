"""Shared test setup: one torch thread, because the suite shares two cores with training runs."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
