"""Index a gallery for search: ``python -m hatmodel.index RUN_DIR --side images|texts --out
INDEX_DIR [--split test | --images FOLDER | --captions FILE.txt]``.

Encodes one side (a split's images or captions, the images of a folder, or the lines of a
text file) with the run's best checkpoint, batch by batch, into a
:class:`hatkernels.TokenStore`, so that host memory holds a shard, not the gallery. An index
folder holds::

    index.json   written last: format, side, count, checkpoint, fingerprint (SHA-256 of the
                 checkpoint file), source ({"kind": "split", "split": ...} | {"kind": "images",
                 "folder": ...} | {"kind": "captions", "file": ...}), dtype
    items.json   one entry per gallery item, in store order: {"id", "caption"} for captions
                 (split captions also "image": their image's index), {"id", "captions"} for
                 split images (their true captions), {"id", "file"} for image files
    tokens/      the TokenStore (its ids are the items' ids)

The folder is built beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from hatkernels import TokenStore
from hatkernels.store import DEFAULT_SHARD_SIZE, temporary_folder

from .models import RetrievalModel, Tokens
from .runtime import amp_autocast, pick_device

FORMAT = "hatmodel-index-1"
SIDES = ("images", "texts")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_fingerprint(checkpoint: str | Path) -> str:
    """SHA-256 of a checkpoint file: which weights made a store's tokens."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def image_tokens(model: RetrievalModel, batches: Iterable[Tensor], device: torch.device,
                 amp: bool = False) -> Iterator[Tokens]:
    """Token sets of each batch of model-ready images, on the CPU."""
    for images in batches:
        with amp_autocast(device, amp):
            yield model.encode_images(images.to(device)).to("cpu")


@torch.no_grad()
def caption_tokens(model: RetrievalModel, tokenizer, captions: Sequence[str], batch_size: int,
                   device: torch.device, amp: bool = False) -> Iterator[Tokens]:
    """Token sets of ``captions``, ``batch_size`` at a time, on the CPU."""
    for start in range(0, len(captions), batch_size):
        ids, mask = tokenizer(list(captions[start:start + batch_size]))
        with amp_autocast(device, amp):
            yield model.encode_texts(ids.to(device), mask.to(device)).to("cpu")


