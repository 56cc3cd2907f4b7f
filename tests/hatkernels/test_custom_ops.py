"""The custom ops: opcheck (schema, fake, autograd registration) and torch.compile without
graph breaks, forward and backward."""

from __future__ import annotations

import pytest
import torch

from alignment_cases import backend_params, make_case
from hatkernels import hier_align
from hatkernels.ops import max_align, scan_align


def _args(seed=0):
    case = make_case(seed, 3, 4, [(5, 6, 8)])
    v = case.images[0].float().requires_grad_(True)
    t = case.texts[0].float().requires_grad_(True)
    return v, t, case.image_lengths[0], case.text_lengths[0]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_opcheck(backend, direction):
    v, t, vl, tl = _args()
    budget = 1 << 30
    torch.library.opcheck(max_align, (v, t, vl, tl, direction, "mean", backend, budget))
    torch.library.opcheck(scan_align, (v, t, vl, tl, direction, "sum", 9.0, backend, budget))


@pytest.mark.parametrize("pooling", ["max", "scan"])
def test_compile_fullgraph_forward_and_backward(pooling):
    torch._dynamo.reset()
    v, t, vl, tl = _args(1)

    def loss(v, t):
        s = hier_align(
            [v, v[:, :3]],
            [t, t[:, :4]],
            image_lengths=[vl, vl.clamp(max=3)],
            text_lengths=[tl, tl.clamp(max=4)],
            pooling=pooling,
            direction="i2t",
        )
        return s.diagonal().sum() - s.logsumexp(1).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(v, t)
    grads = torch.autograd.grad(out, (v, t))
    eager = loss(v, t)
    eager_grads = torch.autograd.grad(eager, (v, t))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
