"""Retrieval data sets: images with five captions each, in the papers' layout (caption
``5k + c`` belongs to image ``k``).

Every data set here exposes ``n_images``, ``captions`` (the flat list), ``captions_per_image``
and ``image(i) -> Tensor[3, H, W]`` (transformed, normalised). :class:`SceneDataset` also keeps
its :class:`~hatmodel.data.scenes.Scene` objects in ``scenes`` (attributes and boxes of
every object: the hook for region-based models such as TERAN).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .scenes import Scene, generate_scene, render

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAPTIONS_PER_IMAGE = 5


def normalise(images_u8: Tensor) -> Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 normalised with ImageNet's mean and std."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


class SceneDataset:
    """``count`` generated scenes of ``split``, rendered once at ``image_size`` pixels."""

    captions_per_image = CAPTIONS_PER_IMAGE

    def __init__(self, split: str, count: int, image_size: int, seed: int = 0,
                 min_objects: int = 2, max_objects: int = 3) -> None:
        if count < 1:
            raise ValueError(f"count: expected at least one image for split {split!r}, got {count}")
        if not 1 <= min_objects <= max_objects <= 9:
            raise ValueError(
                f"min_objects/max_objects: expected 1 <= min <= max <= 9, got "
                f"{min_objects}, {max_objects}"
            )
        self.split = split
        self.scenes: list[Scene] = [
            generate_scene(seed, split, i, min_objects, max_objects, CAPTIONS_PER_IMAGE)
            for i in range(count)
        ]
        pixels = np.stack([np.asarray(render(s, image_size)) for s in self.scenes])
        self.pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        self.captions = [c for s in self.scenes for c in s.captions]

    @property
    def n_images(self) -> int:
        return len(self.scenes)

    def image(self, index: int, train: bool = False) -> Tensor:
        # No augmentation: a flip or crop would contradict "left" / "top" in the captions.
        return normalise(self.pixels[index])


class KarpathyDataset:
    """One split of a Karpathy-format JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``).

    Images are read from ``root / filepath / filename`` (``filepath`` only in COCO's file).
    ``split="train"`` with ``restval=True`` adds COCO's restval images. Each image keeps its
    first five captions. Transforms are HAT's: train RandomResizedCrop + horizontal flip,
    eval Resize(size * 256 / 224) + CenterCrop, ImageNet mean and std.
    """

    captions_per_image = CAPTIONS_PER_IMAGE

    def __init__(self, json_path: str | Path, root: str | Path, split: str, image_size: int = 224,
                 restval: bool = False) -> None:
        json_path, root = Path(json_path), Path(root)
        if not json_path.is_file():
            raise ValueError(f"data.json: no Karpathy split file at {json_path}")
        if not root.is_dir():
            raise ValueError(f"data.root: no image folder at {root}")
        with open(json_path) as f:
            entries = json.load(f)["images"]
        wanted = {split} | ({"restval"} if restval and split == "train" else set())
        self.paths: list[Path] = []
        self.captions: list[str] = []
        for entry in entries:
            if entry["split"] not in wanted:
                continue
            sentences = [s["raw"].strip() for s in entry["sentences"]][:CAPTIONS_PER_IMAGE]
            if len(sentences) < CAPTIONS_PER_IMAGE:
                raise ValueError(
                    f"data.json: image {entry['filename']!r} has {len(sentences)} captions, "
                    f"expected {CAPTIONS_PER_IMAGE}"
                )
            self.paths.append(root / entry.get("filepath", "") / entry["filename"])
            self.captions.extend(sentences)
        if not self.paths:
            raise ValueError(f"data.json: no images with split {split!r} in {json_path}")
        self.train_transform, self.eval_transform = _transforms(image_size)

    @property
    def n_images(self) -> int:
        return len(self.paths)

    def image(self, index: int, train: bool = False) -> Tensor:
        with Image.open(self.paths[index]) as img:
            img = img.convert("RGB")
            return (self.train_transform if train else self.eval_transform)(img)


def _transforms(size: int):
    from torchvision import transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    resize = int(round(size * 256 / 224))
    evaluate = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), norm])
    return train, evaluate
