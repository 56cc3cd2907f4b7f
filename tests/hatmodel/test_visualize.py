"""``python -m hatmodel.visualize``: the alignment picture of a HAT and a TERAN checkpoint
(random weights, tiny models), from an index into a split and (HAT) from an image file."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hatmodel import checkpoint as ckpt
from hatmodel.config import load_config
from hatmodel.data import build_dataset, build_tokenizer
from hatmodel.models import build_model
from hatmodel.visualize import alignment, main

SCENES = ["data.scenes.train_images=4", "data.scenes.val_images=4", "data.scenes.test_images=4"]
TERAN = SCENES + [
    "model.embed_dim=32", "model.teran.region_dim=32", "model.teran.region_layers=1",
    "model.teran.region_ff=64", "model.teran.box_hidden=16", "model.teran.shared_ff=64",
    "model.text.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "intermediate_size: 64, max_position_embeddings: 32}",
    "model.text.layers=[1]", "data.regions.feature_dim=40",
]


def _checkpoint(tmp_path, name: str, overrides: list[str]):
    torch.manual_seed(0)
    cfg = load_config(name, overrides)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok.vocab_size).eval()
    folder = tmp_path / name
    ckpt.save_weights(folder / "best.safetensors", model, cfg, 0)
    return folder, cfg, tok, model


def _is_png(path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 200


def test_teran_picture(tmp_path):
    folder, cfg, tok, model = _checkpoint(tmp_path, "teran_default", TERAN)
    out = main([str(folder), "--image", "2", "--out", str(tmp_path / "teran.png"),
                "--caption", "a small red circle and a big blue square", *SCENES])
    _is_png(out)
    # What the picture shows: the aligned words only, against the image's regions.
    data = build_dataset(cfg, "test")
    result = alignment(model, tok, data.image(2), "a small red circle and a big blue square")
    assert result["words"] == "a small red circle and a big blue".split()
    assert result["left_out"] == ["[CLS]", "square", "[SEP]"]
    assert result["sims"].shape == (8, len(data.scenes[2].objects) + 3)
    ids, mask = tok(["a small red circle and a big blue square"])
    with torch.no_grad():
        assert result["score"] == pytest.approx(float(model(data.image(2)[None], ids, mask)))
        assert result["score"] == pytest.approx(float(result["sims"].max(1).sum()), rel=1e-5)
    with pytest.raises(ValueError, match="index"):
        main([str(folder), "--image", "99", "--out", str(tmp_path / "x.png"), *SCENES])


def test_hat_picture_from_index_and_file(tmp_path):
    folder, cfg, tok, model = _checkpoint(tmp_path, "hat_scenes", SCENES)
    out = main([str(folder), "--image", "1", "--level", "1", "--out", str(tmp_path / "hat.png"),
                *SCENES])
    _is_png(out)
    data = build_dataset(cfg, "test")
    result = alignment(model, tok, data.image(1), data.captions[5])
    assert result["words"][0] == "[CLS]" and result["words"][-1] == "[SEP]"
    assert result["sims"].shape[0] == len(result["words"]) and result["left_out"] == []
    picture = tmp_path / "scene.png"
    Image.fromarray(data.pixels[1].permute(1, 2, 0).numpy()).save(picture)
    out = main([str(folder), "--image", str(picture), "--caption", "a red circle",
                "--out", str(tmp_path / "hat_file.png")])
    _is_png(out)
    with pytest.raises(ValueError, match="caption"):
        main([str(folder), "--image", str(picture), "--out", str(tmp_path / "y.png")])


def test_out_folder_level_and_bad_arguments(tmp_path):
    folder, *_ = _checkpoint(tmp_path, "hat_scenes", SCENES)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    # A folder gets alignment.png inside it, and the path printed is the one written.
    out = main([str(folder), "--image", "1", "--out", str(pictures), *SCENES])
    assert out == pictures / "alignment.png" and sorted(pictures.iterdir()) == [out]
    _is_png(out)
    out = main([str(folder), "--image", "1", "--out", str(tmp_path / "new") + "/", *SCENES])
    assert out == tmp_path / "new" / "alignment.png"
    _is_png(out)
    for bad, needle in ((["--out", str(tmp_path / "x.jpg")], "out: expected a .png"),
                        (["--level", "-1"], "level: expected 0"),
                        (["--level", "3"], "level: expected 0 .* to 2, got 3")):
        with pytest.raises(ValueError, match=needle):
            main([str(folder), "--image", "1", *bad, *SCENES])
    assert not (tmp_path / "x.jpg").exists()
