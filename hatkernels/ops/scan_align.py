"""HAT's scan pooling (SCAN-style cross-attention) as the custom op
``hatkernels::scan_align(images, texts, image_lengths, text_lengths, direction, reduce,
lambda_softmax: float, backend, memory_budget, needs_grad=False) -> ([Bi, Bt], saved)``
(``saved`` always empty), with autograd through
``hatkernels::scan_align_backward``. Kernels: ``csrc/cpu``, ``csrc/cuda/scan_align.cu``,
``hatkernels/triton/scan_align.py`` (backward: ``scan_backward.py``) and the torch backend."""

from __future__ import annotations

from .common import define_align_ops

scan_align, scan_align_backward = define_align_ops("scan", lambda_softmax=float)
