"""``hatmodel.serve``'s JSON API on a tiny trained HAT run and the image and caption indexes
of its test split: hits equal ``hier_topk`` called directly, the alignment pictures come back
as PNGs, every bad input is a 4xx naming the argument (and the server keeps answering),
handlers leave the event loop free, and the CLI binds to 127.0.0.1 and stops cleanly on
SIGINT and SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from hatkernels import TokenStore, hier_topk
from hatmodel import checkpoint as ckpt
from hatmodel import serve as serve_cli
from hatmodel import train as train_cli
from hatmodel.checkpoint import load_for_eval
from hatmodel.config import load_config
from hatmodel.data import build_dataset, build_tokenizer
from hatmodel.index import build_index
from hatmodel.models import build_model
from hatmodel.serve import (
    MAX_BODY_BYTES,
    MAX_K,
    MAX_TEXT_CHARS,
    FifoLock,
    SearchService,
    create_app,
)
from hatmodel.visualize import hat_image

QUERIES = ["a large red circle and a small blue square", "there is a green cross at the top"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A hat_tiny run trained for a few steps, and the image and caption indexes of its test
    split."""
    root = tmp_path_factory.mktemp("serve")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_cli.main(["--config", "hat_tiny", "--output-dir", str(root / "run"),
                        "--no-progress", "train.epochs=1", "train.max_steps_per_epoch=2"])
        for side in ("images", "texts"):
            build_index(root / "run", root / side, side, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "run", root / "images", root / "texts"


@pytest.fixture(scope="module")
def service(run):
    return SearchService.load([run[1], run[2]], run[0])


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as c:
        yield c


@pytest.fixture(scope="module")
def direct(run):
    """The same model and stores, loaded apart from the server, for the expected answers."""
    model, cfg, _ = load_for_eval(run[0])
    images, captions = TokenStore.open(run[1] / "tokens"), TokenStore.open(run[2] / "tokens")
    return model, cfg, build_tokenizer(cfg), images, captions


def _expected(model, gallery, query, side: str, k: int) -> tuple[list[int], list[float]]:
    a = model.align
    images, texts = (gallery, query.levels) if side == "texts" else (query.levels, gallery)
    lengths = {"text_lengths" if side == "texts" else "image_lengths": query.lengths}
    top = hier_topk(images, texts, k, query=side, pooling=a["pooling"],
                    direction=a["direction"], reduce=a["reduce"],
                    lambda_softmax=a["lambda_softmax"], weights=a["weights"],
                    backend=a["backend"], **lengths)
    return top.indices[0].tolist(), top.values[0].tolist()


def _png(width: int = 40, height: int = 40, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("text", QUERIES)
@pytest.mark.parametrize("k", [1, 7])
def test_text_search_equals_hier_topk(client, direct, text, k):
    model, _, tok, images, _ = direct
    with torch.no_grad():
        query = model.encode_texts(*tok([text]))
    ids, scores = _expected(model, images, query, "texts", k)
    r = client.get("/api/search", params={"text": text, "k": k})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert [h["id"] for h in hits] == [f"image-{i}" for i in ids]
    assert [h["score"] for h in hits] == scores
    assert [h["rank"] for h in hits] == list(range(1, k + 1))
    # The dense scores of every image rank the same way (the store holds float16 tokens).
    levels, lengths = images.read()
    dense = model.score(type(query)([t.float() for t in levels], lengths), query)[:, 0]
    assert dense.topk(k).indices.tolist() == ids


def test_image_search_equals_hier_topk(client, direct):
    model, cfg, _, _, captions = direct
    png = client.get("/api/item/image-3").content
    with Image.open(io.BytesIO(png)) as img:
        tensor, _ = hat_image(cfg, img.convert("RGB"))
    with torch.no_grad():
        query = model.encode_images(tensor[None])
    ids, scores = _expected(model, captions, query, "images", 5)
    r = client.post("/api/search", files={"file": ("scene.png", png, "image/png")},
                    data={"k": "5"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert [h["id"] for h in hits] == [f"caption-{i}" for i in ids]
    assert [h["score"] for h in hits] == scores
    data = build_dataset(cfg, "test")
    assert [h["text"] for h in hits] == [data.captions[i] for i in ids]
    assert [h["image"] for h in hits] == [f"image-{i // 5}" for i in ids]


def test_items(client, direct):
    _, cfg, _, _, _ = direct
    data = build_dataset(cfg, "test")
    r = client.get("/api/item/caption-7")
    assert r.status_code == 200
    assert r.json() == {"id": "caption-7", "kind": "caption", "name": "7",
                        "text": data.captions[7], "image": "image-1"}
    r = client.get("/api/item/image-2")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as img:  # the scene, scaled up (nearest)
        assert img.size == (256, 256)
        small = np.array(img.convert("RGB").resize((32, 32), Image.NEAREST))
    assert torch.equal(torch.from_numpy(small).permute(2, 0, 1), data.pixels[2])
    info = client.get("/api/info").json()
    assert info["indexes"] == {"image": {"count": 20, "source": "split", "split": "test"},
                               "caption": {"count": 100, "source": "split", "split": "test"}}
    assert info["text_queries"] and info["image_queries"]


def test_explain_pictures(client):
    r = client.get("/api/explain", params={"text": QUERIES[0], "id": "image-4", "level": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 200
    png = client.get("/api/item/image-4").content
    r = client.post("/api/explain", files={"file": ("x.png", png, "image/png")},
                    data={"text": QUERIES[1]})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def _chunks(total: int, size: int = 1 << 20):
    for _ in range(total // size + 1):
        yield b"\0" * size


BAD = [
    ("get", "/api/search", {"params": {"text": ""}}, 400, "text:"),
    ("get", "/api/search", {"params": {"text": "   "}}, 400, "text:"),
    ("get", "/api/search", {"params": {"text": "a" * (MAX_TEXT_CHARS + 1)}}, 400, "text:"),
    ("get", "/api/search", {"params": {"k": 3}}, 422, "text:"),
    ("get", "/api/search", {"params": {"text": "a red circle", "k": 0}}, 400, "k:"),
    ("get", "/api/search", {"params": {"text": "a red circle", "k": 21}}, 400, "k:"),
    ("get", "/api/search", {"params": {"text": "a red circle", "k": "two"}}, 422, "k:"),
    ("post", "/api/search", {"files": {"file": ("a.txt", b"not an image", "text/plain")}},
     400, "file:"),
    ("post", "/api/search", {"files": {"file": ("a.png", b"", "image/png")}}, 400, "file:"),
    ("post", "/api/search", {"files": {"file": ("a.png", _png()[:60], "image/png")}},
     400, "file:"),
    ("post", "/api/search", {"data": {"k": "3"}}, 422, "file:"),
    ("post", "/api/search", {"files": {"file": ("a.png", _png(8000, 6000, "1"), "image/png")}},
     413, "file:"),
    ("post", "/api/search", {"files": {"file": ("a.png", b"\0" * (MAX_BODY_BYTES + 1),
                                                "image/png")}}, 413, "request:"),
    ("post", "/api/search", {"content": _chunks(MAX_BODY_BYTES),
                             "headers": {"content-type": "multipart/form-data; boundary=x"}},
     413, "request:"),
    ("get", "/api/item/image-20", {}, 404, "id:"),
    ("get", "/api/item/caption-100", {}, 404, "id:"),
    ("get", "/api/item/image--1", {}, 404, "id:"),
    ("get", "/api/item/image-1.png", {}, 404, "id:"),
    ("get", "/api/item/..%2Fconfig.yaml", {}, 404, ""),
    ("get", "/api/item/%2E%2E", {}, 404, ""),
    ("get", "/api/item/image-0%00", {}, 404, "id:"),
    ("get", "/static/..%2Fserve.py", {}, 404, ""),
    ("get", "/static/%2e%2e/serve.py", {}, 404, ""),
    ("get", "/api/explain", {"params": {"text": "a red circle", "id": "caption-1"}}, 404, "id:"),
    ("get", "/api/explain", {"params": {"text": "a red circle", "id": "../run"}}, 404, "id:"),
    ("get", "/api/explain", {"params": {"text": "", "id": "image-1"}}, 400, "text:"),
    ("get", "/api/explain", {"params": {"text": "a", "id": "image-1", "level": 3}}, 400,
     "level:"),
    ("post", "/api/explain", {"files": {"file": ("a.txt", b"text", "text/plain")},
                              "data": {"text": "a red circle"}}, 400, "file:"),
]


@pytest.mark.parametrize("method,url,kwargs,status,name", BAD,
                         ids=[f"{b[0]} {b[1]} {b[3]} {b[4]}" for b in BAD])
def test_bad_input_is_a_4xx_naming_the_argument(client, method, url, kwargs, status, name):
    r = getattr(client, method)(url, **kwargs) if method == "get" else \
        client.post(url, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["detail"].startswith(name), r.json()
    r = client.get("/api/search", params={"text": QUERIES[0], "k": 2})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2


def test_k_limit_is_the_gallery_or_max_k(client):
    assert MAX_K > 20  # the tiny gallery is the limit here
    r = client.get("/api/search", params={"text": QUERIES[0], "k": 20})
    assert r.status_code == 200 and len(r.json()["hits"]) == 20


def test_requests_are_served_while_the_model_is_busy(client, service):
    """A search waiting for the model lock holds a pool thread, not the event loop."""
    results = {}

    def get(name: str, url: str, **params) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.setdefault(
            name, client.get(url, params=params)))
        thread.start()
        return thread

    with service.model_lock:
        search = get("search", "/api/search", text=QUERIES[0], k=3)
        time.sleep(0.5)
        assert search.is_alive()  # the search waits for the model ...
        item = get("item", "/api/item/caption-7")  # ... while another request is answered
        item.join(timeout=20)
        assert not item.is_alive() and results["item"].status_code == 200
    search.join(timeout=60)
    assert results["search"].status_code == 200


def _wait_for_tickets(lock: FifoLock, count: int) -> None:
    deadline = time.monotonic() + 20
    while lock._next < count:
        assert time.monotonic() < deadline, "a thread never asked for the lock"
        time.sleep(0.001)


def test_model_lock_is_granted_in_arrival_order():
    """Waiting threads get the lock in the order they asked, and a thread that releases it
    and asks again at once waits behind them (``threading.Lock`` would let it straight
    back in)."""
    lock, order = FifoLock(), []

    def take(name: str) -> None:
        with lock:
            order.append(name)

    threads = []
    with lock:
        for i in range(4):
            threads.append(threading.Thread(target=take, args=(f"waiter {i}",)))
            threads[-1].start()
            _wait_for_tickets(lock, i + 2)  # the main thread holds ticket 0
    with lock:  # released and asked for again at once
        order.append("releaser")
    for t in threads:
        t.join(timeout=20)
    assert order == [f"waiter {i}" for i in range(4)] + ["releaser"]


def test_one_index_serves_its_side_only(run):
    """An image index alone answers captions; an image query is a 400 naming ``file``."""
    with TestClient(create_app(SearchService.load([run[1]], run[0]))) as c:
        assert c.get("/api/search", params={"text": QUERIES[0], "k": 3}).status_code == 200
        r = c.post("/api/search", files={"file": ("a.png", _png(), "image/png")})
        assert r.status_code == 400 and r.json()["detail"].startswith("file: this server has")
        assert c.get("/api/item/caption-0").status_code == 404
        assert c.get("/api/info").json()["image_queries"] is False


def test_index_of_another_model_is_refused(run, tmp_path):
    torch.manual_seed(1)
    cfg = load_config("hat_tiny")
    other = build_model(cfg, build_tokenizer(cfg).vocab_size)
    ckpt.save_weights(tmp_path / "best.safetensors", other, cfg, 0)
    with pytest.raises(ValueError, match="checkpoint: the index .* another model"):
        SearchService.load([run[1]], tmp_path)
    with pytest.raises(ValueError, match="index: two indexes of images"):
        SearchService.load([run[1], run[1]], run[0])


def test_folder_and_caption_file_indexes(run, direct, tmp_path):
    """Indexes of an image folder and of a caption file: hits are named by file and line,
    pictures come from the files the index recorded, captions have no image."""
    _, cfg, _, _, _ = direct
    data = build_dataset(cfg, "test")
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in (3, 1, 4):
        Image.fromarray(data.pixels[i].permute(1, 2, 0).numpy()).save(folder / f"scene{i}.png")
    (tmp_path / "captions.txt").write_text("a red circle\n\na blue square at the top\n")
    build_index(run[0], tmp_path / "images", "images", images=folder, progress=False)
    build_index(run[0], tmp_path / "texts", "texts", captions=tmp_path / "captions.txt",
                progress=False)
    service = SearchService.load([tmp_path / "images", tmp_path / "texts"], run[0])
    with TestClient(create_app(service)) as c:
        hits = c.get("/api/search", params={"text": QUERIES[0], "k": 3}).json()["hits"]
        assert sorted(h["name"] for h in hits) == ["scene1.png", "scene3.png", "scene4.png"]
        assert all("caption" not in h for h in hits)
        n = [h["name"] for h in hits].index("scene4.png")
        png = c.get(f"/api/item/{hits[n]['id']}").content
        with Image.open(io.BytesIO(png)) as img:  # scene 4, scaled up from its file
            small = np.array(img.convert("RGB").resize((32, 32), Image.NEAREST))
        assert torch.equal(torch.from_numpy(small).permute(2, 0, 1), data.pixels[4])
        r = c.get("/api/explain", params={"text": QUERIES[0], "id": hits[n]["id"]})
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        r = c.post("/api/search", files={"file": ("a.png", png, "image/png")}, data={"k": 2})
        assert sorted((h["name"], h["text"], h["image"]) for h in r.json()["hits"]) == [
            ("0", "a red circle", None), ("1", "a blue square at the top", None)]


def test_teran_serves_captions_and_region_pictures(tmp_path):
    """A TERAN model: caption queries and region pictures work; image queries are a 400."""
    from test_visualize import TERAN

    torch.manual_seed(0)
    cfg = load_config("teran_default", TERAN)
    model = build_model(cfg, build_tokenizer(cfg).vocab_size)
    ckpt.save_weights(tmp_path / "run" / "best.safetensors", model, cfg, 0)
    for side in ("images", "texts"):
        build_index(tmp_path / "run", tmp_path / side, side, progress=False)
    service = SearchService.load([tmp_path / "images", tmp_path / "texts"], tmp_path / "run")
    with TestClient(create_app(service)) as c:
        r = c.get("/api/search", params={"text": QUERIES[0], "k": 4})
        assert r.status_code == 200 and len(r.json()["hits"]) == 4
        r = c.get("/api/explain", params={"text": QUERIES[0], "id": r.json()["hits"][0]["id"]})
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        assert c.get("/api/item/image-0").content.startswith(b"\x89PNG")
        r = c.post("/api/search", files={"file": ("a.png", _png(), "image/png")})
        assert r.status_code == 400 and "TERAN" in r.json()["detail"]
        info = c.get("/api/info").json()
        assert info["model"] == "TERAN" and not info["image_queries"]


def test_cli_errors_name_the_argument(run, tmp_path, capsys):
    for argv, message in (
        ([str(tmp_path), "--checkpoint", str(run[0])], "index: "),
        ([str(run[1]), "--checkpoint", str(run[0]), "data.bogus=1"], "data.bogus: "),
        (["data.image_size=64", "--checkpoint", str(run[0])], "index: give at least one"),
        ([str(run[1]), "--checkpoint", str(tmp_path)], "checkpoint: "),
    ):
        with pytest.raises(SystemExit) as exit_info:
            serve_cli.main(argv)
        assert exit_info.value.code == 2
        assert f"error: {message}" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stop,returncode", [(signal.SIGINT, 0), (signal.SIGTERM, -15)])
def test_cli_binds_to_localhost_and_stops_cleanly(run, stop, returncode):
    """Ctrl-C ends the process quietly (0); SIGTERM, after the same graceful shutdown, ends
    it as killed by SIGTERM (uvicorn re-raises the signal it handled)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hatmodel.serve", str(run[1]), str(run[2]),
         "--checkpoint", str(run[0]),
         "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert r.status_code == 200 and r.json()["model"] == "HAT"
        listening = {c.laddr for c in psutil.Process(proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}  # the loopback address only
        proc.send_signal(stop)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == returncode, out
    assert "Shutting down" in out and "Finished server process" in out, out
    assert "Traceback" not in out, out
