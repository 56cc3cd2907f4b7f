"""Two builds of the cpu extension side by side on W1 (256 images x 49 tokens, 1,280 captions of
8-32 words, D = 256): forward and forward + backward times of one build's kernels, called
directly, best of ``REPEATS``.

Run it once per build and round, alternating builds, and compare medians over rounds::

    python benchmarks/build_ab.py PACKAGE_DIR max,scan [REPEATS]

``PACKAGE_DIR`` is a folder holding a built ``hatkernels`` package (a checkout built in place).
Prints one JSON line: per op, ``fwd`` and ``fwdbwd`` seconds and their ratio.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    import torch

    from hatkernels import _C_cpu as ext

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(256, 49, 256, generator=g)
    v /= v.norm(dim=-1, keepdim=True)
    t = torch.randn(1280, 32, 256, generator=g)
    t /= t.norm(dim=-1, keepdim=True)
    vl = torch.full((256,), 49)
    tl = torch.randint(8, 33, (1280,), generator=g)
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    grad = torch.randn(256, 1280, generator=g)
    res = {}
    for op in sys.argv[2].split(","):
        if op == "max":
            args = (v, t, vl, tl, 0, True)
            fwd, bwd = ext.max_align_forward, ext.max_align_backward
        else:
            args = (v, t, vl, tl, 1, True, 9.0)
            fwd, bwd = ext.scan_align_forward, ext.scan_align_backward
        fwd(*args)
        bwd(grad, *args)
        tf, tfb = [], []
        for _ in range(repeats):
            s = time.perf_counter()
            fwd(*args)
            tf.append(time.perf_counter() - s)
            s = time.perf_counter()
            fwd(*args)
            bwd(grad, *args)
            tfb.append(time.perf_counter() - s)
        res[op] = dict(fwd=min(tf), fwdbwd=min(tfb), ratio=min(tfb) / min(tf))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
