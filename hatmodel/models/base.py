"""What the training loop and the evaluation need from a model (HAT here, TERAN next).

A model encodes each side on its own into :class:`Tokens` (one ``[B, T_l, D_l]`` tensor and
optional valid lengths per level) and scores any images x captions block from them with
``score`` (one ``hier_align`` call). The loop never looks inside: a new model subclasses
:class:`RetrievalModel`, fills the three methods, names its pretrained encoders in
``encoder_modules`` (frozen for the first epochs by ``train.freeze_encoders_epochs``) and
registers its factory in :data:`hatmodel.models.MODELS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hatkernels import hier_align


@dataclass
class Tokens:
    """Token sets of a batch: ``levels[l]`` is ``[B, T_l, D_l]``; ``lengths[l]`` is ``[B]``
    int64 (valid tokens are the first ones) or ``None`` (all valid)."""

    levels: list[Tensor]
    lengths: list[Tensor | None]

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    def __getitem__(self, index: slice | Tensor) -> Tokens:
        return Tokens([t[index] for t in self.levels],
                      [None if n is None else n[index] for n in self.lengths])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Tokens:
        return Tokens([t.to(device=device, dtype=dtype or t.dtype) for t in self.levels],
                      [None if n is None else n.to(device) for n in self.lengths])

    def detach(self) -> Tokens:
        return Tokens([t.detach() for t in self.levels], self.lengths)

    @staticmethod
    def cat(parts: Sequence[Tokens]) -> Tokens:
        """Concatenate along the batch; levels may differ in padded length (padded with 0)."""
        levels, lengths = [], []
        for level in range(len(parts[0].levels)):
            size = max(p.levels[level].shape[1] for p in parts)
            padded = [nn.functional.pad(p.levels[level], (0, 0, 0, size - p.levels[level].shape[1]))
                      for p in parts]
            levels.append(torch.cat(padded))
            if all(p.lengths[level] is None and p.levels[level].shape[1] == size
                   for p in parts):
                lengths.append(None)  # nothing was padded: every token stays valid
            else:
                lengths.append(torch.cat([
                    torch.full((len(p),), p.levels[level].shape[1], dtype=torch.int64,
                               device=p.levels[level].device)
                    if p.lengths[level] is None else p.lengths[level] for p in parts]))
        return Tokens(levels, lengths)


class RetrievalModel(nn.Module):
    """Two streams that meet only in ``score``."""

    #: names of the child modules that hold pretrained encoders (frozen in the first epochs)
    encoder_modules: tuple[str, ...] = ()
    #: set by :meth:`freeze_encoders`; frozen encoders should run under ``torch.no_grad()``
    encoders_frozen: bool = False
    #: ``hier_align`` settings (pooling, direction, reduce, lambda_softmax, weights, backend)
    align: dict[str, Any]

    def encode_images(self, images: Tensor) -> Tokens:
        raise NotImplementedError

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tokens:
        raise NotImplementedError

    def score(self, images: Tokens, texts: Tokens, memory_budget: int | None = None) -> Tensor:
        """``[Bi, Bt]`` float32 scores of every image against every caption: ``hier_align``
        over the levels with the model's ``align`` settings (the ``model.align`` config)."""
        a = self.align
        extra = {} if memory_budget is None else {"memory_budget": int(memory_budget)}
        return hier_align(
            images.levels, texts.levels, image_lengths=images.lengths,
            text_lengths=texts.lengths, pooling=a["pooling"], direction=a["direction"],
            reduce=a["reduce"], lambda_softmax=float(a["lambda_softmax"]),
            weights=a["weights"], backend=a["backend"], **extra,
        )  # fmt: skip

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.score(self.encode_images(images), self.encode_texts(input_ids, attention_mask))

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        for name in self.encoder_modules:
            yield from getattr(self, name).parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        enc = {id(p) for p in self.encoder_parameters()}
        return (p for p in self.parameters() if id(p) not in enc)

    def freeze_encoders(self, frozen: bool) -> None:
        """Freeze (or unfreeze) the encoders; frozen ones also run without autograd."""
        self.encoders_frozen = frozen
        for p in self.encoder_parameters():
            p.requires_grad_(not frozen)
