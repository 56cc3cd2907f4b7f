"""Encoder towers wrapping outside libraries: a timm Swin giving per-stage token maps, and a
HuggingFace BERT giving per-layer hidden states. Weights come from local paths only."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class SwinTower(nn.Module):
    """timm Swin (any config) -> token sets of the chosen stages, each through a LayerNorm.

    ``stages`` are 0-based stage indices (HAT: 1, 2, 3 give 28x28, 14x14, 7x7 tokens at 224
    px). ``checkpoint``: a local timm checkpoint file (``.safetensors``, ``.pth``, ``.bin``)
    of the same architecture, loaded through timm's own filter (position tables are resized
    when ``kwargs`` changes the image or window size); ``None`` gives random weights.
    """

    def __init__(self, arch: str, stages: list[int], kwargs: dict[str, Any] | None = None,
                 checkpoint: str | None = None) -> None:
        super().__init__()
        import timm

        kwargs = dict(kwargs or {})
        load: dict[str, Any] = {"pretrained": False}
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise ValueError(f"model.image.checkpoint: no timm checkpoint file at {path}")
            load = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
        self.body = timm.create_model(arch, features_only=True, out_indices=tuple(stages),
                                      **load, **kwargs)
        self.dims = list(self.body.feature_info.channels())
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in self.dims)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.normalise(self.body(images))

    def normalise(self, maps: list[Tensor]) -> list[Tensor]:
        """Stage maps (``[B, H, W, C]``) -> ``[B, H*W, C]`` tokens through their LayerNorms."""
        out = []
        for fmap, norm in zip(maps, self.norms):
            if fmap.shape[-1] != norm.normalized_shape[0]:  # NCHW from non-Swin trunks
                fmap = fmap.permute(0, 2, 3, 1)
            out.append(norm(fmap.flatten(1, 2)))
        return out


class BertTower(nn.Module):
    """HuggingFace BERT -> hidden states of the chosen layers (``hidden_states`` indices:
    0 is the embeddings, ``k`` the k-th layer's output).

    ``pretrained``: a local HuggingFace model folder; else ``config`` (``BertConfig``
    fields) builds a randomly initialised BERT.
    """

    def __init__(self, layers: list[int], pretrained: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if pretrained is not None:
            folder = Path(pretrained)
            if not (folder / "config.json").is_file():
                raise ValueError(
                    f"model.text.pretrained: no HuggingFace model folder (config.json) at {folder}"
                )
            self.bert = AutoModel.from_pretrained(str(folder), local_files_only=True,
                                                  add_pooling_layer=False)
        elif config is not None:
            self.bert = BertModel(BertConfig(**config), add_pooling_layer=False)
        else:
            raise ValueError("model.text: set `pretrained` (a local folder) or `config`")
        n_layers = self.bert.config.num_hidden_layers
        for layer in layers:
            if not 0 <= layer <= n_layers:
                raise ValueError(f"model.text.layers: {layer} not in [0, {n_layers}]")
        self.layers = list(layers)
        self.dim = self.bert.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        output_hidden_states=True)
        return [out.hidden_states[k] for k in self.layers]


def no_grad_if(flag: bool):
    """``torch.no_grad()`` when ``flag`` (frozen encoders need no graph), else a no-op that
    keeps the caller's grad mode (evaluation under ``no_grad`` builds no graph)."""
    return torch.no_grad() if flag else contextlib.nullcontext()
