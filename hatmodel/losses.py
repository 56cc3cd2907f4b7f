"""Contrastive losses over a batch's ``[B, B]`` score matrix (row ``i`` image of pair ``i``,
column ``j`` caption of pair ``j``, so the diagonal holds the true pairs).

``same_image`` (``[B, B]`` bool, optional) marks off-diagonal pairs whose caption belongs to
the row's image (an image drawn twice in a batch): they are not used as negatives.

Any model whose ``score`` returns such a matrix trains with these (HAT, TERAN).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LOSSES = ("hinge", "infonce")


def _negatives(scores: Tensor, same_image: Tensor | None) -> Tensor:
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return ~(eye | same_image) if same_image is not None else ~eye


def hinge_loss(scores: Tensor, margin: float = 0.2, hardest_negative: bool = True,
               same_image: Tensor | None = None) -> Tensor:
    """VSE++ hinge triplet loss, both directions, summed over the batch (HAT, TERAN).

    With ``hardest_negative`` each positive is charged only for its hardest negative (the
    papers); without it, for every violating negative (VSE0, a gentler start from scratch).
    """
    _check_square(scores)
    diag = scores.diagonal()
    neg = _negatives(scores, same_image)
    zero = scores.new_zeros(())
    cost_caption = torch.where(neg, (margin + scores - diag[:, None]).clamp(min=0), zero)
    cost_image = torch.where(neg, (margin + scores - diag[None, :]).clamp(min=0), zero)
    if hardest_negative:
        return cost_caption.amax(1).sum() + cost_image.amax(0).sum()
    return cost_caption.sum() + cost_image.sum()


def info_nce_loss(scores: Tensor, temperature: float = 0.05,
                  same_image: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP's loss): cross-entropy of each row and each column of
    ``scores / temperature`` against the diagonal, averaged over the batch and directions."""
    _check_square(scores)
    logits = scores / temperature
    if same_image is not None:
        logits = logits.masked_fill(same_image & ~torch.eye(
            len(scores), dtype=torch.bool, device=scores.device), float("-inf"))
    target = torch.arange(scores.shape[0], device=scores.device)
    i2t = torch.nn.functional.cross_entropy(logits, target)
    t2i = torch.nn.functional.cross_entropy(logits.T, target)
    return (i2t + t2i) / 2


def _check_square(scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square [B, B] matrix, got {tuple(scores.shape)}")


def build_loss(cfg: dict[str, Any]):
    """``(scores, same_image) -> loss`` from ``cfg["loss"]`` (name ``hinge`` or ``infonce``)."""
    c = cfg["loss"]
    if c["name"] == "hinge":
        return lambda s, same=None: hinge_loss(s, float(c["margin"]),
                                               bool(c["hardest_negative"]), same)
    if c["name"] == "infonce":
        return lambda s, same=None: info_nce_loss(s, float(c["temperature"]), same)
    raise ValueError(f"loss.name: expected 'hinge' or 'infonce', got {c['name']!r}")


@torch.no_grad()
def score_spread(scores: Tensor) -> dict[str, float]:
    """Health of a batch's scores: mean of the true pairs, mean and std of the others, and
    ``spread`` (std of the whole matrix). A spread near 0 means a collapsed model that
    scores every pair alike (the hinge loss then sits at 2 * B * margin)."""
    s = scores.detach().float()
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    off = s[~eye]
    return {
        "pos_mean": float(s.diagonal().mean()),
        "neg_mean": float(off.mean()) if off.numel() else 0.0,
        "neg_std": float(off.std()) if off.numel() > 1 else 0.0,
        "spread": float(s.std()) if s.numel() > 1 else 0.0,
    }
