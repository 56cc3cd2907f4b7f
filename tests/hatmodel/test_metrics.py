"""retrieval_metrics (the papers' protocol) on hand-built score matrices."""

import numpy as np
import pytest
import torch

from hatmodel.evaluate import METRIC_KEYS, protocol_folds, retrieval_metrics


def perfect(n, cpi=5):
    owner = np.arange(n * cpi) // cpi
    return (owner[None, :] == np.arange(n)[:, None]).astype(np.float32)


def test_perfect_matrix_ranks_everything_first():
    m = retrieval_metrics(perfect(7))
    assert set(m) == set(METRIC_KEYS)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert m[key] == 100.0
    assert m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0


def test_hand_built_ranks():
    # 3 images x 2 captions each. Image 0: true captions 0, 1; its best true caption (1,
    # score 0.5) is beaten by captions 2 and 4 -> rank 3. Image 1: true caption 3 is first.
    # Image 2: true 4 (0.1) / 5 (0.0) beaten by caption 0 (0.9) -> rank 2.
    s = np.array([
        [0.1, 0.5, 0.8, 0.2, 0.6, 0.0],
        [0.0, 0.1, 0.3, 0.9, 0.2, 0.1],
        [0.9, 0.0, 0.0, 0.05, 0.1, 0.0],
    ], dtype=np.float32)
    m = retrieval_metrics(s, captions_per_image=2)
    # i2t ranks (1-based): 3, 1, 2
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == 100.0
    assert m["i2t_medr"] == 2.0 and m["i2t_meanr"] == pytest.approx(2.0)
    # t2i: per caption, rank of its image in its column.
    # c0: img0 .1 vs .0, .9 -> 2; c1: .5 vs .1, .0 -> 1; c2: img1 .3 vs .8, .0 -> 2;
    # c3: .9 -> 1; c4: img2 .1 vs .6, .2 -> 3; c5: img2 .0 vs .0 (tie), .1 -> 3
    ranks = np.array([2, 1, 2, 1, 3, 3])
    assert m["t2i_r1"] == pytest.approx(100 * np.mean(ranks == 1))
    assert m["t2i_meanr"] == pytest.approx(ranks.mean())
    assert m["t2i_medr"] == np.floor(np.median(ranks - 1)) + 1
    assert m["rsum"] == pytest.approx(sum(m[k] for k in METRIC_KEYS[:6]))


def test_constant_matrix_is_not_rewarded():
    m = retrieval_metrics(np.zeros((10, 50)))
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["t2i_medr"] == 10.0 and m["i2t_medr"] == 46.0  # 45 tied negatives ahead


def test_tensor_input_and_folds():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((20, 100)).astype(np.float32)
    s[:10, :50] += 5 * perfect(10)  # first fold easy, second random
    whole = retrieval_metrics(torch.from_numpy(s), folds=1)
    two = retrieval_metrics(s, folds=2)
    first = retrieval_metrics(s[:10, :50])
    second = retrieval_metrics(s[10:, 50:])
    for key in METRIC_KEYS:
        assert two[key] == pytest.approx((first[key] + second[key]) / 2)
    assert first["i2t_r1"] == 100.0
    assert whole["i2t_r1"] < 100.0


def test_bad_input():
    with pytest.raises(ValueError, match="sims"):
        retrieval_metrics(np.zeros((3, 14)))
    with pytest.raises(ValueError, match="folds"):
        retrieval_metrics(np.zeros((3, 15)), folds=2)
    with pytest.raises(ValueError, match="sims"):
        retrieval_metrics(np.full((2, 10), np.nan))
    with pytest.raises(ValueError, match="protocol"):
        protocol_folds("1k", 1500)
    assert protocol_folds("1k", 5000) == 5 and protocol_folds("5k", 5000) == 1
