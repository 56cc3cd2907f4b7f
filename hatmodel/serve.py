"""A search page over a trained model and its indexes: ``python -m hatmodel.serve INDEX_DIR
[INDEX_DIR] --checkpoint RUN_DIR [--host 127.0.0.1] [--port 8000]``.

Each ``INDEX_DIR`` is an index folder of ``python -m hatmodel.index`` made by the checkpoint
(its fingerprint is checked): an image index answers captions, a caption index answers
images; give one of each for both. The model and the indexes are loaded once. A query (a
caption, or an uploaded image) is encoded on the fly and ranked with
:class:`hatmodel.search.Searcher` (:func:`hatkernels.hier_topk` with the model's own
``hier_align`` settings), so a hit list is exactly what ``python -m hatmodel.search`` prints.
For a hit, the page shows why it matched: the alignment picture of :mod:`hatmodel.visualize`
for that (image, caption) pair.

JSON API (errors: a 4xx status and ``{"detail": "<argument>: <what is wrong>"}``):

- ``GET  /api/search?text=...&k=10``       caption -> images (an image index)
- ``POST /api/search`` (form: ``file``, ``k``) image -> captions (a caption index; HAT)
- ``GET  /api/item/{id}``                  ``image-<n>``: PNG; ``caption-<n>``: JSON
- ``GET  /api/explain?text=...&id=image-<n>[&level=0]``  the pair's alignment picture (PNG)
- ``POST /api/explain`` (form: ``file``, ``text``)        the same for an uploaded image
- ``GET  /api/info``                       model, indexes and the limits

Ids are positions in the loaded indexes (``image-<n>`` is item ``n`` of the image index),
looked up there and never used as paths. Requests are bounded (body bytes, image pixels,
text length, k). Model work runs in the server's thread pool under one lock (the event loop
stays free), pictures under another (matplotlib's pyplot is not thread-safe). Everything runs
on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import threading
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from .models import TERAN
from .search import Searcher

STATIC = Path(__file__).parent / "static"
MAX_K = 100
MAX_TEXT_CHARS = 500
MAX_BODY_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 40_000_000
_ID = re.compile(r"(image|caption)-(\d{1,10})")
KIND = {"images": "image", "texts": "caption"}  # index side -> id prefix


class RequestError(ValueError):
    """A bad request: ``status`` and a message that names the argument."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def read_image(data: bytes) -> Image.Image:
    """An uploaded file as an RGB picture; anything else is a 4xx naming ``file``."""
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


class FifoLock:
    """A lock granted in the order it was asked for, so no query waits more turns than there
    were queries before it. (``threading.Lock`` makes no such promise: a thread that releases
    it and asks again at once usually gets it back ahead of the waiting ones.)"""

    def __init__(self) -> None:
        self._turns = threading.Condition()
        self._next = 0  # the ticket the next caller draws
        self._serving = 0  # the ticket that holds the lock

    def __enter__(self) -> None:
        with self._turns:
            ticket = self._next
            self._next += 1
            self._turns.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: object) -> None:
        with self._turns:
            self._serving += 1
            self._turns.notify_all()


def open_searchers(indexes: list[str | Path], checkpoint: str | Path,
                   overrides: list[str] | None = None) -> dict[str, Searcher]:
    """One :class:`~hatmodel.search.Searcher` per index folder, keyed by the side the index
    holds (``"images"``, ``"texts"``; at most one each), on the CPU. A split index's pictures
    and captions come from the split it was made from."""
    searchers: dict[str, Searcher] = {}
    for folder in indexes:
        manifest = Path(folder) / "index.json"
        try:
            info = json.loads(manifest.read_text())
            side, source = info["side"], info["source"]
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"index: {folder} is not an index folder ({err})") from None
        if side in searchers:
            raise ValueError(f"index: two indexes of {side} given; give at most one per side")
        split = source.get("split", "test") if isinstance(source, dict) else "test"
        searchers[side] = Searcher(folder, checkpoint, device="cpu", overrides=overrides,
                                   split=split)
    if not searchers:
        raise ValueError("index: give at least one index folder")
    return searchers


