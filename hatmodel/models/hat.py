"""HAT (the paper's released configuration): Swin stage tokens and BERT layer tokens, one
Linear per level and side, aligned level by level with ``hatkernels.hier_align`` (scan / i2t /
mean, lambda 9) and summed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import RetrievalModel, Tokens
from .towers import BertTower, SwinTower, no_grad_if


class HAT(RetrievalModel):
    encoder_modules = ("image_encoder", "text_encoder")

    def __init__(self, image: SwinTower, text: BertTower, embed_dim: int,
                 align: dict[str, Any]) -> None:
        super().__init__()
        if len(image.dims) != len(text.layers):
            raise ValueError(
                f"model.image.stages / model.text.layers: need one text layer per image stage, "
                f"got {len(image.dims)} stages and {len(text.layers)} layers"
            )
        self.image_encoder, self.text_encoder = image, text
        self.image_proj = nn.ModuleList(nn.Linear(d, embed_dim) for d in image.dims)
        self.text_proj = nn.ModuleList(nn.Linear(text.dim, embed_dim) for _ in text.layers)
        self.align = dict(align)

    def encode_images(self, images: Tensor) -> Tokens:
        with no_grad_if(self.encoders_frozen):
            stages = self.image_encoder.body(images)
        feats = self.image_encoder.normalise(stages)
        return Tokens([p(f) for p, f in zip(self.image_proj, feats)], [None] * len(feats))

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tokens:
        with no_grad_if(self.encoders_frozen):
            hidden = self.text_encoder(input_ids, attention_mask)
        lengths = attention_mask.sum(1).to(torch.int64)
        return Tokens([p(h) for p, h in zip(self.text_proj, hidden)], [lengths] * len(hidden))


def build_hat(cfg: dict[str, Any], vocab_size: int | None = None) -> HAT:
    """HAT from ``cfg["model"]``; ``vocab_size`` fills a random BERT's vocabulary."""
    m = cfg["model"]
    image = SwinTower(m["image"]["arch"], m["image"]["stages"], m["image"]["kwargs"],
                      m["image"]["checkpoint"])
    text_cfg = m["text"]["config"]
    if m["text"]["pretrained"] is None and text_cfg is not None and vocab_size is not None:
        text_cfg = {**text_cfg, "vocab_size": vocab_size}
    text = BertTower(m["text"]["layers"], m["text"]["pretrained"], text_cfg)
    return HAT(image, text, int(m["embed_dim"]), m["align"])
