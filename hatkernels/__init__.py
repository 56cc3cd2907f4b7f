"""hatkernels: exact, fused token-alignment kernels for cross-modal retrieval.

``hier_align`` scores every (image, caption) pair of a batch x gallery from token-to-token
similarities, with max pooling (TERAN, ColBERT) or HAT's scan pooling, over one or several
levels. ``available_backends(device)`` lists the backends that can run on a device.
``hier_topk`` returns the best gallery items of every query exactly as ``hier_align`` ranks
them, streaming the gallery (tensors, or a ``TokenStore`` on disk) in chunks.
"""

from __future__ import annotations

import warnings

from .api import hier_align
from .backends.cpu import LOAD_ERROR as _CPU_LOAD_ERROR
from .dispatch import available_backends
from .store import TokenStore
from .topk import TopK, hier_topk

__version__ = "0.1.0"

if _CPU_LOAD_ERROR:
    warnings.warn(
        f"hatkernels: the fused CPU backend is unavailable: {_CPU_LOAD_ERROR}. "
        "CPU calls run on the slower `torch` backend.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = ["TokenStore", "TopK", "__version__", "available_backends", "hier_align", "hier_topk"]
