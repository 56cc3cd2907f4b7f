"""TERAN on the hatmodel pipeline: shapes, the tokens left out of the alignment (by
views and lengths), poolings, loss gradients, training steps, the three region-data formats
(scenes, per-image npz + Karpathy JSON, SCAN-style arrays) and their errors, a short run of
the training CLI, and the paper configuration's forward and backward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hatmodel.config import load_config
from hatmodel.data import build_dataset, build_tokenizer
from hatmodel.data.regions import (
    NpzRegions,
    ScanRegions,
    SceneRegions,
    pack_regions,
    unpack_regions,
)
from hatmodel.evaluate import evaluate_model, retrieval_metrics
from hatmodel.losses import hinge_loss
from hatmodel.models import TERAN, build_model

FEAT = 48
TINY = [
    "model.embed_dim=32", "model.teran.region_dim=32", "model.teran.region_layers=1",
    "model.teran.region_ff=64", "model.teran.box_hidden=16", "model.teran.shared_ff=64",
    "model.teran.dropout=0.0",
    "model.text.config={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 64, max_position_embeddings: 32}",
    "model.text.layers=[2]", f"data.regions.feature_dim={FEAT}",
    "data.scenes.train_images=64", "data.scenes.val_images=16", "data.scenes.test_images=16",
]


def tiny_cfg(*extra: str) -> dict:
    return load_config("teran_default", TINY + list(extra))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    tok = build_tokenizer(cfg)
    data = build_dataset(cfg, "train")
    model = build_model(cfg, tok.vocab_size).eval()
    return cfg, tok, data, model


def _batch(data, tok, n: int, offset: int = 0):
    images = torch.stack([data.image(i) for i in range(offset, offset + n)])
    ids, mask = tok([data.captions[5 * i] for i in range(offset, offset + n)])
    return images, ids, mask


def test_shapes_views_and_lengths(setup):
    cfg, tok, data, model = setup
    images, ids, mask = _batch(data, tok, 5)
    img = model.encode_images(images)
    txt = model.encode_texts(ids, mask)
    n_regions = torch.tensor([len(s.objects) + 3 for s in data.scenes[:5]])
    assert img.levels[0].shape == (5, data.max_regions, 32)
    assert torch.equal(img.lengths[0], n_regions)
    assert txt.levels[0].shape == (5, ids.shape[1] - 1, 32)
    # [CLS] sits before the view; the final word and [SEP] are past the valid length.
    assert torch.equal(txt.lengths[0], mask.sum(1) - 3)
    # Views into the encoder outputs (one token in), not copies.
    for tokens in (img.levels[0], txt.levels[0]):
        assert tokens._base is not None and tokens._base.shape[1] == tokens.shape[1] + 1
        assert tokens.storage_offset() == tokens.shape[-1]
    norms = img.levels[0][0, : n_regions[0]].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    scores = model.score(img, txt)
    assert scores.shape == (5, 5) and torch.isfinite(scores).all()


def _reference_mrsw(model: TERAN, images, ids, mask) -> torch.Tensor:
    """MrSw from the full token tensors, leaving out token 0 and the last two by hand."""
    feats, boxes, counts = unpack_regions(images, model.region_encoder.feature_dim)
    full_img = model.image_tokens(feats, boxes, counts).double()
    full_txt = model.text_tokens(ids, mask).double()
    lengths = mask.sum(1)
    out = torch.zeros(len(images), len(ids), dtype=torch.float64)
    for i in range(len(images)):
        regions = full_img[i, 1: 1 + counts[i]]  # no global token
        for j in range(len(ids)):
            words = full_txt[j, 1: lengths[j] - 2]  # no [CLS], no final word, no [SEP]
            out[i, j] = (words @ regions.T).amax(1).sum()
    return out


def test_left_out_tokens_match_reference(setup):
    cfg, tok, data, model = setup
    images, ids, mask = _batch(data, tok, 4)
    with torch.no_grad():
        scores = model(images, ids, mask)
        ref = _reference_mrsw(model, images, ids, mask)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-5)


def test_left_out_tokens_never_read(setup):
    """NaN in the global token, [CLS], the final word and [SEP] changes no score."""
    cfg, tok, data, model = setup
    images, ids, mask = _batch(data, tok, 3)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.encode_texts(ids, mask)
        clean = model.score(img, txt)
        img.levels[0]._base[:, 0] = float("nan")  # the global token, before the view
        txt.levels[0]._base[:, 0] = float("nan")  # [CLS]
        lengths = mask.sum(1)
        for j in range(3):  # the view's final word, [SEP] and padding
            txt.levels[0][j, lengths[j] - 3:] = float("nan")
        for i in range(3):  # padding regions
            img.levels[0][i, img.lengths[0][i]:] = float("nan")
        torch.testing.assert_close(model.score(img, txt), clean)


@pytest.mark.parametrize("pooling,direction,reduce", [
    ("max", "t2i", "sum"), ("max", "i2t", "mean"), ("max", "both", "sum"),
    ("scan", "i2t", "mean"), ("scan", "t2i", "sum"), ("scan", "both", "mean"),
])
def test_every_pooling(setup, pooling, direction, reduce):
    cfg, tok, data, model = setup
    model.align.update(pooling=pooling, direction=direction, reduce=reduce)
    try:
        images, ids, mask = _batch(data, tok, 3)
        scores = model(images, ids, mask)
        assert scores.shape == (3, 3) and torch.isfinite(scores).all()
    finally:
        model.align.update(pooling="max", direction="t2i", reduce="sum")


def test_loss_gradients_reach_every_part(setup):
    cfg, tok, data, _ = setup
    torch.manual_seed(1)
    model = build_model(cfg, tok.vocab_size).train()
    images, ids, mask = _batch(data, tok, 6)
    loss = hinge_loss(model(images, ids, mask))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    for name in ("region_encoder.input.weight", "region_encoder.box.0.weight",
                 "region_encoder.global_token", "text_proj.weight",
                 "text_encoder.bert.embeddings.word_embeddings.weight",
                 "shared_encoder.layers.0.linear1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # Shared: one encoder serves both sides; unshared: the text side gets its own.
    assert model.text_own_encoder is None
    unshared = build_model(tiny_cfg("model.teran.shared=false"), tok.vocab_size)
    assert unshared.text_own_encoder is not None
    assert sum(p.numel() for p in unshared.parameters()) > sum(
        p.numel() for p in model.parameters())


def test_few_steps_lower_the_loss(setup):
    cfg, tok, data, _ = setup
    torch.manual_seed(2)
    model = build_model(cfg, tok.vocab_size).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, ids, mask = _batch(data, tok, 16)
    losses = []
    for _ in range(15):
        loss = hinge_loss(model(images, ids, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_scene_regions_deterministic_one_per_object():
    a = SceneRegions("val", 4, seed=3, feature_dim=FEAT, background=2)
    b = SceneRegions("val", 4, seed=3, feature_dim=FEAT, background=2)
    for i in range(4):
        fa, ba = a.regions(i)
        fb, bb = b.regions(i)
        assert torch.equal(fa, fb) and torch.equal(ba, bb)
        n = len(a.scenes[i].objects)
        assert fa.shape == (n + 2, FEAT)
        np.testing.assert_allclose(ba[:n].numpy(), np.clip([o.box for o in a.scenes[i].objects],
                                                           0, 1), rtol=1e-6)
        assert (ba[:, 2] >= ba[:, 0]).all() and (ba[:, 3] >= ba[:, 1]).all()
        packed = a.image(i)
        assert packed.shape == (a.max_regions, FEAT + 5) and packed[:, -1].sum() == n + 2
    # Same attributes -> features near the same projection; other seeds -> other features.
    c = SceneRegions("val", 4, seed=4, feature_dim=FEAT, background=2)
    assert not torch.equal(a.regions(0)[0], c.regions(0)[0])


def _karpathy(tmp_path, n=4, split="test"):
    entries = [{"filename": f"img{i}.jpg", "split": split,
                "sentences": [{"raw": f"a red circle number {i} caption {c}"} for c in range(5)]}
               for i in range(n)]
    path = tmp_path / "dataset_f30k.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def _write_npz(folder, i, k=5, dim=FEAT, **change):
    rng = np.random.default_rng(i)
    arrays = {"features": rng.standard_normal((k, dim)).astype(np.float32),
              "boxes": np.array([[10, 20, 110, 90]] * k, dtype=np.float32),
              "image_w": 640, "image_h": 480}
    arrays.update(change)
    np.savez(folder / f"img{i}.npz", **arrays)
    return arrays


def test_npz_regions(tmp_path):
    json_path = _karpathy(tmp_path)
    folder = tmp_path / "regions"
    folder.mkdir()
    written = [_write_npz(folder, i, k=3 + i) for i in range(4)]
    cfg = tiny_cfg("data.kind=f30k", f"data.json={json_path}", "data.regions.format=npz",
                   f"data.regions.root={folder}", "data.regions.max_regions=8")
    data = build_dataset(cfg, "test")
    assert isinstance(data, NpzRegions) and data.n_images == 4 and len(data.captions) == 20
    packed = data.image(2)
    assert packed.shape == (8, FEAT + 5) and packed[:, -1].sum() == 5
    np.testing.assert_allclose(packed[:5, :FEAT].numpy(), written[2]["features"])
    np.testing.assert_allclose(packed[0, FEAT:FEAT + 4].numpy(),
                               [10 / 640, 20 / 480, 110 / 640, 90 / 480], rtol=1e-6)
    # The model runs on it end to end (scene tokenizer stands in for BERT's here).
    tok = build_tokenizer(tiny_cfg())
    model = build_model(cfg, tok.vocab_size).eval()
    metrics, sims = evaluate_model(model, data, tok, torch.device("cpu"), batch_size=3,
                                   progress=False)
    # The evaluation (batches of 3, encoded once, scored in blocks) scores every pair as the
    # model's own forward pass does, and its metrics are those of that matrix.
    images = torch.stack([data.image(i) for i in range(4)])
    ids, mask = tok(data.captions)
    with torch.no_grad():
        direct = model(images, ids, mask)
    assert sims.shape == (4, 20)
    torch.testing.assert_close(sims, direct, rtol=1e-5, atol=1e-5)
    assert metrics == pytest.approx(retrieval_metrics(direct, 5))


@pytest.mark.parametrize("change,needle", [
    ({"features": np.full((5, FEAT), np.nan, np.float32)}, "NaN"),
    ({"features": np.zeros((5, FEAT + 1), np.float32)}, "shape"),
    ({"boxes": np.zeros((4, 4), np.float32)}, "boxes"),
    ({"boxes": np.array([[0, 0, 700, 10]] * 5, np.float32)}, "inside"),
    ({"image_w": 0}, "positive"),
])
def test_npz_bad_files_name_the_file(tmp_path, change, needle):
    json_path = _karpathy(tmp_path, n=2)
    folder = tmp_path / "regions"
    folder.mkdir()
    _write_npz(folder, 0)
    _write_npz(folder, 1, **change)
    data = NpzRegions(json_path, folder, "test", FEAT, 8)
    data.image(0)
    with pytest.raises(ValueError, match=needle) as err:
        data.image(1)
    assert "img1.npz" in str(err.value)


def test_npz_missing_file_and_missing_key(tmp_path):
    json_path = _karpathy(tmp_path, n=2)
    folder = tmp_path / "regions"
    folder.mkdir()
    _write_npz(folder, 0)
    with pytest.raises(ValueError, match="img1.npz"):
        NpzRegions(json_path, folder, "test", FEAT, 8)
    np.savez(folder / "img1.npz", features=np.zeros((2, FEAT), np.float32))
    with pytest.raises(ValueError, match=r"img1\.npz.*missing array"):
        NpzRegions(json_path, folder, "test", FEAT, 8).image(1)


class _Payload:
    """Unpickling this creates ``marker`` (as any code in a crafted pickle could)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_region_files_holding_pickles_are_refused_unread(tmp_path):
    """npz and npy files may hold pickled objects; region files are read without pickle."""
    marker = tmp_path / "marker"
    payload = np.array([_Payload(marker)], dtype=object)
    json_path = _karpathy(tmp_path, n=1)
    folder = tmp_path / "regions"
    folder.mkdir()
    _write_npz(folder, 0, features=payload)
    with pytest.raises(ValueError, match=r"img0\.npz: not a readable .npz file"):
        NpzRegions(json_path, folder, "test", FEAT, 8).image(0)
    np.save(folder / "test_ims.npy", payload)
    (folder / "test_caps.txt").write_text("a\n" * 5)
    with pytest.raises(ValueError, match=r"test_ims\.npy: not a readable .npy array"):
        ScanRegions(folder, "test", FEAT)
    assert not marker.exists()


