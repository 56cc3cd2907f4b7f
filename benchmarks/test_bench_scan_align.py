"""Scan pooling (scan_align, i2t mean, lambda 9, workloads W1 and W2): rates, ratios and peak
memory."""

import pytest
from harness import bench_memory, bench_timing
from workloads import SCAN_I2T, SWEEP, TINY, TINY_MEMORY, W1, W2


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_scan_align_w1(benchmark, bench, mode):
    bench_timing(benchmark, bench, SCAN_I2T, W1 if bench.full else TINY, mode)


def test_scan_align_w2_memory(bench):
    bench_memory(bench, SCAN_I2T, W2 if bench.full else TINY_MEMORY)


@pytest.mark.parametrize("workload", SWEEP, ids=lambda w: w.name.replace(" ", "_"))
def test_scan_align_sweep(benchmark, bench, workload):
    if not bench.full:
        pytest.skip("the shape sweep runs with --benchmark")
    bench_timing(benchmark, bench, SCAN_I2T, workload, "fwd", rounds=min(3, bench.rounds))
