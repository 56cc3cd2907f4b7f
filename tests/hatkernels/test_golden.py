"""The golden cases of ../shared/golden (an independent float64 pair-by-pair reference) on
every CPU-runnable backend, float32 and bfloat16 (scores and gradients), NaN padding as
shipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment_cases import TOLERANCE, backend_params, rel_err
from hatkernels import hier_align
from hatkernels.reference import naive_hier_align

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
    cotangent = torch.from_numpy(data["cotangent"]).float()
    grads = torch.autograd.grad(out, images + texts, cotangent)
    expected = get("grad_images") + get("grad_texts")
    floor = 1e-3 * float(cotangent.norm())
    # Rounding the inputs to bfloat16 moves the exact gradients themselves (a max-pooling
    # winner can change, a sharp softmax amplifies): the float64 reference on the rounded
    # inputs measures that. The kernel must be within the tolerance of that reference, and
    # within the tolerance (or 2x what rounding alone moved) of the golden gradients.
    rounded = _reference_grads(data, get, case, images, texts) if dtype != torch.float32 \
        else expected  # fmt: skip
    for g, e, r, x in zip(grads, expected, rounded, images + texts):
        assert g.dtype == dtype
        assert bool((g[~torch.isfinite(x)] == 0).all())
        own = rel_err(g, r, floor=floor)
        assert own <= grad_tol, f"gradient rel err {own:.3g} vs the reference on its inputs"
        moved = rel_err(r, e, floor=floor)
        err = rel_err(g, e, floor=floor)
        bar = max(grad_tol, 2 * moved)
        assert err <= bar, f"gradient rel err {err:.3g} > {bar:.3g} (rounding alone: {moved:.3g})"


def _reference_grads(data, get, case, images, texts) -> list[torch.Tensor]:
    """The float64 reference's gradients on the (dtype-rounded) inputs, 0 on padding."""
    rounded = [[x.detach().double().requires_grad_(True) for x in side] for side in (images, texts)]
    kwargs = {k: v for k, v in case["kwargs"].items() if k != "weights"}
    ref = naive_hier_align(*rounded, get("image_lengths"), get("text_lengths"),
                           weights=case["kwargs"].get("weights"), **kwargs)  # fmt: skip
    grads = torch.autograd.grad(ref, rounded[0] + rounded[1], torch.from_numpy(data["cotangent"]))
    return [torch.nan_to_num(g) for g in grads]


MAX_CASES = [c for c in MANIFEST if c["kwargs"].get("pooling", "scan") == "max"]


@pytest.mark.skipif(not MAX_CASES, reason=f"golden max cases not found at {GOLDEN}")
@pytest.mark.parametrize("case", MAX_CASES, ids=[c["case"] for c in MAX_CASES])
def test_golden_through_screening(case):
    """The max cases with their features padded by zeros to 96, where the cpu backend's max
    forward screens with int8 codes (smaller d is never screened): zero features change no
    similarity, so scores and gradients must still be the golden ones (the padded features'
    gradients zero); NaN padding as shipped."""
    pytest.importorskip("hatkernels._C_cpu")
    data, get = _load(case)

    def widen(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x.float(), (0, 96 - x.shape[-1])).requires_grad_(True)

    images, texts = [widen(x) for x in get("images")], [widen(x) for x in get("texts")]
    out = hier_align(images, texts, image_lengths=get("image_lengths"),
                     text_lengths=get("text_lengths"), backend="cpu", **case["kwargs"])  # fmt: skip
    fwd_tol, grad_tol = TOLERANCE[torch.float32]
    assert rel_err(out, torch.from_numpy(data["scores"])) <= fwd_tol
    cotangent = torch.from_numpy(data["cotangent"]).float()
    grads = torch.autograd.grad(out, images + texts, cotangent)
    floor = 1e-3 * float(cotangent.norm())
    for g, e in zip(grads, get("grad_images") + get("grad_texts")):
        d = e.shape[-1]
        assert rel_err(g[..., :d], e, floor=floor) <= grad_tol
        assert bool((g[..., d:] == 0).all())
