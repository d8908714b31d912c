"""Memory estimate of a training run from its catalog size, and the up-front refusal of runs that
cannot fit (``annsample train --catalog-size 10M`` on a small machine).

The estimate counts the arrays whose size grows with the catalog N or the users U; the model's dense
layers, the batch and the evaluation chunk are a fixed few hundred MB on top (``_FIXED_BYTES``).
docs/scaling.md derives the same terms and compares them with measured peak RSS.
"""

from __future__ import annotations

import logging
import os

from annsample.config import RunConfig
from annsample.errors import ConfigError

logger = logging.getLogger(__name__)

_FIXED_BYTES = 600 * 2**20  # python, torch, faiss, dense layers, batch, evaluation score chunk


def memory_terms(config: RunConfig, n_items: int, n_users: int) -> dict[str, int]:
    """Bytes of every catalog- or user-sized array a run holds at its peak, by name.

    Args:
        config: the run config (hidden size, sampler, optimiser, sequence length).
        n_items: catalog size N.
        n_users: number of users U.
    """
    d = config.model.hidden_size
    table = (n_items + 1) * d * 4  # float32 item embeddings
    terms = {
        "item_table": table,
        # Adam keeps two moments per parameter, dense or sparse
        "optimiser_state": 2 * table,
    }
    if config.sampler.name == "ann" and config.loss.name != "full_ce":
        terms["index"] = n_items * (d * 4 + 8)  # IVF-Flat codes and ids
        # the snapshot handed to a refresh, and the table the index was built from (drift)
        terms["index_snapshots"] = 2 * n_items * d * 4
    t = config.data.max_len
    # generation (U, max_len + 2) int64 and CSR, then training inputs + targets (U, T) int64 twice
    # (the full arrays and the rows with a training position), plus history CSRs
    terms["sequences"] = n_users * (8 * (t + 2) * 2 + 8 * t * 4 + 8 * t * 2)
    terms["fixed"] = _FIXED_BYTES
    return terms


def available_memory() -> int | None:
    """Bytes the kernel reports as available (``MemAvailable``), or None where it is not known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(config: RunConfig, n_items: int, n_users: int, limit: int | None = None) -> int:
    """Refuse, before anything is generated, a run whose estimated peak exceeds the memory limit.

    Args:
        limit: bytes allowed (default: the machine's available memory; ``$ANNSAMPLE_MAX_MEMORY_GB``
            overrides it).
    Returns:
        the estimate in bytes.
    """
    terms = memory_terms(config, n_items, n_users)
    total = sum(terms.values())
    if limit is None and os.environ.get("ANNSAMPLE_MAX_MEMORY_GB"):
        limit = int(float(os.environ["ANNSAMPLE_MAX_MEMORY_GB"]) * 2**30)
    if limit is None:
        limit = available_memory()
    logger.info("memory estimate %.1f GB for %d items, %d users", total / 2**30, n_items, n_users)
    if limit is not None and total > limit:
        parts = ", ".join(f"{name} {size / 2**30:.1f} GB" for name, size in terms.items())
        raise ConfigError(
            f"a catalog of {n_items:,} items and {n_users:,} users needs about "
            f"{total / 2**30:.1f} GB ({parts}) but {limit / 2**30:.1f} GB are available; use a "
            "smaller --catalog-size, fewer users (data.synthetic_users), a smaller "
            "model.hidden_size, or a machine with more memory"
        )
    return total