class SearchService:
    """The loaded indexes (an image index and/or a caption index, each with the model that
    made it) and what each request needs of them. Every public method is safe to call from
    several threads: the model encodes and scores under ``model_lock``, one request at a
    time, in arrival order; pictures are drawn under another lock."""

    def __init__(self, searchers: dict[str, Searcher]) -> None:
        self.searchers = searchers
        self.primary = next(iter(searchers.values()))  # its model explains and reads uploads
        images = searchers.get("images")
        # (split, image index in the split) -> position in the image index: a split caption's
        # image, when a split image index of the same split is loaded
        self._image_of: dict[tuple[str, int], int] = {}
        if images is not None and images.info["source"].get("kind") == "split":
            self._image_of = {(images.split, item["id"]): n
                              for n, item in enumerate(images.items)}
        self.model_lock = FifoLock()
        self._draw_lock = threading.Lock()

    @classmethod
    def load(cls, indexes: list[str | Path], checkpoint: str | Path,
             overrides: list[str] | None = None) -> SearchService:
        return cls(open_searchers(indexes, checkpoint, overrides))

    @property
    def is_teran(self) -> bool:
        return isinstance(self.primary.model, TERAN)

    def info(self) -> dict[str, Any]:
        sides = {KIND[side]: {"count": len(s.items), "source": s.info["source"].get("kind"),
                              "split": s.info["source"].get("split")}
                 for side, s in self.searchers.items()}
        return {"model": type(self.primary.model).__name__, "indexes": sides,
                "text_queries": "images" in self.searchers,
                "image_queries": "texts" in self.searchers and not self.is_teran,
                "limits": {"k": MAX_K, "text_chars": MAX_TEXT_CHARS,
                           "body_bytes": MAX_BODY_BYTES, "image_pixels": MAX_IMAGE_PIXELS}}

    def _searcher(self, side: str, name: str) -> Searcher:
        if side not in self.searchers:
            what = "an image index (--side images)" if side == "images" else \
                "a caption index (--side texts)"
            raise RequestError(400, f"{name}: this server has no {what} to search")
        return self.searchers[side]

    def _check_k(self, k: int, searcher: Searcher) -> int:
        top = min(MAX_K, len(searcher.items))
        if not 1 <= k <= top:
            raise RequestError(400, f"k: expected 1 <= k <= {top}, got {k}")
        return k

    # --- queries ------------------------------------------------------------------------
    def search_text(self, text: str, k: int) -> list[dict[str, Any]]:
        """The ``k`` best images of the image index for a caption."""
        searcher = self._searcher("images", "text")
        text, k = check_text(text), self._check_k(k, searcher)
        with self.model_lock:
            hits = searcher.text(text, k)
        return [self._hit("images", h) for h in hits]

    def upload_input(self, data: bytes) -> tuple[torch.Tensor, Image.Image]:
        """(model input, picture) of an uploaded image file (HAT models only)."""
        from .visualize import hat_image

        if self.is_teran:
            raise RequestError(400, "file: this TERAN model reads region features; image "
                               "queries need a HAT model")
        return hat_image(self.primary.cfg, read_image(data))

    def search_image(self, data: bytes, k: int) -> list[dict[str, Any]]:
        """The ``k`` best captions of the caption index for an uploaded image file."""
        searcher = self._searcher("texts", "file")
        k = self._check_k(k, searcher)
        tensor, _ = self.upload_input(data)
        with self.model_lock, torch.no_grad():
            query = searcher.model.encode_images(tensor[None])
            hits = searcher.search(query, "images", k)
        return [self._hit("texts", h) for h in hits]

    def _hit(self, side: str, hit: dict[str, Any]) -> dict[str, Any]:
        return {"rank": hit["rank"], "score": hit["score"]} | self.describe(side, hit["index"])

    # --- items --------------------------------------------------------------------------
    def lookup(self, item: str, kind: str | None = None) -> tuple[str, int]:
        """``(index side, position)`` of an id such as ``image-3``: a 404 unless a loaded
        index holds it (and it is of ``kind`` when given)."""
        match = _ID.fullmatch(item or "")
        side = {"image": "images", "caption": "texts"}.get(match[1]) if match else None
        if not match or (kind and match[1] != kind) or side not in self.searchers \
                or int(match[2]) >= len(self.searchers[side].items):
            what = f"an {kind}" if kind == "image" else "an item"
            raise RequestError(404, f"id: {item[:40]!r} is not {what} of the loaded indexes")
        return side, int(match[2])

    def describe(self, side: str, n: int) -> dict[str, Any]:
        """What the API shows of item ``n`` of an index: its id, its name in the index (a
        split index, a file name, a line number), and its caption and image (captions) or
        its first true caption (split images)."""
        searcher = self.searchers[side]
        entry = searcher.items[n]
        out = {"id": f"{KIND[side]}-{n}", "kind": KIND[side], "name": str(entry["id"])}
        if side == "texts":
            image = self._image_of.get((searcher.split, entry.get("image")))
            out |= {"text": entry["caption"],
                    "image": None if image is None else f"image-{image}"}
        elif entry.get("captions"):
            out["caption"] = entry["captions"][0]
        return out

    def item(self, item: str) -> dict[str, Any]:
        """A caption's JSON (see :meth:`describe`); an image id is a 400 (it is a PNG)."""
        side, n = self.lookup(item, "caption")
        return self.describe(side, n)

    def _pair_inputs(self, item: str):
        from .visualize import pair_inputs

        _, n = self.lookup(item, "image")
        searcher = self.searchers["images"]
        entry = searcher.items[n]
        try:
            if "file" in entry:  # an image folder's file, its path from the index
                return pair_inputs(searcher.model, searcher.cfg, None, entry["file"])
            return pair_inputs(searcher.model, searcher.cfg, searcher.dataset, int(entry["id"]))
        except ValueError as err:
            raise RequestError(400, str(err)) from None

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
                result = alignment(self.primary.model, self.primary.tokenizer, tensor, text, level)
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


