"""The cpu backend is deterministic: the same inputs give bit-identical scores and gradients
from run to run with two OpenMP threads, whatever order the threads finish their tiles in.

The shapes give several tiles both ways (max: ~400 image tokens x ~384 words per tile; scan:
~256 x ~512), so gradient rows of one image or caption collect contributions from many tiles.
Scan pooling is also identical across thread counts (its contributions are added in a fixed
order per block); max pooling's backward cuts its work into chunks per thread, so it is
identical for a given thread count only.
"""

from __future__ import annotations

import pytest
import torch

from alignment_cases import cpu_backends, make_case
from hatkernels import hier_align

pytestmark = pytest.mark.skipif(
    "cpu" not in cpu_backends(), reason="hatkernels._C_cpu is not built"
)

REPEATS = 4


def _case(pooling: str):
    # ~1,000 image tokens x ~1,300 words; raw Gaussian tokens give sharp, uneven attention.
    n_images, n_texts, dim = (21, 80, 24) if pooling == "max" else (21, 80, 16)
    return make_case(31, n_images, n_texts, [(49, 32, dim)], normalise=pooling == "max")


def _run(case, pooling: str, direction: str, threads: int, memory_budget: int = 1 << 30):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        v = case.images[0].float().requires_grad_(True)
        t = case.texts[0].float().requires_grad_(True)
        out = hier_align(v, t, image_lengths=case.image_lengths[0],
                         text_lengths=case.text_lengths[0], pooling=pooling,
                         direction=direction, reduce="mean", backend="cpu",
                         memory_budget=memory_budget)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        return (out.detach(), *torch.autograd.grad(out, (v, t), cot))
    finally:
        torch.set_num_threads(previous)


def _assert_identical(first, other, what: str):
    for name, a, b in zip(("scores", "grad images", "grad texts"), first, other):
        assert torch.equal(a, b), f"{what}: {name} differ (max |diff| {(a - b).abs().max()})"


# Max pooling's backward scatters from the forward's saved winners when they fit the memory
# budget, else recomputes the similarities: both ways.
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("pooling,budget", [("max", 1 << 30), ("max", 1), ("scan", 1 << 30)],
                         ids=["max-winners", "max-recompute", "scan"])
def test_repeated_calls_are_bit_identical_with_two_threads(pooling, budget, direction):
    case = _case(pooling)
    first = _run(case, pooling, direction, 2, budget)
    assert first[1].abs().sum() > 0 and first[2].abs().sum() > 0
    for k in range(REPEATS):
        _assert_identical(first, _run(case, pooling, direction, 2, budget), f"repeat {k + 1}")


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_scan_is_identical_across_thread_counts(direction):
    case = _case("scan")
    _assert_identical(_run(case, "scan", direction, 1), _run(case, "scan", direction, 2),
                      "1 vs 2 threads")
