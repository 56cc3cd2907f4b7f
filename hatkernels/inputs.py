"""``AlignInputs``: one level of one ``hier_align`` call, as dispatch and every backend see it.

The op layer (``hatkernels.ops``) builds it from the custom op's arguments; ``api`` builds the
same object to ask ``dispatch`` which backend serves the level. Backends read their kernel
arguments from it instead of a long positional list, and report the shapes they cannot serve
from it (``Backend.not_supported_reasons``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AlignInputs:
    """The tensors and settings of one level (checked by ``hatkernels.api``):

    - ``images`` ``[Bi, M, D]`` and ``texts`` ``[Bt, N, D]``: contiguous, one dtype, one device;
    - ``image_lengths`` ``[Bi]`` and ``text_lengths`` ``[Bt]``: int64 on the same device, values
      in ``[1, M]`` and ``[1, N]``; tokens past them are padding and may hold anything;
    - ``pooling`` in ``{"max", "scan"}``, ``direction`` in ``{"t2i", "i2t", "both"}``,
      ``reduce`` in ``{"mean", "sum"}``, ``lambda_softmax`` (scan pooling only);
    - ``memory_budget``: bytes of working memory a backend may use (fixed-tile backends may
      ignore it);
    - ``needs_grad``: whether the call will also run the backward (dispatch then picks a
      backend that can serve both).
    """

    images: Tensor
    texts: Tensor
    image_lengths: Tensor
    text_lengths: Tensor
    pooling: str
    direction: str
    reduce: str
    lambda_softmax: float
    memory_budget: int
    needs_grad: bool = False

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(images, texts, image_lengths, text_lengths)``, in the kernels' argument order."""
        return self.images, self.texts, self.image_lengths, self.text_lengths

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def dtype(self) -> torch.dtype:
        return self.images.dtype

    @property
    def dim(self) -> int:
        return self.images.shape[2]

    @property
    def image_tokens(self) -> int:
        """``M``: image tokens per item, padding included."""
        return self.images.shape[1]

    @property
    def text_tokens(self) -> int:
        """``N``: caption tokens per item, padding included."""
        return self.texts.shape[1]

    @property
    def empty(self) -> bool:
        """No pair to score (``Bi == 0`` or ``Bt == 0``)."""
        return self.images.shape[0] == 0 or self.texts.shape[0] == 0