def create_app(service: SearchService) -> FastAPI:
    """The FastAPI app of the page and the JSON API over ``service``. Endpoints are plain
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
        return service.info()

    @app.get("/api/search")
    def search_text(text: Annotated[str, Query()], k: Annotated[int, Query()] = 10
                    ) -> dict[str, Any]:
        return {"query": "text", "k": k, "hits": service.search_text(text, k)}

    @app.post("/api/search")
    def search_image(file: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 10
                     ) -> dict[str, Any]:
        return {"query": "image", "k": k, "hits": service.search_image(upload(file), k)}

    @app.get("/api/item/{item}")
    def item(item: str) -> Any:
        if item.startswith("caption-"):
            return service.item(item)
        return Response(service.image_png(item), **png)

    @app.get("/api/explain")
    def explain(text: Annotated[str, Query()], id: Annotated[str, Query()],
                level: Annotated[int, Query()] = 0) -> Response:
        return Response(service.explain(text, item=id, level=level), **png)

    @app.post("/api/explain")
    def explain_upload(file: Annotated[UploadFile, File()], text: Annotated[str, Form()],
                       level: Annotated[int, Form()] = 0) -> Response:
        return Response(service.explain(text, data=upload(file), level=level), **png)

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hatmodel.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="INDEX_DIR [key.sub=value ...]",
                   help="index folders made by the checkpoint (python -m hatmodel.index: an "
                   "image index, a caption index, or both), then config overrides")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (uses best.safetensors) or a checkpoint file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; default %(default)s (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default %(default)s")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: the config's train.threads, else torch's default)")
    args = p.parse_intermixed_args(argv)
    import uvicorn

    # key.sub=value is an override unless a folder of that name exists
    overrides = [a for a in args.paths if "=" in a and not Path(a).is_dir()]
    indexes = [a for a in args.paths if a not in overrides]
    try:
        service = SearchService.load(indexes, args.checkpoint, overrides)
    except ValueError as err:
        p.error(str(err))
    threads = args.threads or int(service.primary.cfg["train"]["threads"])
    if threads > 0:
        torch.set_num_threads(threads)
    info = service.info()
    print(f"{info['model']}: " + ", ".join(f"{v['count']} {k}s" for k, v in
                                           info["indexes"].items())
          + f"; http://{args.host}:{args.port}/", flush=True)
    try:  # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal
        uvicorn.run(create_app(service), host=args.host, port=args.port, access_log=False)
    except KeyboardInterrupt:  # Ctrl-C: the server has already stopped; exit quietly
        pass


if __name__ == "__main__":
    main()
