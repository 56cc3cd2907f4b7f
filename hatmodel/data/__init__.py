"""Data: the embedded generated scenes (:mod:`.scenes`) and Karpathy-split COCO / Flickr30K
(:mod:`.datasets`), tokenizers (:mod:`.text`), and the loaders the training loop and the
evaluation share.

A training batch is a :class:`Batch` of (image, caption) pairs, one caption per image.
Epoch ``e``'s pairs depend only on ``(seed, e)``, so a run resumed at an epoch boundary sees
the same batches as one never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .datasets import KarpathyDataset, SceneDataset
from .scenes import vocabulary
from .text import HFTokenizer, SceneTokenizer

KINDS = ("scenes", "coco", "f30k")
SAMPLES = ("captions", "images")  # an epoch visits every caption, or every image once

__all__ = [
    "KINDS", "SAMPLES", "Batch", "KarpathyDataset", "SceneDataset", "build_dataset",
    "build_tokenizer", "epoch_pairs", "image_loader", "train_loader",
]


@dataclass
class Batch:
    images: Tensor  # [B, 3, H, W]
    input_ids: Tensor  # [B, N]
    attention_mask: Tensor  # [B, N]
    image_index: Tensor  # [B] indices into the data set's images
    caption_index: Tensor  # [B] indices into its flat caption list

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in (
            self.images, self.input_ids, self.attention_mask, self.image_index,
            self.caption_index)))


def build_tokenizer(cfg: dict[str, Any]):
    """The scene vocabulary's tokenizer, or a HuggingFace one from a local folder
    (``data.tokenizer``, else ``model.text.pretrained``)."""
    data = cfg["data"]
    folder = data["tokenizer"] or cfg["model"]["text"]["pretrained"]
    if folder:
        return HFTokenizer(folder, data["max_tokens"])
    if data["kind"] != "scenes":
        raise ValueError(
            "data.tokenizer: real captions need a BERT tokenizer folder (data.tokenizer or "
            "model.text.pretrained)"
        )
    return SceneTokenizer(vocabulary(), data["max_tokens"])


def build_dataset(cfg: dict[str, Any], split: str):
    """Split ``split`` ("train", "val", "test") of the configured data."""
    data = cfg["data"]
    if data["regions"]["format"] is not None:  # region features (TERAN): data/regions.py
        from .regions import build_region_dataset

        return build_region_dataset(cfg, split)
    if data["kind"] == "scenes":
        sc = data["scenes"]
        count = {"train": sc["train_images"], "val": sc["val_images"],
                 "test": sc["test_images"]}[split]
        return SceneDataset(split, count, data["image_size"], sc["seed"], sc["min_objects"],
                            sc["max_objects"])
    if data["kind"] in ("coco", "f30k"):
        if not data["json"] or not data["root"]:
            raise ValueError(f"data.json and data.root: required for data.kind={data['kind']!r}")
        return KarpathyDataset(data["json"], data["root"], split, data["image_size"],
                               restval=bool(data["restval"]))
    raise ValueError(f"data.kind: expected 'scenes', 'coco' or 'f30k', got {data['kind']!r}")


def epoch_pairs(n_images: int, captions_per_image: int, sample: str, seed: int,
                epoch: int) -> Tensor:
    """``[P, 2]`` (image, caption) index pairs of one epoch, shuffled by ``(seed, epoch)``.

    ``sample="captions"`` visits every caption once (the papers' epoch), ``"images"`` every
    image once with one of its captions drawn at random (no image twice in a batch).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if sample == "captions":
        caps = torch.randperm(n_images * captions_per_image, generator=gen)
        return torch.stack([caps // captions_per_image, caps], 1)
    if sample == "images":
        imgs = torch.randperm(n_images, generator=gen)
        pick = torch.randint(captions_per_image, (n_images,), generator=gen)
        return torch.stack([imgs, imgs * captions_per_image + pick], 1)
    raise ValueError(f"train.sample: expected 'captions' or 'images', got {sample!r}")


class _Pairs(Dataset):
    def __init__(self, dataset, pairs: Tensor, train: bool) -> None:
        self.dataset, self.pairs, self.train = dataset, pairs, train

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        i, c = (int(x) for x in self.pairs[k])
        return self.dataset.image(i, train=self.train), i, c


class _Collate:
    def __init__(self, dataset, tokenizer) -> None:
        self.dataset, self.tokenizer = dataset, tokenizer

    def __call__(self, items) -> Batch:
        images = torch.stack([x[0] for x in items])
        image_index = torch.tensor([x[1] for x in items], dtype=torch.int64)
        caption_index = torch.tensor([x[2] for x in items], dtype=torch.int64)
        ids, mask = self.tokenizer([self.dataset.captions[c] for c in caption_index.tolist()])
        return Batch(images, ids, mask, image_index, caption_index)


def train_loader(dataset, tokenizer, pairs: Tensor, batch_size: int,
                 num_workers: int = 0) -> DataLoader:
    """Batches of ``pairs`` in order (the shuffle is in :func:`epoch_pairs`); the last
    incomplete batch is dropped so that every step sees ``batch_size`` negatives."""
    return DataLoader(_Pairs(dataset, pairs, True), batch_size=batch_size, shuffle=False,
                      drop_last=len(pairs) > batch_size, num_workers=num_workers,
                      collate_fn=_Collate(dataset, tokenizer))


class _Images(Dataset):
    def __init__(self, dataset, count: int) -> None:
        self.dataset, self.count = dataset, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tensor:
        return self.dataset.image(i, train=False)


def image_loader(dataset, batch_size: int, count: int | None = None,
                 num_workers: int = 0) -> DataLoader:
    """The first ``count`` (default all) images, eval transforms, in order."""
    count = dataset.n_images if count is None else count
    return DataLoader(_Images(dataset, count), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers)
