"""Search an index: ``python -m hatmodel.search INDEX_DIR --checkpoint RUN_DIR (--text "..." |
--image PATH_OR_SPLIT_INDEX) [-k 10] [--out results.png]``.

A caption searches an image index, an image (a file, or an index into ``--split`` of the
run's data) a caption index. The query is encoded with the checkpoint that built the index
(checked by its fingerprint) and ranked against the whole gallery with
:func:`hatkernels.hier_topk`, exactly as the model scores pairs. Prints rank, score, id and
caption or file of each hit; ``--out`` draws the query with its hits.

Under ``torchrun --nproc-per-node N`` each rank scores its own part of the index (cut at
shard boundaries) and the ranks merge their hits: the output is the same as one process's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hatkernels import hier_topk

from .distributed import shutdown
from .index import model_fingerprint, read_index
from .models import Tokens
from .runtime import pick_device
from .store_eval import init_distributed


class Searcher:
    """An index and the model that built it, loaded once; answers text and image queries.

    ``group``: a ``torch.distributed`` group over which the gallery is split (each rank
    scores its part, every rank gets the merged hits)."""

    def __init__(self, index: str | Path, checkpoint: str | Path, *, device: str | None = None,
                 overrides: list[str] | None = None, split: str = "test", group=None) -> None:
        from .checkpoint import load_for_eval
        from .data import build_tokenizer

        self.model, self.cfg, path = load_for_eval(checkpoint, overrides)
        self.info, self.items, store = read_index(index, fingerprint=model_fingerprint(path))
        self.device = pick_device(device or self.cfg["train"]["device"])
        self.model.to(self.device)
        self.tokenizer = build_tokenizer(self.cfg)
        self.split, self._dataset, self.group = split, None, group
        if group is not None:
            import torch.distributed as dist

            store = store.split(dist.get_rank(group), dist.get_world_size(group))
        self.gallery = store

    @property
    def dataset(self):
        """The ``split`` of the run's data (built on first use)."""
        if self._dataset is None:
            from .data import build_dataset

            self._dataset = build_dataset(self.cfg, self.split)
        return self._dataset

    @torch.no_grad()
    def encode_text(self, text: str) -> Tokens:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text: expected a non-empty caption")
        ids, mask = self.tokenizer([text])
        return self.model.encode_texts(ids.to(self.device), mask.to(self.device))

    def image_input(self, image: str | Path | int | Image.Image
                    ) -> tuple[torch.Tensor, Image.Image]:
        """(model input ``[3, S, S]``, picture) of an image file, a PIL image or an index into
        the split."""
        from .visualize import hat_image, pair_inputs

        if isinstance(image, Image.Image):
            return hat_image(self.cfg, image.convert("RGB"))
        if isinstance(image, int) and not 0 <= image < self.dataset.n_images:
            raise ValueError(f"image: expected an index in [0, {self.dataset.n_images}), "
                             f"got {image}")
        tensor, picture, _ = pair_inputs(self.model, self.cfg, self.dataset if isinstance(
            image, int) else None, image if isinstance(image, int) else str(image))
        return tensor, picture

    @torch.no_grad()
    def encode_image(self, image: str | Path | int | Image.Image) -> Tokens:
        return self.model.encode_images(self.image_input(image)[0][None].to(self.device))

    def search(self, query: Tokens, query_side: str, k: int = 10) -> list[dict[str, Any]]:
        """Hits of encoded ``query`` (one item of ``query_side``) against the index:
        ``[{"rank", "score", "index", "id", ...the item's fields}]``, best first."""
        if query_side == self.info["side"]:
            raise ValueError(f"query: the index holds {self.info['side']}; a query of "
                             f"{query_side} needs an index of the other side")
        a = self.model.align
        gallery = self.gallery
        images, texts = (gallery, query.levels) if query_side == "texts" else (query.levels,
                                                                                gallery)
        lengths = {"text_lengths" if query_side == "texts" else "image_lengths": query.lengths}
        top = hier_topk(images, texts, k, query=query_side, pooling=a["pooling"],
                        direction=a["direction"], reduce=a["reduce"],
                        lambda_softmax=float(a["lambda_softmax"]), weights=a["weights"],
                        backend=a["backend"], group=self.group, **lengths)
        return [{"rank": r + 1, "score": float(v), "index": int(i), **self.items[int(i)]}
                for r, (v, i) in enumerate(zip(top.values[0].tolist(), top.indices[0].tolist()))]

    def text(self, text: str, k: int = 10) -> list[dict[str, Any]]:
        return self.search(self.encode_text(text), "texts", k)

    def image(self, image: str | Path | int | Image.Image, k: int = 10) -> list[dict[str, Any]]:
        return self.search(self.encode_image(image), "images", k)

    def hit_picture(self, hit: dict[str, Any]) -> Image.Image | None:
        """The picture of an image hit (None for a caption)."""
        if self.info["side"] != "images":
            return None
        if "file" in hit:
            with Image.open(hit["file"]) as img:
                return img.convert("RGB")
        if self.info["source"].get("split") != self.split:
            raise ValueError(f"split: the index holds the {self.info['source']['split']!r} "
                             f"split; pass --split {self.info['source']['split']}")
        return self.image_input(int(hit["id"]))[1]


