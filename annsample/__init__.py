"""annsample: model-aware (GenNi) negative sampling for sequential recommenders at large-catalog scale.

The plug-in API (:mod:`annsample.api`) is importable from here: ``from annsample import
NegativeSampler, RefreshPolicy, sampled_logits, sampled_loss``. It is loaded on first use, so
``import annsample`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = (
    "NegativeSampler",
    "RefreshPolicy",
    "SampledNegatives",
    "sample_negatives",
    "normalize_histories",
    "sampled_logits",
    "sampled_loss",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from annsample import api

        return getattr(api, name)
    raise AttributeError(f"module 'annsample' has no attribute {name!r}")
