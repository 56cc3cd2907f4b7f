"""Word-to-image alignment pictures: ``python -m hatmodel.visualize CHECKPOINT [--image I]
[--caption TEXT] [--level L] [--out PNG]``.

For one (image, caption) pair and a trained checkpoint (HAT or TERAN), one PNG shows, for each
word, where in the image it aligns, beside it the word x image-token similarity matrix as a
heat map, and the pair's score (``model.score``, the number the retrieval ranks by):

- TERAN: the caption's aligned words (no [CLS], no last ``drop_last_tokens`` tokens) against
  the regions: per word the boxes of its best regions drawn on the picture (the embedded
  default renders its scene; npz regions use the photo when ``data.root`` holds it);
- HAT: every token against the patch grid of level ``--level`` (0 = the finest stage), per
  word as a heat map of the cosine similarity over the picture.

``--image`` is an index into ``--split`` (default test) or, for HAT, an image file. The
caption defaults to the image's first caption. Config overrides (``key.sub=value``) adjust the
stored config, e.g. ``data.root=...`` for real data elsewhere.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .models import RetrievalModel, Tokens

DISPLAY_SIZE = 256
TOP_REGIONS = 2


def token_strings(tokenizer, ids: Tensor) -> list[str]:
    """The token strings of one row of ids (word-level scene tokenizer or HuggingFace)."""
    inner = tokenizer.tokenizer
    if hasattr(inner, "convert_ids_to_tokens"):
        return list(inner.convert_ids_to_tokens(ids.tolist()))
    return [inner.id_to_token(int(i)) for i in ids]


def _hat_input(cfg: dict[str, Any], dataset, image: str | int) -> tuple[Tensor, Image.Image]:
    """(normalised image tensor ``[3, S, S]``, the picture it shows) for HAT."""
    if isinstance(image, int) and hasattr(dataset, "pixels"):
        return dataset.image(image), Image.fromarray(dataset.pixels[image].permute(1, 2, 0).numpy())
    path = Path(dataset.paths[image]) if isinstance(image, int) else Path(image)
    if not path.is_file():
        raise ValueError(f"image: no image file at {path}")
    with Image.open(path) as img:
        return hat_image(cfg, img.convert("RGB"))


def hat_image(cfg: dict[str, Any], img: Image.Image) -> tuple[Tensor, Image.Image]:
    """(normalised tensor ``[3, S, S]``, the picture it shows) of an RGB image, with the
    evaluation transform of ``cfg``'s data (HAT's input for any image, e.g. an upload)."""
    from .data.datasets import normalise

    size = int(cfg["data"]["image_size"])
    if cfg["data"]["kind"] == "scenes":
        picture = img.resize((size, size), Image.BILINEAR)
    else:  # the evaluation transform: Resize(size * 256 / 224) + CenterCrop(size)
        from torchvision import transforms as T

        picture = T.CenterCrop(size)(T.Resize(int(round(size * 256 / 224)))(img))
    pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    return normalise(pixels), picture


def _matrix(images: Tokens, texts: Tokens, level: int, cosine: bool) -> Tensor:
    """``[words, image tokens]`` similarities of the valid tokens of one pair at ``level``."""
    v, t = images.levels[level][0], texts.levels[level][0]
    m = v.shape[0] if images.lengths[level] is None else int(images.lengths[level][0])
    n = t.shape[0] if texts.lengths[level] is None else int(texts.lengths[level][0])
    v, t = v[:m].float(), t[:n].float()
    if cosine:
        v, t = (torch.nn.functional.normalize(x, dim=-1) for x in (v, t))
    return t @ v.T


def alignment(model: RetrievalModel, tokenizer, images: Tensor, caption: str,
              level: int = 0) -> dict[str, Any]:
    """Score, word strings and word x image-token matrix of one pair (no gradients)."""
    from .models.teran import TERAN

    is_teran = isinstance(model, TERAN)
    ids, mask = tokenizer([caption])
    with torch.no_grad():
        img = model.encode_images(images[None])
        txt = model.encode_texts(ids, mask)
        score = float(model.score(img, txt)[0, 0])
    levels = len(img.levels)
    if not 0 <= level < levels:
        raise ValueError(f"level: expected 0 (the finest) to {levels - 1}, got {level}")
    # TERAN's tokens are already L2-normalised; HAT's are not, so show their cosine.
    sims = _matrix(img, txt, level, cosine=not is_teran)
    words = token_strings(tokenizer, ids[0, : int(mask[0].sum())])
    left_out: list[str] = []
    if is_teran:  # the aligned words are the view past [CLS], minus the last few
        left_out = [words[0]] + words[1 + sims.shape[0]:]
        words = words[1: 1 + sims.shape[0]]
    return {"score": score, "words": words, "sims": sims.numpy(), "left_out": left_out,
            "model": "TERAN" if is_teran else "HAT", "level": level}


def draw(result: dict[str, Any], picture: Image.Image, out: str | Path | BinaryIO,
         boxes: np.ndarray | None = None, caption: str = "") -> Path | BinaryIO:
    """Write the PNG: per-word panels (best boxes, or a heat map over the patch grid) and the
    similarity matrix. ``boxes``: ``[regions, 4]`` normalised, for TERAN. ``out``: a path, or
    a binary file object (the picture as bytes, e.g. for a web page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    words, sims = result["words"], result["sims"]
    cols = min(5, len(words))
    rows = math.ceil(len(words) / cols)
    fig = plt.figure(figsize=(2.2 * cols + 6.5, max(2.3 * rows, 4.5) + 0.9))
    grid = fig.add_gridspec(rows, cols + 3, width_ratios=[1] * cols + [0.25, 1.4, 1.4])
    w, h = picture.size
    for k, word in enumerate(words):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        ax.imshow(picture, extent=(0, w, h, 0))
        if boxes is None:  # HAT: the word's similarity over the patch grid, its own scale
            side = int(round(math.sqrt(sims.shape[1])))
            heat = sims[k].reshape(side, -1) if side * side == sims.shape[1] else sims[k][None]
            ax.imshow(heat, extent=(0, w, h, 0), cmap="jet", alpha=0.5, vmin=float(heat.min()),
                      vmax=float(heat.max()) + 1e-6, interpolation="bilinear")
        else:  # TERAN: all regions faint, the best ones bold
            for x0, y0, x1, y1 in boxes:
                ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h,
                                       fill=False, ec="white", lw=0.5, alpha=0.5))
            for rank, r in enumerate(np.argsort(-sims[k])[:TOP_REGIONS]):
                x0, y0, x1, y1 = boxes[r]
                ax.add_patch(Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h,
                                       fill=False, ec="lime" if rank == 0 else "orange",
                                       lw=2.5 if rank == 0 else 1.2,
                                       ls="-" if rank == 0 else "--"))
        best = float(sims[k].max())
        ax.set_title(f"{word}  ({best:.2f})", fontsize=9)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    ax = fig.add_subplot(grid[:, cols + 1:])
    image_axis = "region" if boxes is not None else f"patch (level {result['level']})"
    im = ax.imshow(sims, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(words)), words, fontsize=8)
    if boxes is not None:
        ax.set_xticks(range(sims.shape[1]))
    ax.set_xlabel(image_axis)
    kind = ("cosine similarity (panels: each word's own colour scale)" if boxes is None
            else "similarity (L2-normalised tokens)")
    ax.set_title(f"word x {image_axis.split(' ')[0]} {kind}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    note = f"  (left out of the alignment: {' '.join(result['left_out'])})" \
        if result["left_out"] else ""
    fig.suptitle(f"{result['model']}  score {result['score']:.3f}\n\"{caption}\"{note}",
                 fontsize=10)
    fig.tight_layout()
    if isinstance(out, (str, Path)):
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return out


def visualize(checkpoint: str | Path, image: str | int = 0, caption: str | None = None,
              out: str | Path = "alignment.png", split: str = "test", level: int = 0,
              overrides: list[str] | None = None) -> Path:
    """Load ``checkpoint`` and write the alignment picture of (``image``, ``caption``) to
    ``out`` (a ``.png`` file, or a folder: ``alignment.png`` in it); returns the file written."""
    from .checkpoint import load_for_eval
    from .data import build_dataset, build_tokenizer

    out = output_file(out)
    if level < 0:
        raise ValueError(f"level: expected 0 (the finest) or above, got {level}")
    model, cfg, _ = load_for_eval(checkpoint, overrides)
    model.to("cpu")
    tokenizer = build_tokenizer(cfg)
    if isinstance(image, str) and image.lstrip("-").isdigit():
        image = int(image)
    dataset = build_dataset(cfg, split) if isinstance(image, int) or caption is None else None
    if isinstance(image, int) and not 0 <= image < dataset.n_images:
        raise ValueError(f"image: index {image} outside the {dataset.n_images} images of {split}")
    if caption is None:
        if not isinstance(image, int):
            raise ValueError("caption: required with an image file")
        caption = dataset.captions[image * dataset.captions_per_image]
    tensor, picture, boxes = pair_inputs(model, cfg, dataset, image)
    result = alignment(model, tokenizer, tensor, caption, level)
    return draw(result, picture, out, boxes, caption)


def output_file(out: str | Path) -> Path:
    """The PNG file that ``out`` names: itself when it ends in ``.png``, ``alignment.png``
    inside it when it is a folder (existing, or written with a trailing separator)."""
    text, out = str(out), Path(out)
    if out.is_dir() or text.endswith(("/", "\\")):
        return out / "alignment.png"
    if out.suffix.lower() != ".png":
        raise ValueError(f"out: expected a .png file or a folder, got {text!r}")
    return out


def pair_inputs(model: RetrievalModel, cfg: dict[str, Any], dataset, image: str | int
                ) -> tuple[Tensor, Image.Image, np.ndarray | None]:
    """(model input, picture to draw on, TERAN's normalised boxes or ``None``) of ``image``:
    an index into ``dataset`` or (HAT) an image file."""
    from .models.teran import TERAN

    if isinstance(model, TERAN):
        if not isinstance(image, int):
            raise ValueError("image: TERAN reads region features: give an index into the split")
        tensor = dataset.image(image)
        _, norm_boxes = dataset.regions(image)
        return tensor, dataset.picture(image), norm_boxes[: tensor[:, -1].sum().long()].numpy()
    tensor, picture = _hat_input(cfg, dataset, image)
    return tensor, display_picture(picture), None


def display_picture(picture: Image.Image) -> Image.Image:
    """A small picture scaled up (nearest) to ``DISPLAY_SIZE`` so the panels stay legible."""
    if picture.size[0] < DISPLAY_SIZE:
        return picture.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.NEAREST)
    return picture


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m hatmodel.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder (uses best.safetensors) or a checkpoint file")
    p.add_argument("--image", default="0",
                   help="index into --split, or (HAT) an image file; default %(default)s")
    p.add_argument("--caption", default=None, help="default: the image's first caption")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--level", type=int, default=0,
                   help="HAT: which level's patch grid (0 = finest); default %(default)s")
    p.add_argument("--out", default="alignment.png",
                   help="a .png file, or a folder (alignment.png in it); default %(default)s")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_intermixed_args(argv)
    out = visualize(args.checkpoint, args.image, args.caption, args.out, args.split,
                    args.level, args.overrides)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from .cli import run

    run(main, "python -m hatmodel.visualize")
