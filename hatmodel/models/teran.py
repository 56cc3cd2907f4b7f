"""TERAN (the paper's released configuration): region features and BERT word pieces, each
through its own transformer, then a transformer encoder shared by both modalities,
L2-normalised tokens, and the alignment through ``hatkernels.hier_align`` (MrSw: max / t2i /
sum by default).

The image-level token and each caption's [CLS] and last two tokens (final word piece and
[SEP]) take no part in the alignment. They are left out through views and lengths, not
copies: the image side passes ``tokens[:, 1:]`` with the region counts, the text side
``tokens[:, 1:]`` with ``length - 1 - drop_last_tokens`` valid tokens.

Sizes come from the config (``model.teran``, ``model.embed_dim``, ``data.regions.feature_dim``,
``model.text``), so the paper's model (36 x 2048 regions, a 2048-wide 4-layer region
transformer, 6 BERT-base layers, 1024-d joint space) and a tiny one share this code.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from ..data.regions import unpack_regions
from .base import RetrievalModel, Tokens
from .towers import BertTower


def _encoder(width: int, layers: int, heads: int, ff: int, dropout: float) -> nn.Module:
    if width % heads:
        raise ValueError(f"model.teran: width {width} is not divisible by {heads} heads")
    layer = nn.TransformerEncoderLayer(width, heads, ff, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _padding_mask(lengths: Tensor, size: int) -> Tensor:
    """``[B, size]`` True where a position is padding (for ``src_key_padding_mask``)."""
    return torch.arange(size, device=lengths.device)[None, :] >= lengths[:, None]


class RegionEncoder(nn.Module):
    """Region features + box embedding, a learned global token in front, a transformer
    stack at ``width``, and a Linear to ``embed_dim``. Output ``[B, 1 + R, embed_dim]``."""

    def __init__(self, feature_dim: int, width: int, layers: int, heads: int, ff: int,
                 box_hidden: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        # Paper: the transformer runs at the feature size (2048); a tiny model narrows first.
        self.input = nn.Identity() if width == feature_dim else nn.Linear(feature_dim, width)
        self.box = nn.Sequential(nn.Linear(5, box_hidden), nn.ReLU(), nn.Linear(box_hidden, width))
        self.global_token = nn.Parameter(torch.randn(width) * 0.02)
        self.encoder = _encoder(width, layers, heads, ff, dropout)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, features: Tensor, boxes: Tensor, lengths: Tensor) -> Tensor:
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        x = self.input(features) + self.box(torch.cat([boxes, area[..., None]], -1))
        x = torch.cat([self.global_token.expand(x.shape[0], 1, -1).to(x.dtype), x], 1)
        x = self.encoder(x, src_key_padding_mask=_padding_mask(lengths + 1, x.shape[1]))
        return self.proj(x)


class TERAN(RetrievalModel):
    """TERAN on packed regions (:func:`hatmodel.data.regions.pack_regions`) and token ids."""

    encoder_modules = ("text_encoder",)

    def __init__(self, regions: RegionEncoder, text: BertTower, embed_dim: int,
                 shared: dict[str, Any], align: dict[str, Any], drop_last_tokens: int) -> None:
        super().__init__()
        if drop_last_tokens < 0:
            raise ValueError(f"model.teran.drop_last_tokens: expected >= 0, got {drop_last_tokens}")
        self.region_encoder, self.text_encoder = regions, text
        self.text_proj = nn.Linear(text.dim, embed_dim)
        args = (embed_dim, int(shared["layers"]), int(shared["heads"]), int(shared["ff"]),
                float(shared["dropout"]))
        # Shared (the paper's best): one module serves both sides; else the text side has its own.
        self.shared_encoder = _encoder(*args)
        self.text_own_encoder = None if shared["shared"] else _encoder(*args)
        self.align = dict(align)
        self.drop_last_tokens = drop_last_tokens
        self.encoders_frozen = False

    def image_tokens(self, features: Tensor, boxes: Tensor, lengths: Tensor) -> Tensor:
        """``[B, 1 + R, D]`` L2-normalised tokens: the global token, then the regions."""
        x = self.region_encoder(features, boxes, lengths)
        x = self.shared_encoder(x, src_key_padding_mask=_padding_mask(lengths + 1, x.shape[1]))
        return nn.functional.normalize(x, dim=-1)

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, N, D]`` L2-normalised tokens of every word piece, [CLS] and [SEP] included."""
        # Frozen: no graph through BERT (a no-op context otherwise, so that an outer no_grad,
        # as in the evaluation, still holds).
        with torch.no_grad() if self.encoders_frozen else contextlib.nullcontext():
            (hidden,) = self.text_encoder(input_ids, attention_mask)
        lengths = attention_mask.sum(1).to(torch.int64)
        encoder = self.shared_encoder if self.text_own_encoder is None else self.text_own_encoder
        x = encoder(self.text_proj(hidden),
                    src_key_padding_mask=_padding_mask(lengths, hidden.shape[1]))
        return nn.functional.normalize(x, dim=-1)

    def encode_images(self, images: Tensor) -> Tokens:
        """Packed regions ``[B, R, F + 5]`` -> the region tokens ``[B, R, D]`` (a view past
        the global token) with their counts."""
        features, boxes, lengths = unpack_regions(images, self.region_encoder.feature_dim)
        tokens = self.image_tokens(features, boxes, lengths)
        return Tokens([tokens[:, 1:]], [lengths.clamp(min=1)])

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tokens:
        """Token ids -> word tokens ``[B, N - 1, D]`` (a view past [CLS]) whose valid lengths
        leave out the last ``drop_last_tokens`` tokens ([SEP] and the final word piece)."""
        tokens = self.text_tokens(input_ids, attention_mask)
        lengths = attention_mask.sum(1).to(torch.int64)
        aligned = (lengths - 1 - self.drop_last_tokens).clamp(min=1)
        return Tokens([tokens[:, 1:]], [aligned])


