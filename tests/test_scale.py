"""annsample.scale: the memory estimate of a catalog run is linear in items and users and refuses,
naming the largest terms, what does not fit."""

from __future__ import annotations

import pytest

from annsample.config import catalog_overrides, load_config
from annsample.errors import ConfigError
from annsample.scale import check_memory, memory_terms


def test_memory_estimate_grows_with_the_catalog_and_refuses_what_does_not_fit():
    config = load_config(None, catalog_overrides(1_000_000))
    small_terms = memory_terms(config, 1_000_000, 1_000_000)
    large_terms = memory_terms(config, 10_000_000, 10_000_000)
    small, large = sum(small_terms.values()), sum(large_terms.values())
    fixed = small_terms["fixed"]
    assert large - fixed == pytest.approx(10 * (small - fixed), rel=1e-5)  # linear in N and U
    assert check_memory(config, 1_000_000, 1_000_000, limit=small) == small
    with pytest.raises(ConfigError, match=r"needs about .* GB .*item_table.* use a smaller"):
        check_memory(config, 10_000_000, 10_000_000, limit=6 * 2**30)
