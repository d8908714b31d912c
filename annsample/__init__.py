"""annsample: model-aware (GenNi) negative sampling for sequential recommenders at large-catalog scale."""

__version__ = "0.1.0"
