"""hatmodel.index and hatmodel.search end to end on a tiny run trained here: the hits are the
model's own best pairs, the index folder is complete or absent, bad input is named, and two
torchrun ranks print what one process prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hatmodel import index as index_cli
from hatmodel import search as search_cli
from hatmodel import train as train_cli
from hatmodel.checkpoint import load_for_eval, resolve_checkpoint
from hatmodel.data import build_dataset, build_tokenizer
from hatmodel.evaluate import encode_images


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "tiny"
    train_cli.main(["--config", "hat_tiny", "--output-dir", str(out), "--no-progress",
                    "train.epochs=1"])
    yield out
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def indexes(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("indexes")
    index_cli.main([str(run), "--side", "images", "--out", str(folder / "img"), "--no-progress",
                    "--dtype", "float32", "--shard-size", "7"])
    index_cli.main([str(run), "--side", "texts", "--out", str(folder / "txt"), "--no-progress",
                    "--shard-size", "16"])
    return folder


def test_index_folder(indexes) -> None:
    info, items, store = index_cli.read_index(indexes / "img")
    assert info["side"] == "images" and info["count"] == 20 == len(items) == len(store)
    assert items[3]["id"] == 3 and len(items[3]["captions"]) == 5
    assert json.loads((indexes / "img" / "tokens" / "manifest.json").read_text())["dtype"] \
        == "float32"
    info, items, store = index_cli.read_index(indexes / "txt")
    assert info["side"] == "texts" and len(store) == 100 and items[7]["image"] == 1
    assert [p.name for p in indexes.iterdir() if p.name.startswith(".")] == []


def test_text_search_finds_the_models_best_images(run, indexes, capsys) -> None:
    model, cfg, _ = load_for_eval(run)
    dataset = build_dataset(cfg, "test")
    caption = dataset.captions[12]
    hits = search_cli.main([str(indexes / "img"), "--checkpoint", str(run), "--text", caption,
                            "-k", "5"])
    printed = capsys.readouterr().out.splitlines()
    assert len(hits) == len(printed) == 5 and printed[0].split()[:3] == [
        "1", f"{hits[0]['score']:.4f}", str(hits[0]["id"])]
    img = encode_images(model, dataset, torch.device("cpu"), 32, progress=False)
    with torch.no_grad():
        cap = model.encode_texts(*build_tokenizer(cfg)([caption]))  # as the search encodes it
        dense = model.score(img, cap)[:, 0]
    order = torch.sort(dense, descending=True, stable=True).indices[:5]
    assert [h["index"] for h in hits] == order.tolist()
    np.testing.assert_allclose([h["score"] for h in hits], dense[order].numpy(), rtol=1e-5)


def test_image_search_and_picture(run, indexes, tmp_path, capsys) -> None:
    out = tmp_path / "hits.png"
    hits = search_cli.main([str(indexes / "txt"), "--checkpoint", str(run), "--image", "4",
                            "-k", "3", "--out", str(out)])
    assert [h["rank"] for h in hits] == [1, 2, 3] and all("caption" in h for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert hits[0]["caption"] in capsys.readouterr().out
    assert Image.open(out).size[0] > 100
    picture = tmp_path / "q.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(picture)
    searcher = search_cli.Searcher(indexes / "txt", run)
    assert [h["index"] for h in searcher.image(str(picture), 3)] == \
        [h["index"] for h in searcher.image(Image.open(picture), 3)]


def test_image_folder_index(run, tmp_path, capsys) -> None:
    pics = tmp_path / "pics"
    pics.mkdir()
    for n, colour in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
        Image.fromarray(np.full((40, 40, 3), colour, np.uint8)).save(pics / f"p{n}.png")
    (pics / "notes.txt").write_text("not an image")
    index_cli.main([str(run), "--side", "images", "--images", str(pics), "--out",
                    str(tmp_path / "idx"), "--no-progress"])
    hits = search_cli.main([str(tmp_path / "idx"), "--checkpoint", str(run), "--text",
                            "a red square", "-k", "3", "--out", str(tmp_path / "o.png")])
    assert sorted(h["id"] for h in hits) == ["p0.png", "p1.png", "p2.png"]
    assert str(pics / hits[0]["id"]) in capsys.readouterr().out


def test_bad_input_is_named_and_writes_nothing(run, indexes, tmp_path) -> None:
    with pytest.raises(ValueError, match="^--out: .* already exists"):
        index_cli.main([str(run), "--side", "texts", "--out", str(indexes / "txt")])
    with pytest.raises(ValueError, match="^--images: indexes images"):
        index_cli.main([str(run), "--side", "texts", "--images", str(tmp_path),
                        "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="^--images: no image files"):
        index_cli.main([str(run), "--side", "images", "--images", str(tmp_path),
                        "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="^query: the index holds texts"):
        search_cli.main([str(indexes / "txt"), "--checkpoint", str(run), "--text", "a cat"])
    with pytest.raises(ValueError, match="^k: expected 1 <= k <= 20"):
        search_cli.main([str(indexes / "img"), "--checkpoint", str(run), "--text", "a", "-k",
                         "21"])
    with pytest.raises(ValueError, match="^index: .* is not an index folder"):
        search_cli.main([str(tmp_path), "--checkpoint", str(run), "--text", "a"])
    # Another model's weights: the index refuses it.
    ckpt = resolve_checkpoint(run)
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v + 1e-3 for k, v in load_file(str(ckpt)).items()}
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="^checkpoint: the index at .* another model"):
        search_cli.main([str(indexes / "img"), "--checkpoint", str(tmp_path / "other.safetensors"),
                         "--text", "a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_torchrun_two_ranks_print_what_one_process_prints(run, indexes, capsys) -> None:
    args = [str(indexes / "txt"), "--checkpoint", str(run), "--image", "5", "-k", "6"]
    search_cli.main(args)
    one = capsys.readouterr().out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "-m", "hatmodel.search", *args], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert len(one.splitlines()) == 6 and two == one
