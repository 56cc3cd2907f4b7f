"""Max pooling (max_align, t2i mean, workloads W1 and W2): rates, ratios and peak memory."""

import pytest
from harness import bench_memory, bench_timing
from workloads import MAX_T2I, SWEEP, TINY, TINY_MEMORY, W1, W2


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_max_align_w1(benchmark, bench, mode):
    bench_timing(benchmark, bench, MAX_T2I, W1 if bench.full else TINY, mode)


def test_max_align_w2_memory(bench):
    bench_memory(bench, MAX_T2I, W2 if bench.full else TINY_MEMORY)


@pytest.mark.parametrize("workload", SWEEP, ids=lambda w: w.name.replace(" ", "_"))
def test_max_align_sweep(benchmark, bench, workload):
    if not bench.full:
        pytest.skip("the shape sweep runs with --benchmark")
    bench_timing(benchmark, bench, MAX_T2I, workload, "fwd", rounds=min(3, bench.rounds))