def write_store(path: str | Path, batches: Iterable[Tokens], *, tokens: int | None = None,
                dtype: torch.dtype = torch.float16, fingerprint: str = "",
                ids: Sequence[int | str] | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                progress: Any = None) -> TokenStore:
    """Stream ``batches`` into a new store at ``path``. Each level holds ``tokens`` padded
    tokens (default: the first batch's); ``ids`` one per item (default 0, 1, ...)."""
    writer, done = None, 0
    try:
        for batch in batches:
            if writer is None:
                levels = [(tokens or t.shape[1], t.shape[2]) for t in batch.levels]
                writer = TokenStore.writer(path, levels, dtype=dtype, fingerprint=fingerprint,
                                           shard_size=shard_size)
            n = len(batch)
            writer.add(batch.levels, batch.lengths, None if ids is None else ids[done:done + n])
            done += n
            if progress is not None:
                progress.update(n)
        if writer is None:
            raise ValueError("batches: nothing to store (no items)")
        return writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images: no folder at {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def load_image(cfg: dict[str, Any], path: str | Path) -> Tensor:
    """The model input ``[3, S, S]`` of an image file (the evaluation transform)."""
    from .visualize import hat_image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image: no image file at {path}")
    with Image.open(path) as img:
        return hat_image(cfg, img.convert("RGB"))[0]


def read_captions(path: str | Path) -> list[str]:
    """The non-empty lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--captions: no file at {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    captions = [line for line in lines if line]
    if not captions:
        raise ValueError(f"--captions: no captions in {path}")
    return captions


def _gallery(model: RetrievalModel, cfg: dict[str, Any], side: str, source: dict[str, Any],
             batch_size: int, device: torch.device, amp: bool):
    """(token batches, items, ids, padded tokens or None) of the gallery to index."""
    if source["kind"] == "captions" or (source["kind"] == "split" and side == "texts"):
        from .data import build_dataset, build_tokenizer

        if source["kind"] == "split":
            dataset = build_dataset(cfg, source["split"])
            captions = dataset.captions
            items = [{"id": j, "caption": c, "image": j // dataset.captions_per_image}
                     for j, c in enumerate(captions)]
        else:
            captions = read_captions(source["file"])
            items = [{"id": j, "caption": c} for j, c in enumerate(captions)]
        batches = caption_tokens(model, build_tokenizer(cfg), captions, batch_size, device, amp)
        return batches, items, int(cfg["data"]["max_tokens"])
    if source["kind"] == "split":
        from .data import build_dataset, image_loader

        dataset = build_dataset(cfg, source["split"])
        cpi = dataset.captions_per_image
        items = [{"id": i, "captions": dataset.captions[i * cpi:(i + 1) * cpi]}
                 for i in range(dataset.n_images)]
        return image_tokens(model, image_loader(dataset, batch_size), device, amp), items, None
    files = image_files(source["folder"])
    items = [{"id": f.name, "file": str(f.resolve())} for f in files]

    def pixels() -> Iterator[Tensor]:
        for start in range(0, len(files), batch_size):
            yield torch.stack([load_image(cfg, f) for f in files[start:start + batch_size]])

    return image_tokens(model, pixels(), device, amp), items, None


def build_index(checkpoint: str | Path, out: str | Path, side: str, *, split: str = "test",
                images: str | Path | None = None, captions: str | Path | None = None,
                dtype: str = "float16", shard_size: int = DEFAULT_SHARD_SIZE,
                batch_size: int | None = None, device: str | None = None,
                overrides: list[str] | None = None, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Encode one side of a gallery with ``checkpoint`` into an index folder at ``out``."""
    from .checkpoint import load_for_eval

    if side not in SIDES:
        raise ValueError(f"--side: expected one of {SIDES}, got {side!r}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"--dtype: expected one of {tuple(STORE_DTYPES)}, got {dtype!r}")
    if images is not None and captions is not None:
        raise ValueError("--images/--captions: give at most one")
    if images is not None and side != "images":
        raise ValueError("--images: indexes images; use --side images")
    if captions is not None and side != "texts":
        raise ValueError("--captions: indexes captions; use --side texts")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"--out: {out} already exists (pass --overwrite to replace it)")
    source = ({"kind": "images", "folder": str(Path(images).resolve())} if images is not None
              else {"kind": "captions", "file": str(Path(captions).resolve())}
              if captions is not None else {"kind": "split", "split": split})
    model, cfg, path = load_for_eval(checkpoint, overrides)
    dev = pick_device(device or cfg["train"]["device"])
    model.to(dev)
    batches, items, tokens = _gallery(model, cfg, side, source,
                                      int(batch_size or cfg["eval"]["batch_size"]), dev,
                                      bool(cfg["train"]["amp"]))
    fingerprint = model_fingerprint(path)
    tmp = temporary_folder(out)
    try:
        with tqdm(total=len(items), desc=f"index {side}", disable=not progress) as bar:
            write_store(tmp / "tokens", batches, tokens=tokens, dtype=STORE_DTYPES[dtype],
                        fingerprint=fingerprint, ids=[it["id"] for it in items],
                        shard_size=shard_size, progress=bar)
        (tmp / "items.json").write_text(json.dumps(items, ensure_ascii=False) + "\n")
        info = {"format": FORMAT, "side": side, "count": len(items),
                "checkpoint": str(path.resolve()), "fingerprint": fingerprint,
                "source": source, "dtype": dtype}
        (tmp / "index.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_index(path: str | Path, fingerprint: str | None = None
               ) -> tuple[dict[str, Any], list[dict[str, Any]], TokenStore]:
    """(index.json, items, store) of an index folder; with ``fingerprint``, checks that the
    index was made by that model."""
    path = Path(path)
    info_file = path / "index.json"
    if not info_file.is_file():
        raise ValueError(f"index: {path} is not an index folder (no index.json)")
    try:
        info = json.loads(info_file.read_text())
        items = json.loads((path / "items.json").read_text())
        ok = info["format"] == FORMAT and info["side"] in SIDES and len(items) == info["count"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"index: {path} is not a valid index folder ({err})") from None
    if not ok:
        raise ValueError(f"index: {path} is not a valid index folder (format, side or count)")
    if fingerprint is not None and info["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint: the index at {path} was built with another model "
                         f"({info['checkpoint']}); rebuild it or pass that checkpoint")
    store = TokenStore.open(path / "tokens", fingerprint=info["fingerprint"])
    if len(store) != len(items):
        raise ValueError(f"index: {path} holds {len(store)} tokens for {len(items)} items")
    return info, items, store


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m hatmodel.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder (uses best.safetensors) or a checkpoint file")
    p.add_argument("--side", choices=SIDES, required=True, help="what the gallery holds")
    p.add_argument("--out", required=True, help="the index folder to create")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--images", default=None, help="index the image files of this folder")
    p.add_argument("--captions", default=None, help="index the lines of this text file")
    p.add_argument("--dtype", choices=tuple(STORE_DTYPES), default="float16",
                   help="token dtype on disk (scores are computed in float32)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="items per shard")
    p.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the config's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_intermixed_args(argv)
    out = build_index(args.checkpoint, args.out, args.side, split=args.split,
                      images=args.images, captions=args.captions, dtype=args.dtype,
                      shard_size=args.shard_size, batch_size=args.batch_size,
                      device=args.device, overrides=args.overrides, overwrite=args.overwrite,
                      progress=not args.no_progress)
    info, _, _ = read_index(out)
    print(f"indexed {info['count']} {info['side']} ({info['dtype']}) into {out}")
    return out


if __name__ == "__main__":
    from .cli import run

    run(main, "python -m hatmodel.index")
