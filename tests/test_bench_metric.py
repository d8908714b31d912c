"""metric_recall: recall per metric and nprobe against the exact top-k, and its table."""

from __future__ import annotations

import torch

from annsample.bench.metric import metric_recall, records_table


def test_metric_recall_is_monotone_in_nprobe_and_exact_at_full_probe():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 8, generator=g)
    xb = centres[torch.randint(0, 16, (1500,), generator=g)] + 0.4 * torch.randn(
        1500, 8, generator=g
    )
    xq = torch.randn(40, 8, generator=g)
    records = metric_recall(
        xq, xb, nlist=16, nprobes=(1, 4, 16), k=20, metrics=("ip", "l2_augmented")
    )
    assert len(records) == 6
    for metric in ("ip", "l2_augmented"):
        recalls = [r["recall"] for r in records if r["metric"] == metric]
        assert recalls == sorted(recalls) and recalls[0] < 1.0
        assert recalls[-1] == 1.0  # nprobe == nlist scans every list
    table = records_table(records)
    assert "| 16 / 16 | 1.000 | 1.000 |" in table
    assert table.count("\n") == 2 + 3 + 1  # header, rule, one row per nprobe, largest list
