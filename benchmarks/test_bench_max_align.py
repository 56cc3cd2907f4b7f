"""Max pooling (max_align, t2i mean, workloads W1 and W2): rates, ratios and peak memory."""

from harness import align_benchmarks
from workloads import MAX_T2I

test_max_align_w1, test_max_align_w2_memory, test_max_align_sweep = align_benchmarks(MAX_T2I)
