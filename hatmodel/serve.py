"""A search page over a trained model and an index of one split: ``python -m hatmodel.serve
INDEX_DIR --checkpoint RUN_DIR [--host 127.0.0.1] [--port 8000]``.

The model and the index are loaded once. A query (a caption, or an uploaded image) is encoded
on the fly and its top-k gallery items come from :func:`hatkernels.hier_topk` over the index's
token store, scored with the model's own ``hier_align`` settings, so a hit list is exactly
what the retrieval evaluation ranks. For a hit, the page shows why it matched: the alignment
picture of :mod:`hatmodel.visualize` for that (image, caption) pair.

JSON API (errors: a 4xx status and ``{"detail": "<argument>: <what is wrong>"}``):

- ``GET  /api/search?text=...&k=10``       caption -> images
- ``POST /api/search`` (form: ``file``, ``k``) image -> captions (HAT: any image file)
- ``GET  /api/item/{id}``                  ``image-<n>``: PNG; ``caption-<n>``: JSON
- ``GET  /api/explain?text=...&id=image-<n>[&level=0]``  the pair's alignment picture (PNG)
- ``POST /api/explain`` (form: ``file``, ``text``)        the same for an uploaded image
- ``GET  /api/info``                       model, split, gallery sizes and the limits

Ids are positions in the loaded index (``image-<n>`` is its n-th image), looked up there and
never used as paths. Requests are bounded (body bytes, image pixels, text length, k). Model
work runs in the server's thread pool under one lock (the event loop stays free), pictures
under another (matplotlib's pyplot is not thread-safe).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from hatkernels import TokenStore, hier_topk

from .models import TERAN, RetrievalModel, Tokens

STATIC = Path(__file__).parent / "static"
INDEX_FORMAT = "hatmodel-index-1"
INDEX_MANIFEST = "index.json"
KINDS = ("image", "caption")

MAX_K = 100
MAX_TEXT_CHARS = 500
MAX_BODY_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 40_000_000
_ID = re.compile(r"(image|caption)-(\d{1,10})")


class RequestError(ValueError):
    """A bad request: ``status`` and a message that names the argument."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def checkpoint_fingerprint(path: str | Path) -> str:
    """SHA-256 of a weights file: the index records which model made its tokens."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Index:
    """The token stores of one split (``images``, ``captions``) and the split's name."""

    images: TokenStore
    captions: TokenStore
    split: str

    @classmethod
    def open(cls, folder: str | Path, fingerprint: str | None = None) -> Index:
        """The index at ``folder`` (``index.json`` and the stores ``images/``, ``captions/``),
        checked to come from the weights with ``fingerprint`` when given."""
        folder = Path(folder)
        manifest = folder / INDEX_MANIFEST
        if not manifest.is_file():
            raise ValueError(f"index: {folder} is not an index (no {INDEX_MANIFEST})")
        try:
            meta = json.loads(manifest.read_text())
            split = meta["split"]
            if meta["format"] != INDEX_FORMAT or not isinstance(split, str):
                raise ValueError(f"format {meta['format']!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"index: {manifest} is not a valid index manifest ({err})") from None
        images = TokenStore.open(folder / "images", fingerprint=fingerprint)
        captions = TokenStore.open(folder / "captions", fingerprint=fingerprint)
        return cls(images, captions, split)


def build_index(checkpoint: str | Path, out: str | Path, split: str = "test",
                overrides: list[str] | None = None, batch_size: int = 128) -> Index:
    """Encode every image and caption of ``split`` with the checkpoint's model into an index
    at ``out`` (item ``n`` of each store is the split's image / caption ``n``)."""
    from .checkpoint import load_for_eval
    from .data import build_dataset, build_tokenizer
    from .evaluate import encode_captions, encode_images

    model, cfg, path = load_for_eval(checkpoint, overrides)
    dataset = build_dataset(cfg, split)
    device = torch.device("cpu")
    images = encode_images(model, dataset, device, batch_size, progress=False)
    captions = encode_captions(model, dataset, build_tokenizer(cfg), device, batch_size,
                               progress=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = checkpoint_fingerprint(path)
    for name, tokens in (("images", images), ("captions", captions)):
        TokenStore.write(out / name, tokens.levels, tokens.lengths, fingerprint=fingerprint,
                         overwrite=True)
    (out / INDEX_MANIFEST).write_text(json.dumps({"format": INDEX_FORMAT, "split": split}) + "\n")
    return Index.open(out, fingerprint)


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def read_image(data: bytes) -> Image.Image:
    """An uploaded file as an RGB picture; anything else is a 400 naming ``file``."""
    if not data:
        raise RequestError(400, "file: empty upload")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise RequestError(413, f"file: {img.width} x {img.height} pixels, at most "
                               f"{MAX_IMAGE_PIXELS} allowed")
        return img.convert("RGB")
    except RequestError:
        raise
    except Exception as err:  # PIL reports a foreign or broken file with many error types
        raise RequestError(400, f"file: not a readable image ({type(err).__name__})") from None


def check_text(text: str | None, name: str = "text") -> str:
    """A caption query: not empty, at most ``MAX_TEXT_CHARS`` characters."""
    text = (text or "").strip()
    if not text:
        raise RequestError(400, f"{name}: expected a non-empty caption")
    if len(text) > MAX_TEXT_CHARS:
        raise RequestError(400, f"{name}: {len(text)} characters, at most {MAX_TEXT_CHARS}")
    return text


class Searcher:
    """A model, its tokenizer, the split's data set and its index: everything a request
    needs, loaded once. Every public method is safe to call from several threads: the model
    encodes and scores under ``model_lock``, one request at a time."""

    def __init__(self, model: RetrievalModel, cfg: dict[str, Any], index: Index) -> None:
        from .data import build_dataset, build_tokenizer

        self.model, self.cfg, self.index = model.eval().to("cpu"), cfg, index
        self.tokenizer = build_tokenizer(cfg)
        self.dataset = build_dataset(cfg, index.split)
        self.image_ids, self.caption_ids = index.images.ids, index.captions.ids
        for name, ids, count in (("images", self.image_ids, self.dataset.n_images),
                                 ("captions", self.caption_ids, len(self.dataset.captions))):
            if not all(isinstance(i, int) and 0 <= i < count for i in ids):
                raise ValueError(f"index: its {name} are not items of the {index.split} split "
                                 f"({count} {name})")
        self._owner = {i: n for n, i in enumerate(self.image_ids)}
        self.model_lock = threading.Lock()
        self._draw_lock = threading.Lock()

    @classmethod
    def load(cls, index_dir: str | Path, checkpoint: str | Path,
             overrides: list[str] | None = None) -> Searcher:
        """Load the checkpoint (a run folder or weights file) and the index it made."""
        from .checkpoint import load_for_eval

        model, cfg, path = load_for_eval(checkpoint, overrides)
        return cls(model, cfg, Index.open(index_dir, checkpoint_fingerprint(path)))

    # --- queries ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"model": type(self.model).__name__, "split": self.index.split,
                "images": len(self.index.images), "captions": len(self.index.captions),
                "image_queries": not isinstance(self.model, TERAN),
                "limits": {"k": MAX_K, "text_chars": MAX_TEXT_CHARS,
                           "body_bytes": MAX_BODY_BYTES, "image_pixels": MAX_IMAGE_PIXELS}}

    def _check_k(self, k: int, gallery: TokenStore) -> int:
        top = min(MAX_K, len(gallery))
        if not 1 <= k <= top:
            raise RequestError(400, f"k: expected 1 <= k <= {top}, got {k}")
        return k

    def _topk(self, query: Tokens, gallery: TokenStore, side: str, k: int) -> list[tuple]:
        a = self.model.align
        images, texts = (gallery, query.levels) if side == "texts" else (query.levels, gallery)
        top = hier_topk(images, texts, k, query=side,
                        **{f"{side[:-1]}_lengths": query.lengths},
                        pooling=a["pooling"], direction=a["direction"], reduce=a["reduce"],
                        lambda_softmax=float(a["lambda_softmax"]), weights=a["weights"],
                        backend=a["backend"])
        return list(zip(top.indices[0].tolist(), top.values[0].tolist()))

    def encode_text(self, text: str) -> Tokens:
        ids, mask = self.tokenizer([text])
        with torch.no_grad():
            return self.model.encode_texts(ids, mask)

    def upload_input(self, data: bytes) -> tuple[torch.Tensor, Image.Image]:
        """(model input, picture) of an uploaded image file (HAT models only)."""
        from .visualize import hat_image

        if isinstance(self.model, TERAN):
            raise RequestError(400, "file: this TERAN model reads region features; image "
                               "queries need a HAT model")
        return hat_image(self.cfg, read_image(data))

    def search_text(self, text: str, k: int) -> list[dict[str, Any]]:
        """The ``k`` best images of the index for a caption."""
        text, k = check_text(text), self._check_k(k, self.index.images)
        with self.model_lock:
            hits = self._topk(self.encode_text(text), self.index.images, "texts", k)
        return [self._hit("image", n, s, rank) for rank, (n, s) in enumerate(hits)]

    def search_image(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """The ``k`` best captions of the index for an uploaded image file."""
        k = self._check_k(k, self.index.captions)
        tensor, _ = self.upload_input(data)
        with self.model_lock, torch.no_grad():
            query = self.model.encode_images(tensor[None])
            hits = self._topk(query, self.index.captions, "images", k)
        return [self._hit("caption", n, s, rank) for rank, (n, s) in enumerate(hits)]

    def _hit(self, kind: str, n: int, score: float, rank: int) -> dict[str, Any]:
        hit = {"rank": rank + 1, "id": f"{kind}-{n}", "score": score}
        return hit | (self.caption(hit["id"]) if kind == "caption" else {})

    # --- items --------------------------------------------------------------------------
    def lookup(self, item: str, kind: str | None = None) -> tuple[str, int]:
        """``(kind, data set index)`` of an id such as ``image-3``: a 404 unless the index
        holds it (and it is of ``kind`` when given)."""
        match = _ID.fullmatch(item or "")
        ids = {"image": self.image_ids, "caption": self.caption_ids}
        if not match or (kind and match[1] != kind) or int(match[2]) >= len(ids[match[1]]):
            what = f"an {kind}" if kind == "image" else "an item"
            raise RequestError(404, f"id: {item[:40]!r} is not {what} of the index")
        return match[1], ids[match[1]][int(match[2])]

    def caption(self, item: str) -> dict[str, Any]:
        """A caption's text, its data set index and the id of its image (when indexed)."""
        _, c = self.lookup(item, "caption")
        owner = self._owner.get(c // self.dataset.captions_per_image)
        return {"id": item, "kind": "caption", "index": c, "text": self.dataset.captions[c],
                "image": None if owner is None else f"image-{owner}"}

    def _pair_inputs(self, item: str):
        from .visualize import pair_inputs

        _, i = self.lookup(item, "image")
        return pair_inputs(self.model, self.cfg, self.dataset, i)

    def image_png(self, item: str) -> bytes:
        """An indexed image as a PNG (the picture the alignment panels are drawn on)."""
        return _png(self._pair_inputs(item)[1])

    # --- why it matched -----------------------------------------------------------------
    def explain(self, text: str, item: str | None = None, data: bytes | None = None,
                level: int = 0) -> bytes:
        """The alignment picture (PNG) of a caption and an indexed image (``item``) or an
        uploaded one (``data``)."""
        from .visualize import alignment, display_picture, draw

        text = check_text(text)
        if data is None:
            tensor, picture, boxes = self._pair_inputs(item)
        else:
            tensor, picture = self.upload_input(data)
            picture, boxes = display_picture(picture), None
        with self.model_lock:
            try:
                result = alignment(self.model, self.tokenizer, tensor, text, level)
            except ValueError as err:
                raise RequestError(400, str(err)) from None
        with self._draw_lock:
            return draw(result, picture, io.BytesIO(), boxes, text).getvalue()


# --- the web app ----------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: a request body is read (at most ``limit`` bytes, else 413) before the
    app sees it, so no upload larger than the limit is ever buffered or parsed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = not declared.isdigit() or int(declared) > self.limit
        body, more = bytearray(), not too_big
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_big = len(body) > self.limit
            more = more and not too_big
        if too_big:
            return await _send_json(send, 413, f"request: a body of at most {self.limit} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(searcher: Searcher) -> FastAPI:
    """The FastAPI app of the page and the JSON API over ``searcher``. Endpoints are plain
    ``def`` functions: FastAPI runs them in its thread pool, never on the event loop."""
    app = FastAPI(title="hatmodel search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    png = {"media_type": "image/png", "headers": {"cache-control": "max-age=3600"}}

    @app.exception_handler(RequestError)
    def bad_request(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        name = str(first["loc"][-1]) if first.get("loc") else "request"
        return JSONResponse({"detail": f"{name}: {first['msg']}"}, status_code=422)

    def upload(file: UploadFile) -> bytes:
        return file.file.read()  # bounded: BodyLimit has already read the whole body

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return searcher.info()

    @app.get("/api/search")
    def search_text(text: Annotated[str, Query()], k: Annotated[int, Query()] = 10
                    ) -> dict[str, Any]:
        return {"query": "text", "k": k, "hits": searcher.search_text(text, k)}

    @app.post("/api/search")
    def search_image(file: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 10
                     ) -> dict[str, Any]:
        return {"query": "image", "k": k, "hits": searcher.search_image(upload(file), k)}

    @app.get("/api/item/{item}")
    def item(item: str) -> Any:
        if item.startswith("caption-"):
            return searcher.caption(item)
        return Response(searcher.image_png(item), **png)

    @app.get("/api/explain")
    def explain(text: Annotated[str, Query()], id: Annotated[str, Query()],
                level: Annotated[int, Query()] = 0) -> Response:
        return Response(searcher.explain(text, item=id, level=level), **png)

    @app.post("/api/explain")
    def explain_upload(file: Annotated[UploadFile, File()], text: Annotated[str, Form()],
                       level: Annotated[int, Form()] = 0) -> Response:
        return Response(searcher.explain(text, data=upload(file), level=level), **png)

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hatmodel.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="an index folder of the checkpoint's model (one split)")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (uses best.safetensors) or a checkpoint file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; default %(default)s (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default %(default)s")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: the config's train.threads, else torch's default)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_intermixed_args(argv)
    import uvicorn

    searcher = Searcher.load(args.index, args.checkpoint, args.overrides)
    threads = args.threads or int(searcher.cfg["train"]["threads"])
    if threads > 0:
        torch.set_num_threads(threads)
    print(f"{searcher.info()['model']} over {searcher.index.split}: "
          f"{len(searcher.index.images)} images, {len(searcher.index.captions)} captions; "
          f"http://{args.host}:{args.port}/", flush=True)
    try:  # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal
        uvicorn.run(create_app(searcher), host=args.host, port=args.port, access_log=False)
    except KeyboardInterrupt:  # Ctrl-C: the server has already stopped; exit quietly
        pass


if __name__ == "__main__":
    main()
