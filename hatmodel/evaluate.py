"""Retrieval evaluation (the papers' protocol): encode every test image and caption once,
score the whole images x captions matrix with one ``model.score`` (``hier_align``) call per
block of images that fits the memory budget, then R@K, rsum and ranks.

``python -m hatmodel.evaluate RUN_DIR_OR_CHECKPOINT [--protocol 1k|5k] [--split test]``
prints the metrics and writes them to ``metrics_<split>_<protocol>.json`` beside the
checkpoint (or to ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .config import PROTOCOLS
from .data import image_loader
from .distributed import shutdown
from .models import RetrievalModel, Tokens
from .runtime import amp_autocast, pick_device
from .store_eval import init_distributed, score_with_store, wants_store

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
               "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")


def _ranks(sims: np.ndarray, captions_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks: per image of its best true caption, per caption of its image.
    Ties count against the model (a constant matrix ranks every truth last)."""
    n_img, n_cap = sims.shape
    owner = np.arange(n_cap) // captions_per_image
    true_mask = owner[None, :] == np.arange(n_img)[:, None]
    best_true = np.where(true_mask, sims, -np.inf).max(1)
    i2t = (np.where(true_mask, -np.inf, sims) >= best_true[:, None]).sum(1)
    true_score = sims[owner, np.arange(n_cap)]
    beaten = sims >= true_score[None, :]
    t2i = beaten.sum(0) - 1  # minus the true image itself
    return i2t, t2i


