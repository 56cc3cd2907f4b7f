"""HAT's scan pooling (SCAN-style cross-attention) as the custom op ``hatkernels::scan_align``:
``(images, texts, image_lengths, text_lengths, direction, reduce, lambda_softmax, backend,
memory_budget) -> [Bi, Bt]``, with autograd through ``hatkernels::scan_align_backward``.
Kernels: ``csrc/cpu/scan_align.cpp``, ``csrc/cuda/scan_align.cu``,
``hatkernels/triton/scan_align.py`` (backward: ``scan_backward.py``) and the torch backend."""

from __future__ import annotations

from .common import register_alignment_op

scan_align = register_alignment_op("scan", "float lambda_softmax, ")
