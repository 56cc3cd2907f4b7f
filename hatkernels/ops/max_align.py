"""Max pooling (TERAN's MrSw, ColBERT's MaxSim) as the custom op
``hatkernels::max_align(images, texts, image_lengths, text_lengths, direction, reduce, backend,
memory_budget, needs_grad=False) -> ([Bi, Bt], saved)`` (max pooling has no settings of its
own; ``saved``: the cpu backend's winners, see ``common.py``), with autograd through
``hatkernels::max_align_backward``. Kernels: ``csrc/cpu``, ``csrc/cuda/max_align.cu``,
``hatkernels/triton/max_align.py`` and the torch backend."""

from __future__ import annotations

from .common import define_align_ops

max_align, max_align_backward = define_align_ops("max")