def test_scan_regions(tmp_path):
    rng = np.random.default_rng(0)
    ims = rng.standard_normal((3, 36, FEAT)).astype(np.float32)
    np.save(tmp_path / "dev_ims.npy", ims)
    (tmp_path / "dev_caps.txt").write_text("\n".join(f"caption {k}" for k in range(15)) + "\n")
    cfg = tiny_cfg("data.kind=f30k", "data.regions.format=scan",
                   f"data.regions.root={tmp_path}", "data.regions.max_regions=36")
    data = build_dataset(cfg, "val")  # val -> dev_* through data.regions.split_names
    assert isinstance(data, ScanRegions) and data.n_images == 3 and data.captions[5] == "caption 5"
    packed = data.image(1)
    assert packed.shape == (36, FEAT + 5) and packed[:, -1].sum() == 36
    np.testing.assert_allclose(packed[:, :FEAT].numpy(), ims[1])
    assert packed[:, FEAT:FEAT + 4].abs().sum() == 0  # no boxes in this format
    tok = build_tokenizer(tiny_cfg())
    model = build_model(cfg, tok.vocab_size).eval()
    assert model(packed[None], *tok(["a red circle and a blue square"])).shape == (1, 1)

    (tmp_path / "dev_caps.txt").write_text("only one caption\n")
    with pytest.raises(ValueError, match="dev_caps.txt"):
        ScanRegions(tmp_path, "dev", FEAT)
    (tmp_path / "dev_caps.txt").write_text("\n".join(["c"] * 15))
    ims[2, 4, 7] = np.nan
    np.save(tmp_path / "dev_ims.npy", ims)
    bad = ScanRegions(tmp_path, "dev", FEAT)
    with pytest.raises(ValueError, match=r"dev_ims\.npy.*NaN"):
        bad.image(2)
    with pytest.raises(ValueError, match=r"dev_ims\.npy.*shape"):
        ScanRegions(tmp_path, "dev", FEAT + 1)
    with pytest.raises(ValueError, match="test_ims.npy"):
        ScanRegions(tmp_path, "test", FEAT)


