"""HAT's scan pooling (SCAN-style cross-attention) as the custom op ``hatkernels::scan_align``,
with autograd through ``hatkernels::scan_align_backward``. Kernels:
``csrc/cpu``, ``csrc/cuda/scan_align.cu``,
``hatkernels/triton/scan_align.py`` (backward: ``scan_backward.py``) and the torch backend."""

from __future__ import annotations

import torch
from torch import Tensor

from hatkernels.inputs import AlignInputs

from .common import backward, forward, register_autograd


@torch.library.custom_op("hatkernels::scan_align", mutates_args=())
def scan_align(
    images: Tensor,
    texts: Tensor,
    image_lengths: Tensor,
    text_lengths: Tensor,
    direction: str,
    reduce: str,
    lambda_softmax: float,
    backend: str,
    memory_budget: int,
) -> Tensor:
    """``[Bi, Bt]`` scan-pooled scores of one level, computed by ``backend``."""
    return forward(AlignInputs(images, texts, image_lengths, text_lengths, "scan", direction,
                               reduce, lambda_softmax, memory_budget), backend)  # fmt: skip


@torch.library.custom_op("hatkernels::scan_align_backward", mutates_args=())
def scan_align_backward(
    grad: Tensor,
    images: Tensor,
    texts: Tensor,
    image_lengths: Tensor,
    text_lengths: Tensor,
    direction: str,
    reduce: str,
    lambda_softmax: float,
    backend: str,
    memory_budget: int,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * scan_align(...))`` w.r.t. images and texts."""
    return backward(grad, AlignInputs(images, texts, image_lengths, text_lengths, "scan",
                                      direction, reduce, lambda_softmax, memory_budget),
                    backend)  # fmt: skip


register_autograd(scan_align, scan_align_backward)
