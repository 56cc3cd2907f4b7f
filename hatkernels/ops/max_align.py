"""Max pooling (TERAN's MrSw, ColBERT's MaxSim) as the custom op ``hatkernels::max_align``,
with autograd through ``hatkernels::max_align_backward``. Kernels:
``csrc/cpu``, ``csrc/cuda/max_align.cu``, ``hatkernels/triton/max_align.py``
and the torch backend."""

from __future__ import annotations

import torch
from torch import Tensor

from hatkernels.inputs import AlignInputs

from .common import backward, forward, register_autograd


@torch.library.custom_op("hatkernels::max_align", mutates_args=())
def max_align(
    images: Tensor,
    texts: Tensor,
    image_lengths: Tensor,
    text_lengths: Tensor,
    direction: str,
    reduce: str,
    backend: str,
    memory_budget: int,
) -> Tensor:
    """``[Bi, Bt]`` max-pooled scores of one level, computed by ``backend``."""
    return forward(AlignInputs(images, texts, image_lengths, text_lengths, "max", direction,
                               reduce, 0.0, memory_budget), backend)  # fmt: skip


@torch.library.custom_op("hatkernels::max_align_backward", mutates_args=())
def max_align_backward(
    grad: Tensor,
    images: Tensor,
    texts: Tensor,
    image_lengths: Tensor,
    text_lengths: Tensor,
    direction: str,
    reduce: str,
    backend: str,
    memory_budget: int,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * max_align(...))`` w.r.t. images and texts."""
    return backward(grad, AlignInputs(images, texts, image_lengths, text_lengths, "max",
                                      direction, reduce, 0.0, memory_budget), backend)  # fmt: skip


register_autograd(max_align, max_align_backward)
