"""Region features (TERAN): detector regions instead of pixels, in three formats.

- ``npz``: one ``<image stem>.npz`` per image in ``data.regions.root`` (``features``
  ``[k, F]``, ``boxes`` ``[k, 4]`` as ``(x0, y0, x1, y1)`` pixels, ``image_w``, ``image_h``)
  beside the Karpathy JSON (``data.json``) that gives captions and splits;
- ``scan``: the precomputed arrays of the SCAN family of papers in ``data.regions.root``:
  ``{name}_ims.npy`` ``[N, R, F]`` and ``{name}_caps.txt`` (five lines per image), no boxes
  (``data.regions.split_names`` maps train / val / test to the file names, e.g. COCO's
  ``testall`` for the 5K test);
- ``scenes``: the embedded default, derived from the generated scenes of
  :mod:`hatmodel.data.scenes` with nothing downloaded: one region per object plus
  ``data.regions.background`` background regions; each feature is a fixed random projection
  of the object's attributes (shape, colour, size) plus Gaussian noise, each box the object's
  box. Deterministic in ``(seed, split, index)``.

Every data set here has the interface of :mod:`hatmodel.data.datasets` (``n_images``,
``captions``, ``captions_per_image``, ``image(i)``), so the training loop, the loaders and the
evaluation run unchanged. ``image(i)`` returns the regions packed into one fixed-size tensor
(:func:`pack_regions`): ``[max_regions, F + 5]`` = features, normalised box, valid flag, the
valid regions first. Models unpack it with :func:`unpack_regions`. Bad or inconsistent files
raise ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .scenes import COLOURS, SHAPES, SIZES, SPLITS, Scene, generate_scene, render

CAPTIONS_PER_IMAGE = 5
FORMATS = ("scenes", "npz", "scan")
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (detectors round)


def pack_regions(features: Tensor, boxes: Tensor, max_regions: int) -> Tensor:
    """``features`` ``[k, F]`` and normalised ``boxes`` ``[k, 4]`` -> ``[max_regions, F + 5]``
    (features, box, 1.0 for a valid row; zero rows after the first ``k``). Regions past
    ``max_regions`` are dropped (detectors list them by confidence)."""
    k = min(features.shape[0], max_regions)
    out = torch.zeros(max_regions, features.shape[1] + 5, dtype=torch.float32)
    out[:k, : features.shape[1]] = features[:k]
    out[:k, features.shape[1]: -1] = boxes[:k]
    out[:k, -1] = 1.0
    return out


def unpack_regions(packed: Tensor, feature_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, R, F + 5]`` -> features ``[B, R, F]``, boxes ``[B, R, 4]`` (views) and int64
    lengths ``[B]`` (the number of valid regions)."""
    if packed.dim() != 3 or packed.shape[-1] != feature_dim + 5:
        raise ValueError(
            f"images: expected packed regions [B, R, {feature_dim + 5}] "
            f"(features, box, valid flag), got {tuple(packed.shape)}"
        )
    lengths = packed[..., -1].sum(-1).round().to(torch.int64)
    return packed[..., :feature_dim], packed[..., feature_dim:-1], lengths


def _check_features(path: Path, features: np.ndarray, feature_dim: int, what: str) -> None:
    if features.ndim != 2 or features.shape[1] != feature_dim or features.shape[0] < 1:
        raise ValueError(
            f"regions: {path}: {what} has shape {features.shape}, expected [k >= 1, {feature_dim}]"
        )
    if not np.isfinite(features).all():
        raise ValueError(f"regions: {path}: {what} holds NaN or Inf")


