"""Max pooling (TERAN's MrSw, ColBERT's MaxSim) as the custom op ``hatkernels::max_align``:
``(images, texts, image_lengths, text_lengths, direction, reduce, backend, memory_budget) ->
[Bi, Bt]``, with autograd through ``hatkernels::max_align_backward``. Kernels:
``csrc/cpu/max_align.cpp``, ``csrc/cuda/max_align.cu``, ``hatkernels/triton/max_align.py``
and the torch backend."""

from __future__ import annotations

from .common import register_alignment_op

max_align = register_alignment_op("max", "")
