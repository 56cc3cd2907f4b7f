"""Max pooling (max_align, t2i mean, workloads W1 and W2): rates, ratios and peak memory; the
peers (where installed) on W1 and the sweep; the cpu backend with and without its int8
screening on near-tied image tokens."""

from harness import align_benchmarks, bench_timing
from workloads import MAX_T2I, TINY_NEAR_TIE, W1_NEAR_TIE

test_max_align_w1, test_max_align_w2_memory, test_max_align_sweep = align_benchmarks(MAX_T2I)


def test_max_align_near_tie(benchmark, bench):
    """W1's sizes, every image's tokens near-duplicates: the screened kernel cannot exclude
    a token and falls back; its time against the float32 kernel's, same rounds."""
    bench_timing(benchmark, bench, MAX_T2I, W1_NEAR_TIE if bench.full else TINY_NEAR_TIE,
                 "fwd", only=["cpu", "cpu-fp32"])
