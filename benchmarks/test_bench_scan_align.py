"""Scan pooling (scan_align, i2t mean, lambda 9, workloads W1 and W2): rates, ratios and peak
memory."""

from harness import align_benchmarks
from workloads import SCAN_I2T

test_scan_align_w1, test_scan_align_w2_memory, test_scan_align_sweep = align_benchmarks(SCAN_I2T)
