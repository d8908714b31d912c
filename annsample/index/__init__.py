"""Inner-product top-k search over item embeddings, split the way faiss ``contrib`` splits it.

- :mod:`annsample.index.exact`: exact search and recall (``exact_topk``, ``recall_at_k``), and the
  ``exact`` backend;
- :mod:`annsample.index.clustering`: IVF tools (``default_nlist``, ``default_nprobe``, k-means,
  ``nearest_centroid``, the MIPS -> L2 augmentation);
- :mod:`annsample.index.item_index`: ``ItemIndex``, versioned by training step, refreshed by
  ``re_add`` / ``retrain``, over one of the backends :mod:`~annsample.index.faiss_ivf` (CPU and
  GPU), :mod:`~annsample.index.torch_ivf` and :mod:`~annsample.index.exact`;
- :mod:`annsample.index.checks`: the input checks they share.

The public names are re-exported here: ``from annsample.index import ItemIndex, exact_topk``.
"""

from annsample.index.clustering import (
    MAX_POINTS_PER_CENTROID,
    MIN_POINTS_PER_CENTROID,
    default_nlist,
    default_nprobe,
    kmeans,
    nearest_centroid,
    resolve_nlist_nprobe,
)
from annsample.index.exact import exact_topk, recall_at_k
from annsample.index.faiss_ivf import GPU_MAX_SELECTION
from annsample.index.item_index import BACKENDS, METRICS, STATE_DICT_FORMAT, ItemIndex

__all__ = [
    "BACKENDS",
    "GPU_MAX_SELECTION",
    "MAX_POINTS_PER_CENTROID",
    "METRICS",
    "MIN_POINTS_PER_CENTROID",
    "STATE_DICT_FORMAT",
    "ItemIndex",
    "default_nlist",
    "default_nprobe",
    "exact_topk",
    "kmeans",
    "nearest_centroid",
    "recall_at_k",
    "resolve_nlist_nprobe",
]
