"""The golden cases of ../shared/golden (an independent float64 pair-by-pair reference) on
every CPU-runnable backend, float32 and bfloat16, NaN padding as shipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment_cases import TOLERANCE, backend_params, rel_err
from hatkernels import hier_align

GOLDEN = Path(os.environ.get("HATKERNELS_GOLDEN", Path(__file__).parents[3] / "shared" / "golden"))
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text()) if GOLDEN.is_dir() else []


def _load(case: dict):
    data = np.load(GOLDEN / f"{case['case']}.npz")
    levels = range(case["levels"])

    def get(name):
        return [torch.from_numpy(data[f"{name}_{level}"]) for level in levels]

    return data, get


@pytest.mark.skipif(not MANIFEST, reason=f"golden cases not found at {GOLDEN}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", MANIFEST, ids=[c["case"] for c in MANIFEST])
@pytest.mark.parametrize("backend", backend_params())
def test_golden(case, backend, dtype):
    data, get = _load(case)
    images = [x.to(dtype).requires_grad_(True) for x in get("images")]
    texts = [x.to(dtype).requires_grad_(True) for x in get("texts")]
    out = hier_align(
        images,
        texts,
        image_lengths=get("image_lengths"),
        text_lengths=get("text_lengths"),
        backend=backend,
        **case["kwargs"],
    )
    fwd_tol, grad_tol = TOLERANCE[dtype]
    assert rel_err(out, torch.from_numpy(data["scores"])) <= fwd_tol
    if dtype != torch.float32:
        # Rounding the inputs to bfloat16 can move a max-pooling winner, which moves a whole
        # gradient row; low-precision gradients are checked against a reference fed the same
        # rounded inputs in test_<op>.py::test_low_precision instead.
        return
    cotangent = torch.from_numpy(data["cotangent"]).float()
    grads = torch.autograd.grad(out, images + texts, cotangent)
    expected = get("grad_images") + get("grad_texts")
    for g, e, x in zip(grads, expected, images + texts):
        assert bool((g[~torch.isfinite(x)] == 0).all())
        assert rel_err(g, e, floor=1e-3 * float(cotangent.norm())) <= grad_tol
