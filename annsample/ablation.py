"""Ablation grids: train one run per combination of config values, then tabulate them.

A grid is a list of ``KEY=V1,V2,...`` strings (e.g. ``sampler.index.refresh_every=1,10,100``);
every combination becomes one run folder under the output folder, named after its settings, with
the resolved config saved beside it like any other run.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from annsample.config import load_config
from annsample.errors import ConfigError
from annsample.report import results_table

logger = logging.getLogger(__name__)


def parse_grid(grid: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """``("a.b=1,2", "c=x")`` -> [("a.b", ["1", "2"]), ("c", ["x"])].

    >>> parse_grid(("sampler.index.refresh_every=1,10", "seed=0"))
    [('sampler.index.refresh_every', ['1', '10']), ('seed', ['0'])]
    """
    axes = []
    for text in grid:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(
                f"--grid {text!r}: expected KEY=V1,V2,..., e.g. sampler.index.refresh_every=1,10,100"
            )
        axes.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    return axes


def run_grid(
    config_path: str | Path | None,
    grid: tuple[str, ...],
    out_dir: str | Path,
    overrides: tuple[str, ...] = (),
    overwrite: bool = False,
) -> str:
    """Train every combination of the grid; returns the markdown results table.

    Every combination's config is validated before the first run starts, so a typo in the last
    value does not surface hours in.
    """
    from annsample.train import train

    axes = parse_grid(grid)
    out = Path(out_dir)
    plans = []
    for values in itertools.product(*(vals for _, vals in axes)):
        settings = tuple(f"{key}={value}" for (key, _), value in zip(axes, values, strict=True))
        config = load_config(config_path, overrides + settings)
        label = "_".join(
            f"{key.split('.')[-1]}={value}" for (key, _), value in zip(axes, values, strict=True)
        )
        plans.append((config, settings, label or "default"))
    runs = []
    for config, settings, label in plans:
        logger.info("ablation run %s: %s", label, " ".join(settings))
        named = load_config(config_path, overrides + settings + (f"name={config.name}-{label}",))
        train(named, out / label, overwrite=overwrite)
        runs.append(out / label)
    return results_table(runs)
