"""Scan pooling (scan_align, i2t mean, lambda 9, workloads W1 and W2): rates, ratios and peak
memory; W1's forward in the other two directions; HAT's three levels at D = 768 (W6): time
per pair and the time to score Flickr30K's test split."""

import pytest
from harness import align_benchmarks, bench_timing
from workloads import SCAN_I2T, TINY, TINY_HAT, W1, W6, Case

test_scan_align_w1, test_scan_align_w2_memory, test_scan_align_sweep = align_benchmarks(SCAN_I2T)


@pytest.mark.parametrize("direction", ["t2i", "both"])
def test_scan_align_w1_directions(benchmark, bench, direction):
    """W1's forward for t2i and both: the cpu backend beside the GEMM and the FMA peak."""
    bench_timing(benchmark, bench, Case("scan", direction), W1 if bench.full else TINY, "fwd",
                 only=["cpu"])


def test_scan_align_w6_hat(benchmark, bench):
    """One ``hier_align`` call over three levels (784 / 196 / 49 image tokens, D = 768)."""
    bench_timing(benchmark, bench, SCAN_I2T, W6 if bench.full else TINY_HAT, "fwd",
                 rounds=min(3, bench.rounds))