def test_pack_regions_truncates_and_pads():
    packed = pack_regions(torch.ones(5, 3), torch.full((5, 4), 0.5), 4)
    assert packed.shape == (4, 8) and packed[:, -1].sum() == 4
    packed = pack_regions(torch.ones(2, 3), torch.full((2, 4), 0.5), 4)
    assert packed[2:].abs().sum() == 0


def test_train_cli_runs_teran(tmp_path):
    from hatmodel.train import main

    args = ["--config", "teran_default", "--output-dir", str(tmp_path), "--no-progress",
            *TINY, "train.epochs=2", "train.batch_size=16", "train.warmup_steps=2",
            "eval.batch_size=16", "train.threads=1"]
    metrics = main(args)
    for name in ("best.safetensors", "last.safetensors", "metrics.json", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == set(metrics)
    from hatmodel.evaluate import main as evaluate

    again = evaluate([str(tmp_path), "--no-progress", "--out", str(tmp_path / "m.json")])
    assert again == pytest.approx(metrics)


def test_paper_configuration_forward_backward():
    """teran_coco.yaml with random weights: 36 x 2048 regions with boxes, BERT-base cut to
    6 layers, 1024-d, the shared encoder."""
    torch.manual_seed(0)
    cfg = load_config("teran_coco", ["model.text.pretrained=null"])
    model = build_model(cfg)
    assert len(model.text_encoder.bert.encoder.layer) == 6
    assert model.text_encoder.dim == 768 and model.text_own_encoder is None
    assert model.region_encoder.encoder.layers[0].linear1.in_features == 2048
    regions = [pack_regions(torch.randn(36, 2048), torch.rand(36, 4).sort(-1).values,
                            36) for _ in range(2)]
    images = torch.stack(regions)
    ids = torch.randint(1000, 30000, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    scores = model(images, ids, mask)
    assert scores.shape == (2, 3)
    img = model.encode_images(images)
    assert img.levels[0].shape == (2, 36, 1024)
    hinge_loss(scores[:, :2]).backward()
    for p in (model.region_encoder.global_token, model.text_proj.weight,
              model.shared_encoder.layers[1].linear2.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_killed_and_resumed_run_ends_the_same(tmp_path):
    from hatmodel.train import train

    cfg = tiny_cfg("train.epochs=2", "train.batch_size=16", "train.warmup_steps=2",
                   "eval.batch_size=16", "train.threads=1", "model.teran.dropout=0.1")

    class Killed(Exception):
        pass

    def kill(epoch, record):
        if epoch == 0:
            raise Killed

    whole = train(cfg, tmp_path / "whole", progress=False)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "killed", progress=False, on_epoch_end=kill)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed == whole
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "last.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