def hit_text(hit: dict[str, Any]) -> str:
    """What a hit shows besides its id: its caption, its file, or its first true caption."""
    if "caption" in hit:
        return hit["caption"]
    if "file" in hit:
        return hit["file"]
    return f"(true caption: {hit['captions'][0]})" if hit.get("captions") else ""


def format_hits(hits: list[dict[str, Any]]) -> str:
    return "\n".join(f"{h['rank']:>4}  {h['score']:9.4f}  {h['id']!s:>8}  {hit_text(h)}"
                     for h in hits)


def draw(searcher: Searcher, query: str | Image.Image, hits: list[dict[str, Any]],
         out: str | Path) -> Path:
    """The query (a caption or a picture) beside its hits (pictures or captions) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import write_file

    pictures = [searcher.hit_picture(h) for h in hits]
    if pictures and pictures[0] is not None:  # caption -> images: a grid of pictures
        cols = min(5, len(hits))
        rows = (len(hits) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows + 0.4),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(f"query: {query}", fontsize=10)
        for n, (hit, pic) in enumerate(zip(hits, pictures)):
            ax = axes[n // cols, n % cols]
            ax.imshow(pic)
            ax.set_title(f"#{hit['rank']}  {hit['score']:.3f}  id {hit['id']}", fontsize=8)
    else:  # image -> captions: the picture and the ranked captions
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4),
                                          gridspec_kw={"width_ratios": [1, 2]})
        left.imshow(query)
        left.set_title("query")
        right.axis("off")
        right.text(0, 1, "\n".join(f"#{h['rank']}  {h['score']:.3f}  {hit_text(h)[:90]}"
                                   for h in hits), va="top", fontsize=8, family="monospace")
        left.axis("off")
    fig.tight_layout()
    write_file(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m hatmodel.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="an index folder (python -m hatmodel.index)")
    p.add_argument("--checkpoint", required=True, help="the run folder or checkpoint file "
                   "that built the index")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a caption: searches an image index")
    query.add_argument("--image", help="an image file, or an index into --split: searches a "
                       "caption index")
    p.add_argument("-k", type=int, default=10, help="hits to return (default 10)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="the split of an integer --image and of split-image hits' pictures")
    p.add_argument("--out", default=None, help="draw the query and its hits into this PNG")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the config's)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_intermixed_args(argv)

    group = init_distributed(args.device)
    device = args.device
    if group is not None and torch.cuda.is_available() and device in (None, "cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        searcher = Searcher(args.index, args.checkpoint, device=device,
                            overrides=args.overrides, split=args.split, group=group)
        if args.text is not None:
            hits, shown = searcher.text(args.text, args.k), args.text
        else:
            image = int(args.image) if args.image.isdigit() else args.image
            hits = searcher.image(image, args.k)
            shown = searcher.image_input(image)[1]
        master = group is None or torch.distributed.get_rank(group) == 0
        if master:
            print(format_hits(hits))
            if args.out:
                print(f"wrote {draw(searcher, shown, hits, args.out)}")
    finally:
        if group is not None:
            shutdown()
    return hits


__all__ = ["Searcher", "draw", "format_hits", "hit_text", "main"]

if __name__ == "__main__":
    from .cli import run

    run(main, "python -m hatmodel.search")