def _fold_metrics(sims: np.ndarray, captions_per_image: int) -> dict[str, float]:
    i2t, t2i = _ranks(sims, captions_per_image)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(np.mean(ranks) + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def retrieval_metrics(sims: np.ndarray | Tensor, captions_per_image: int = 5,
                      folds: int = 1) -> dict[str, float]:
    """R@1/5/10 both ways (percent), rsum, median and mean ranks (1-based) of a score matrix.

    ``sims``: ``[n_images, n_images * captions_per_image]``, rows images, columns captions,
    caption ``cpi * k + c`` belongs to image ``k``. ``folds > 1`` splits the images (and
    their captions) into that many equal consecutive folds and averages every metric over
    them (COCO 1K: ``folds=5`` on the 5K test set). Ties count against the model.
    """
    if isinstance(sims, Tensor):
        sims = sims.detach().float().cpu().numpy()
    sims = np.asarray(sims)
    if sims.dtype != np.float64:
        sims = sims.astype(np.float32)
    if sims.ndim != 2:
        raise ValueError(f"sims: expected a 2-d matrix, got shape {sims.shape}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image: expected >= 1, got {captions_per_image}")
    n_img, n_cap = sims.shape
    if n_img == 0 or n_cap != n_img * captions_per_image:
        raise ValueError(
            f"sims: expected shape [n, n * {captions_per_image}] with n >= 1, got {sims.shape}"
        )
    if folds < 1 or n_img % folds:
        raise ValueError(f"folds: expected a divisor of the {n_img} images, got {folds}")
    if not np.isfinite(sims).all():
        raise ValueError("sims: holds NaN or Inf")
    size = n_img // folds
    parts = [
        _fold_metrics(sims[f * size:(f + 1) * size,
                           f * size * captions_per_image:(f + 1) * size * captions_per_image],
                      captions_per_image)
        for f in range(folds)
    ]
    return {key: float(np.mean([p[key] for p in parts])) for key in METRIC_KEYS}


@torch.no_grad()
def encode_images(model: RetrievalModel, dataset, device: torch.device, batch_size: int,
                  count: int | None = None, amp: bool = False, progress: bool = True) -> Tokens:
    parts = []
    for images in tqdm(image_loader(dataset, batch_size, count), desc="encode images",
                       disable=not progress, leave=False):
        with amp_autocast(device, amp):
            parts.append(model.encode_images(images.to(device)).detach())
    return Tokens.cat(parts)


@torch.no_grad()
def encode_captions(model: RetrievalModel, dataset, tokenizer, device: torch.device,
                    batch_size: int, count: int | None = None, amp: bool = False,
                    progress: bool = True) -> Tokens:
    captions = dataset.captions[: count * dataset.captions_per_image] if count else dataset.captions
    parts = []
    for start in tqdm(range(0, len(captions), batch_size), desc="encode captions",
                      disable=not progress, leave=False):
        ids, mask = tokenizer(captions[start:start + batch_size])
        with amp_autocast(device, amp):
            parts.append(model.encode_texts(ids.to(device), mask.to(device)).detach())
    return Tokens.cat(parts)


@torch.no_grad()
def score_matrix(model: RetrievalModel, images: Tokens, captions: Tokens,
                 memory_budget: int = 1 << 30, progress: bool = True) -> Tensor:
    """``[n_images, n_captions]`` float32 on the CPU: one ``model.score`` call per block of
    images; a block's rows of the output stay within ``memory_budget`` bytes."""
    n_img, n_cap = len(images), len(captions)
    rows = max(1, min(n_img, memory_budget // max(1, 4 * n_cap)))
    out = torch.empty(n_img, n_cap)
    for start in tqdm(range(0, n_img, rows), desc="score", disable=not progress, leave=False):
        block = images[slice(start, start + rows)]
        out[start:start + rows] = model.score(block, captions, memory_budget).float().cpu()
    return out


def evaluate_model(model: RetrievalModel, dataset, tokenizer, device: torch.device, *,
                   batch_size: int = 128, count: int | None = None, folds: int = 1,
                   memory_budget: int = 1 << 30, amp: bool = False,
                   progress: bool = True, store: str | Path | None = None,
                   group=None) -> tuple[dict[str, float], Tensor]:
    """Metrics (and the score matrix) of the first ``count`` images of ``dataset``.

    Through token stores on disk (:mod:`hatmodel.store_eval`) when ``store`` names a folder,
    when ``group`` (a process group) splits the work over ranks, or when the caption tokens
    would exceed ``memory_budget``; the metrics are those of the in-memory way."""
    n_captions = (count or dataset.n_images) * dataset.captions_per_image
    if store is not None or group is not None or wants_store(model, tokenizer, n_captions,
                                                              memory_budget, device):
        sims = score_with_store(model, dataset, tokenizer, device, folder=store,
                                batch_size=batch_size, count=count,
                                memory_budget=memory_budget, amp=amp, progress=progress,
                                group=group)
        return retrieval_metrics(sims, dataset.captions_per_image, folds), sims
    was_training = model.training
    model.eval()
    try:
        img = encode_images(model, dataset, device, batch_size, count, amp, progress)
        cap = encode_captions(model, dataset, tokenizer, device, batch_size, count, amp, progress)
        sims = score_matrix(model, img, cap, memory_budget, progress)
    finally:
        model.train(was_training)
    return retrieval_metrics(sims, dataset.captions_per_image, folds), sims


def protocol_folds(protocol: str, n_images: int) -> int:
    """``"5k"`` (all images at once) -> 1; ``"1k"`` -> folds of 1,000 images."""
    if protocol == "5k":
        return 1
    if protocol == "1k":
        if n_images % 1000:
            raise ValueError(
                f"protocol: '1k' needs a multiple of 1,000 test images, got {n_images}"
            )
        return n_images // 1000
    raise ValueError(f"protocol: expected '1k' or '5k', got {protocol!r}")


def format_metrics(m: dict[str, Any]) -> str:
    return (f"i2t R@1/5/10 {m['i2t_r1']:.1f} / {m['i2t_r5']:.1f} / {m['i2t_r10']:.1f}  "
            f"t2i R@1/5/10 {m['t2i_r1']:.1f} / {m['t2i_r5']:.1f} / {m['t2i_r10']:.1f}  "
            f"rsum {m['rsum']:.1f}  medr {m['i2t_medr']:.0f} / {m['t2i_medr']:.0f}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    from .checkpoint import load_for_eval, write_text
    from .data import build_dataset, build_tokenizer

    p = argparse.ArgumentParser(prog="python -m hatmodel.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder (uses best.safetensors) or a checkpoint file")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="COCO 1K (five-fold) or 5K (whole set); default: the config's")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the config's)")
    p.add_argument("--out", default=None, help="metrics JSON path")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*",
                   help="config overrides key.sub=value (e.g. data.root=...)")
    args = p.parse_intermixed_args(argv)

    model, cfg, path = load_for_eval(args.checkpoint, args.overrides)
    if int(cfg["train"]["threads"]) > 0:
        torch.set_num_threads(int(cfg["train"]["threads"]))
    device = pick_device(args.device or cfg["train"]["device"])
    model.to(device)
    dataset = build_dataset(cfg, args.split)
    tokenizer = build_tokenizer(cfg)
    protocol = args.protocol or cfg["eval"]["protocol"]
    group = init_distributed(args.device)  # torchrun: every rank takes a share
    metrics, _ = evaluate_model(
        model, dataset, tokenizer, device, batch_size=cfg["eval"]["batch_size"],
        folds=protocol_folds(protocol, dataset.n_images),
        memory_budget=int(cfg["eval"]["memory_budget"]),
        amp=bool(cfg["train"]["amp"]), progress=not args.no_progress,
        store=cfg["eval"]["store"], group=group,
    )
    if group is not None:
        rank = torch.distributed.get_rank(group)
        shutdown()
        if rank:
            return metrics
    print(f"{args.split} ({protocol}, {dataset.n_images} images): {format_metrics(metrics)}")
    out = Path(args.out) if args.out else path.parent / f"metrics_{args.split}_{protocol}.json"
    write_text(out, json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {out}")
    return metrics


if __name__ == "__main__":
    from .cli import run

    run(main, "python -m hatmodel.evaluate")