def build_teran(cfg: dict[str, Any], vocab_size: int | None = None) -> TERAN:
    """TERAN from ``cfg["model"]`` (``teran``, ``text``, ``embed_dim``, ``align``) and the
    region feature size ``cfg["data"]["regions"]["feature_dim"]``."""
    m, t = cfg["model"], cfg["model"]["teran"]
    feature_dim = int(cfg["data"]["regions"]["feature_dim"])
    embed_dim = int(m["embed_dim"])
    regions = RegionEncoder(feature_dim, int(t["region_dim"] or feature_dim),
                            int(t["region_layers"]), int(t["region_heads"]), int(t["region_ff"]),
                            int(t["box_hidden"]), embed_dim, float(t["dropout"]))
    layers = list(m["text"]["layers"])
    if len(layers) != 1 or int(layers[0]) < 1:
        raise ValueError(
            f"model.text.layers: TERAN uses one BERT layer's output (e.g. [6]: the first six "
            f"layers), got {layers}"
        )
    text_cfg = m["text"]["config"]
    if m["text"]["pretrained"] is None and text_cfg is not None and vocab_size is not None:
        text_cfg = {**text_cfg, "vocab_size": vocab_size}
    text = BertTower(layers, m["text"]["pretrained"], text_cfg)
    # Keep only the layers up to the one used (TERAN: BERT cut to its first six layers).
    text.bert.encoder.layer = text.bert.encoder.layer[: int(layers[0])]
    text.bert.config.num_hidden_layers = int(layers[0])
    shared = {"layers": t["shared_layers"], "heads": t["shared_heads"], "ff": t["shared_ff"],
              "dropout": t["dropout"], "shared": bool(t["shared"])}
    return TERAN(regions, text, embed_dim, shared, m["align"], int(t["drop_last_tokens"]))