class _RegionData:
    """Shared parts: the packed ``image(i)`` and the boxes for pictures."""

    captions_per_image = CAPTIONS_PER_IMAGE
    captions: list[str]
    feature_dim: int
    max_regions: int

    def regions(self, index: int) -> tuple[Tensor, Tensor]:
        """Features ``[k, F]`` and normalised boxes ``[k, 4]`` of image ``index``."""
        raise NotImplementedError

    def image(self, index: int, train: bool = False) -> Tensor:
        features, boxes = self.regions(index)
        return pack_regions(features, boxes, self.max_regions)

    def picture(self, index: int) -> Image.Image:
        """An RGB picture to draw image ``index``'s boxes on."""
        return Image.new("RGB", (256, 256), (128, 128, 128))


class SceneRegions(_RegionData):
    """Regions of the generated scenes of ``split`` (the embedded default)."""

    ATTRIBUTES = len(SHAPES) + len(COLOURS) + len(SIZES) + 1  # + "background"

    def __init__(self, split: str, count: int, seed: int = 0, min_objects: int = 2,
                 max_objects: int = 3, background: int = 3, feature_dim: int = 2048,
                 noise: float = 1.0, max_regions: int | None = None,
                 image_size: int = 128) -> None:
        if count < 1:
            raise ValueError(f"count: expected at least one image for split {split!r}, got {count}")
        if background < 0 or feature_dim < 1 or noise < 0:
            raise ValueError(
                f"data.regions: background >= 0, feature_dim >= 1 and noise >= 0 expected, got "
                f"{background}, {feature_dim}, {noise}"
            )
        need = max_objects + background
        self.max_regions = need if max_regions is None else int(max_regions)
        if self.max_regions < need:
            raise ValueError(
                f"data.regions.max_regions: {self.max_regions} cannot hold {max_objects} objects "
                f"+ {background} background regions"
            )
        self.split, self.seed, self.background = split, seed, background
        self.feature_dim, self.noise, self.image_size = feature_dim, noise, image_size
        self.scenes: list[Scene] = [
            generate_scene(seed, split, i, min_objects, max_objects, CAPTIONS_PER_IMAGE)
            for i in range(count)
        ]
        self.captions = [c for s in self.scenes for c in s.captions]
        # The "detector": one fixed projection of one-hot attributes, the same for every split.
        proj = np.random.default_rng([seed, 7919]).standard_normal(
            (self.ATTRIBUTES, feature_dim))
        self.projection = torch.from_numpy(proj.astype(np.float32))

    @property
    def n_images(self) -> int:
        return len(self.scenes)

    def attributes(self, scene: Scene) -> Tensor:
        """``[objects + background, ATTRIBUTES]`` one-hot attribute rows."""
        rows = torch.zeros(len(scene.objects) + self.background, self.ATTRIBUTES)
        colours = list(COLOURS)
        for k, obj in enumerate(scene.objects):
            rows[k, SHAPES.index(obj.shape)] = 1
            rows[k, len(SHAPES) + colours.index(obj.colour)] = 1
            rows[k, len(SHAPES) + len(COLOURS) + SIZES.index(obj.size)] = 1
        rows[len(scene.objects):, -1] = 1
        return rows

    def regions(self, index: int) -> tuple[Tensor, Tensor]:
        scene = self.scenes[index]
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index, 1])
        k = len(scene.objects) + self.background
        noise = torch.from_numpy(rng.standard_normal((k, self.feature_dim)).astype(np.float32))
        features = self.attributes(scene) @ self.projection + self.noise * noise
        # Background regions: random boxes of at least a fifth of the side.
        corner = rng.uniform(0.0, 0.8, (self.background, 2))
        side = rng.uniform(0.2, 1.0, (self.background, 2)) * (1.0 - corner)
        bg = np.concatenate([corner, corner + side], 1)
        boxes = np.concatenate([np.asarray([o.box for o in scene.objects]).reshape(-1, 4), bg])
        return features, torch.from_numpy(np.clip(boxes, 0.0, 1.0).astype(np.float32))

    def picture(self, index: int) -> Image.Image:
        return render(self.scenes[index], self.image_size)


