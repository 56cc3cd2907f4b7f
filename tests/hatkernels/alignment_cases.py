"""Shared checks for the per-operator tests: random ragged inputs with NaN padding, a float64
reference (``hatkernels.reference``, the naive way), and the project's tolerances."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import hatkernels
from hatkernels import hier_align
from hatkernels.reference import naive_hier_align

# Relative Frobenius error of scores and of gradients allowed against the float64 reference,
# by input dtype.
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (1e-2, 2e-2),
}
# A gradient over its tolerance may pass as no worse than the naive way in float32
# (ill-conditioned inputs), but never above this many times the tolerance.
GRAD_ERROR_CAP = 10
SETTINGS = [(d, r) for d in ("t2i", "i2t", "both") for r in ("mean", "sum")]


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors here: torch, the fused cpu one, triton if interpreted."""
    return hatkernels.available_backends("cpu")


def backend_params() -> list:
    names = ["torch", "cpu", "triton"]
    available = cpu_backends()
    params = []
    for name in names:
        marks = []
        if name not in available:
            reasons = hatkernels.dispatch.not_supported_reasons(
                torch.device("cpu"), torch.float32, ()
            )[name]
            marks.append(pytest.mark.skip(reason=f"{name}: {'; '.join(reasons)}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@dataclass
class Case:
    images: list[torch.Tensor]  # float64, NaN in padding
    texts: list[torch.Tensor]
    image_lengths: list[torch.Tensor]
    text_lengths: list[torch.Tensor]


def make_case(
    seed: int,
    n_images: int,
    n_texts: int,
    levels: list[tuple[int, int, int]],
    normalise: bool = True,
) -> Case:
    """Random tokens ``levels = [(M, N, D), ...]``, ragged lengths, NaN written in padding.

    Tokens are L2-normalised when ``normalise`` (except at D = 1, where that would make every
    similarity +-1 and max pooling tie everywhere, and tests must not build ties).
    """
    gen = torch.Generator().manual_seed(seed)
    case = Case([], [], [], [])
    for m, n, d in levels:
        v = torch.randn(n_images, m, d, generator=gen, dtype=torch.float64)
        t = torch.randn(n_texts, n, d, generator=gen, dtype=torch.float64)
        if normalise and d > 1:  # unit vectors in 1-D are +-1: max pooling would tie
            v = v / v.norm(dim=-1, keepdim=True)
            t = t / t.norm(dim=-1, keepdim=True)
        vl = torch.randint(1, m + 1, (n_images,), generator=gen)
        tl = torch.randint(1, n + 1, (n_texts,), generator=gen)
        vl[0], tl[-1] = m, n  # at least one full item each side
        for i in range(n_images):
            v[i, vl[i] :] = float("nan")
        for j in range(n_texts):
            t[j, tl[j] :] = float("nan")
        case.images.append(v)
        case.texts.append(t)
        case.image_lengths.append(vl)
        case.text_lengths.append(tl)
    return case


def min_abs_cosine(case: Case) -> float:
    """The smallest ``|cos(v, t)|`` over every valid image token and word of every level.

    Scan pooling normalises ``b = a / (|a| + eps)``; when a one-entry normalisation holds a
    similarity of a few 1e-4 (so ``|a|`` is within a few hundred ``sqrt(eps)``), ``db/da =
    eps / (|a| + eps)^2`` is of order 1 and float32's own rounding of the similarity (about
    1e-7 of ``|v| |t|``) moves that gradient by percent: no float32 kernel can be held to the
    float64 reference there."""
    smallest = float("inf")
    for v, t, vl, tl in zip(case.images, case.texts, case.image_lengths, case.text_lengths):
        for i in range(v.shape[0]):
            vi = v[i, : int(vl[i])].double()
            for j in range(t.shape[0]):
                tj = t[j, : int(tl[j])].double()
                norms = vi.norm(dim=-1)[:, None] * tj.norm(dim=-1)[None, :]
                cos = (vi @ tj.T).abs() / norms.clamp_min(1e-300)
                smallest = min(smallest, float(cos.min()))
    return smallest


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """``||out - ref|| / max(||ref||, floor)`` (the floor guards gradients that are exactly
    zero in exact arithmetic, e.g. scan pooling at D = 1, where float noise is all there is)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(floor))


def zero_padding(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0)


def padding_fill_runs(case: Case, pooling: str, backend: str, device: str = "cpu") -> list:
    """Scores and gradients of ``case``'s first level (``direction="both"``) with its padding
    filled with NaN, Inf and 1e30 in turn: one (scores, image grad, text grad) per fill."""
    outs = []
    for fill in (float("nan"), float("inf"), 1e30):
        v = case.images[0].float().clone()
        t = case.texts[0].float().clone()
        v[~torch.isfinite(v)] = fill
        t[~torch.isfinite(t)] = fill
        v, t = v.to(device).requires_grad_(True), t.to(device).requires_grad_(True)
        out = hier_align(
            v,
            t,
            image_lengths=case.image_lengths[0].to(device),
            text_lengths=case.text_lengths[0].to(device),
            pooling=pooling,
            direction="both",
            backend=backend,
        )
        outs.append((out, *torch.autograd.grad(out.sum(), (v, t))))
    return outs


def check_against_reference(
    case: Case,
    backend: str,
    dtype: torch.dtype,
    *,
    grads: bool = True,
    weights: list[float] | None = None,
    naive_bar: bool = True,
    **kwargs,
) -> None:
    """Scores and gradients of ``backend`` in ``dtype`` vs the float64 naive reference.

    The reference sees the same (dtype-rounded) inputs, so the error is the kernel's own.
    ``naive_bar=False`` holds gradients to the plain tolerance (no ill-conditioning bar).
    """
    rounded = [x.to(dtype) for x in case.images], [x.to(dtype) for x in case.texts]
    ref_in = [[x.double().requires_grad_(grads) for x in side] for side in rounded]
    test_in = [[x.clone().requires_grad_(grads) for x in side] for side in rounded]
    lengths = dict(image_lengths=case.image_lengths, text_lengths=case.text_lengths)
    ref = naive_hier_align(
        *ref_in, case.image_lengths, case.text_lengths, weights=weights, **kwargs
    )
    out = hier_align(*test_in, **lengths, weights=weights, backend=backend, **kwargs)
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    fwd_tol, grad_tol = TOLERANCE[dtype]
    # A score is a sum of terms up to 1 in size (scan: cosines) or |v| |t| (max); one that
    # cancels to near zero (a random run found a scan score of 2.6e-4 from cosines of 0.2,
    # where the torch backend in float32 was off by 1e-4 of it) is held to 1e-3 per score.
    score_floor = 1e-3 * ref.numel() ** 0.5
    err = rel_err(out, ref, floor=score_floor)
    assert err <= fwd_tol, f"scores: rel err {err:.3g}"
    if not grads:
        return
    cotangent = torch.randn(
        ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    ref_grads = torch.autograd.grad(ref, ref_in[0] + ref_in[1], cotangent)
    out_grads = torch.autograd.grad(out, test_in[0] + test_in[1], cotangent.float())
    padded = [~torch.isfinite(x) for x in rounded[0] + rounded[1]]
    floor = 1e-3 * float(cotangent.norm())
    baseline = None
    for k, (g, gr, pad) in enumerate(zip(out_grads, ref_grads, padded)):
        assert g.dtype == dtype and g.shape == gr.shape
        assert torch.isfinite(g).all(), f"grad {k}: non-finite values"
        assert bool((g[pad] == 0).all()), f"grad {k}: non-zero gradient on padding"
        err = rel_err(g, zero_padding(gr), floor=floor)
        if err > grad_tol:
            # Ill-conditioned inputs (e.g. unnormalised tokens under a sharp softmax) defeat
            # float32 itself: then the bar is 2x the naive way's own float32 error, up to a
            # hard cap.
            assert naive_bar, f"grad {k}: rel err {err:.3g} (tolerance {grad_tol:.0e})"
            cap = GRAD_ERROR_CAP * grad_tol
            assert err <= cap, f"grad {k}: rel err {err:.3g} above the cap {cap:.0e}"
            baseline = baseline or _naive_float32_grads(case, rounded, cotangent, weights, kwargs)
            naive_err = rel_err(baseline[k], zero_padding(gr), floor=floor)
            assert err <= 2 * naive_err, (
                f"grad {k}: rel err {err:.3g} (tolerance {grad_tol:.0e}; naive float32 "
                f"{naive_err:.3g})"
            )


def _naive_float32_grads(case, rounded, cotangent, weights, kwargs):
    inputs = [[x.float().requires_grad_(True) for x in side] for side in rounded]
    out = naive_hier_align(
        *inputs, case.image_lengths, case.text_lengths, weights=weights, **kwargs
    )
    grads = torch.autograd.grad(out, inputs[0] + inputs[1], cotangent.float())
    return [zero_padding(g) for g in grads]


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
