"""Shared test setup: one torch thread, because the suite shares two cores with training runs; the
IVF-shaped data the index tests share; the small sampling problem and the goodness-of-fit check the
sampler tests share."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from scipy import stats

from annsample.cli.main import main
from annsample.index import ItemIndex
from annsample.samplers import Exclusions

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY = "configs/tiny.yaml"  # relative to REPO, where the CLI tests run (it names data/ relatively)
TINY_PATH = REPO / TINY
TINY_DATA = f"data.path={REPO / 'data' / 'tiny.txt'}"  # the tiny config's data from any folder
# the ann sampler on the tiny catalog, refreshed often enough that a short run re-adds and retrains
TINY_ANN = (
    "sampler.name=ann",
    "sampler.index.nlist=16",
    "sampler.index.nprobe=4",
    "sampler.candidates=50",
    "sampler.index.refresh_every=3",
    "sampler.index.retrain_every=2",
)
SCRIPT = Path(sys.executable).parent / "annsample"  # the console script of this environment


def invoke(args: list[str]) -> Result:
    """Run the click group in-process from the repository root."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        return CliRunner().invoke(main, args)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (``metrics.jsonl``, a rank's log)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def metrics_records(run: Path) -> list[dict]:
    """The records of a run folder's ``metrics.jsonl``."""
    return read_jsonl(run / "metrics.jsonl")


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


SAMPLING_ITEMS, SAMPLING_DIM = 30, 8


def sampling_problem() -> tuple[torch.Tensor, torch.Tensor, Exclusions]:
    """Queries (6, 8), the item table (31, 8) with row 0 = padding, and the exclusions of six
    positions of three sequences over a 30-item catalog."""
    g = torch.Generator().manual_seed(0)
    items = torch.randn(SAMPLING_ITEMS + 1, SAMPLING_DIM, generator=g)
    items[0] = 0
    queries = torch.randn(6, SAMPLING_DIM, generator=g)
    # three sequences; rows padded with N + 1; positions 0-1 -> row 0, 2-4 -> row 1, 5 -> row 2
    history = torch.tensor([[2, 5, 7, 31, 31], [1, 3, 4, 9, 30], [31, 31, 31, 31, 31]])
    row = torch.tensor([0, 0, 1, 1, 1, 2])
    positives = torch.tensor([5, 11, 9, 12, 3, 6])  # 11 and 12 are not in their row's history
    return queries, items, Exclusions(history, row, positives, SAMPLING_ITEMS)


def draw_counts(ids: torch.Tensor, n_items: int = SAMPLING_ITEMS) -> torch.Tensor:
    """(P, N+1) float64 number of draws of each item per position, from ids (P, n)."""
    ids = ids.cpu()
    out = torch.zeros(ids.shape[0], n_items + 1, dtype=torch.float64)
    return out.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))


def assert_draws_follow(ids: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-4) -> None:
    """Chi-square goodness of fit of draws ids (P, n) to probs (P, N+1), per position (cells with
    expected count < 5 pooled); no draw of a zero-probability item."""
    n = ids.shape[1]
    observed = draw_counts(ids, probs.shape[1] - 1)
    for p in range(ids.shape[0]):
        expected = probs[p].double().cpu() * n
        big = expected >= 5
        obs = torch.cat([observed[p][big], observed[p][~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        keep = exp > 0
        assert float(obs[~keep].sum()) == 0, "sampled an item of zero probability"
        _, pvalue = stats.chisquare(
            obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp.sum().item()
        )
        assert pvalue > alpha, f"position {p}: p-value {pvalue:.2e}"


class GatedIndex(ItemIndex):
    """An ItemIndex whose re-adds wait for a test's signal, to hold a refresh in flight (clear
    ``gate`` and ``started`` first; ``started`` is set once a re-add is waiting)."""

    gate = threading.Event()
    started = threading.Event()

    def re_add(self, xb, step, ids=None, reference=None):
        GatedIndex.started.set()
        assert GatedIndex.gate.wait(timeout=30)
        super().re_add(xb, step, ids, reference)