def karpathy_entries(json_path: Path, split: str, restval: bool) -> list[dict[str, Any]]:
    """The entries of ``split`` (+ restval) in a Karpathy JSON, each with five captions."""
    if not json_path.is_file():
        raise ValueError(f"data.json: no Karpathy split file at {json_path}")
    with open(json_path) as f:
        entries = json.load(f)["images"]
    wanted = {split} | ({"restval"} if restval and split == "train" else set())
    out = []
    for entry in entries:
        if entry["split"] not in wanted:
            continue
        if len(entry["sentences"]) < CAPTIONS_PER_IMAGE:
            raise ValueError(
                f"data.json: {json_path}: image {entry['filename']!r} has "
                f"{len(entry['sentences'])} captions, expected {CAPTIONS_PER_IMAGE}"
            )
        out.append(entry)
    if not out:
        raise ValueError(f"data.json: no images with split {split!r} in {json_path}")
    return out


class NpzRegions(_RegionData):
    """Per-image ``.npz`` region files named by the Karpathy JSON's image file names.

    ``root / (stem of filename) + ".npz"`` holds image ``filename``'s regions. Every file is
    checked to exist when the data set is built and checked in full when it is read.
    ``image_root`` (optional, the image folder) gives :meth:`picture` the real photo.
    """

    def __init__(self, json_path: str | Path, root: str | Path, split: str,
                 feature_dim: int = 2048, max_regions: int = 36, restval: bool = False,
                 image_root: str | Path | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data.regions.root: no region folder at {root}")
        entries = karpathy_entries(Path(json_path), split, restval)
        self.feature_dim, self.max_regions = feature_dim, max_regions
        self.files = [root / (Path(e["filename"]).stem + ".npz") for e in entries]
        missing = [p for p in self.files if not p.is_file()]
        if missing:
            raise ValueError(
                f"regions: {missing[0]}: no region file for image "
                f"{entries[self.files.index(missing[0])]['filename']!r} "
                f"({len(missing)} of {len(self.files)} missing)"
            )
        self.image_paths = [
            None if image_root is None else Path(image_root) / e.get("filepath", "") / e["filename"]
            for e in entries
        ]
        self.captions = [s["raw"].strip() for e in entries
                         for s in e["sentences"][:CAPTIONS_PER_IMAGE]]

    @property
    def n_images(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Features, pixel boxes, width and height of image ``index``, all checked."""
        path = self.files[index]
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("features", "boxes", "image_w", "image_h")}
        except KeyError as err:
            raise ValueError(f"regions: {path}: missing array {err}; expected features, boxes, "
                             "image_w, image_h") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"regions: {path}: not a readable .npz file ({err})") from None
        features = np.asarray(arrays["features"], dtype=np.float32)
        boxes = np.asarray(arrays["boxes"], dtype=np.float64)
        _check_features(path, features, self.feature_dim, "features")
        w, h = float(arrays["image_w"]), float(arrays["image_h"])
        if not (w > 0 and h > 0):
            raise ValueError(f"regions: {path}: image_w / image_h must be positive, got {w}, {h}")
        if boxes.shape != (features.shape[0], 4):
            raise ValueError(f"regions: {path}: boxes has shape {boxes.shape}, expected "
                             f"({features.shape[0]}, 4) (one box per feature row)")
        tol = BOX_TOLERANCE
        if (not np.isfinite(boxes).all() or (boxes[:, 2] < boxes[:, 0]).any()
                or (boxes[:, 3] < boxes[:, 1]).any() or (boxes < -tol).any()
                or (boxes[:, [0, 2]] > w + tol).any() or (boxes[:, [1, 3]] > h + tol).any()):
            raise ValueError(f"regions: {path}: boxes must be finite (x0, y0, x1, y1) pixels "
                             f"inside the {w:g} x {h:g} image")
        return features, boxes, w, h

    def regions(self, index: int) -> tuple[Tensor, Tensor]:
        features, boxes, w, h = self.read(index)
        norm = np.clip(boxes / np.array([w, h, w, h]), 0.0, 1.0).astype(np.float32)
        return torch.from_numpy(features), torch.from_numpy(norm)

    def picture(self, index: int) -> Image.Image:
        path = self.image_paths[index]
        if path is not None and path.is_file():
            with Image.open(path) as img:
                return img.convert("RGB")
        _, _, w, h = self.read(index)
        return Image.new("RGB", (int(w), int(h)), (128, 128, 128))


class ScanRegions(_RegionData):
    """SCAN-style ``{name}_ims.npy`` ``[N, R, F]`` + ``{name}_caps.txt`` (5 N lines).

    The array is memory-mapped; each image is checked for NaN when read. There are no boxes:
    every box is zero, so the box embedding adds one constant.
    """

    def __init__(self, root: str | Path, name: str, feature_dim: int = 2048,
                 max_regions: int = 36) -> None:
        root = Path(root)
        ims, caps = root / f"{name}_ims.npy", root / f"{name}_caps.txt"
        for path in (ims, caps):
            if not path.is_file():
                raise ValueError(f"regions: {path}: no such file (SCAN-style precomputed split)")
        try:
            self.features = np.load(ims, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"regions: {ims}: not a readable .npy array ({err})") from None
        if self.features.ndim != 3 or self.features.shape[2] != feature_dim:
            raise ValueError(f"regions: {ims}: shape {self.features.shape}, expected "
                             f"[images, regions, {feature_dim}]")
        self.captions = [line.strip() for line in caps.read_text().splitlines() if line.strip()]
        expected = CAPTIONS_PER_IMAGE * self.features.shape[0]
        if len(self.captions) != expected:
            raise ValueError(
                f"regions: {caps}: {len(self.captions)} captions for the "
                f"{self.features.shape[0]} images of {ims}; expected {expected} (five per image)"
            )
        self.path, self.feature_dim, self.max_regions = ims, feature_dim, max_regions

    @property
    def n_images(self) -> int:
        return int(self.features.shape[0])

    def regions(self, index: int) -> tuple[Tensor, Tensor]:
        features = np.array(self.features[index], dtype=np.float32)
        _check_features(self.path, features, self.feature_dim, f"image {index}")
        return torch.from_numpy(features), torch.zeros(features.shape[0], 4)


def build_region_dataset(cfg: dict[str, Any], split: str) -> _RegionData:
    """Split ``split`` of the region data that ``cfg["data"]["regions"]`` names."""
    data, reg = cfg["data"], cfg["data"]["regions"]
    fmt, dim, max_regions = reg["format"], int(reg["feature_dim"]), reg["max_regions"]
    if fmt == "scenes":
        sc = data["scenes"]
        count = {"train": sc["train_images"], "val": sc["val_images"],
                 "test": sc["test_images"]}[split]
        return SceneRegions(split, count, sc["seed"], sc["min_objects"], sc["max_objects"],
                            int(reg["background"]), dim, float(reg["noise"]), max_regions,
                            int(data["image_size"]))
    if fmt not in FORMATS:
        raise ValueError(f"data.regions.format: expected one of {FORMATS} or null, got {fmt!r}")
    if not reg["root"]:
        raise ValueError(f"data.regions.root: required for data.regions.format={fmt!r}")
    if fmt == "npz":
        if not data["json"]:
            raise ValueError("data.json: the Karpathy split file is required for npz regions")
        return NpzRegions(data["json"], reg["root"], split, dim, int(max_regions or 36),
                          bool(data["restval"]), data["root"])
    return ScanRegions(reg["root"], reg["split_names"][split], dim, int(max_regions or 36))


__all__ = ["FORMATS", "NpzRegions", "ScanRegions", "SceneRegions", "build_region_dataset",
           "karpathy_entries", "pack_regions", "unpack_regions"]
