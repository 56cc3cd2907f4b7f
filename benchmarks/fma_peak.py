"""The machine's float32 FMA peak, timed as a contender in the same rounds as the kernels.

On a shared virtual machine the cores a process gets swing by 3x within an hour, so a
kernel's fraction of the peak is only meaningful when the peak is measured beside it. The
probe is a small C loop compiled on the fly with the system C compiler (no build step of the
package): every thread of the torch thread pool runs 12 independent chains of 512-bit FMAs
(256-bit with AVX2 where AVX-512 is missing), enough to cover the FMA latency on every core.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define STORE _mm512_storeu_ps
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define STORE _mm256_storeu_ps
#endif

typedef struct { long iters; float sink; } job;

static void *chains(void *arg) {
    job *j = (job *)arg;
    vec x = SET1(0.9999999f), y = SET1(1e-7f);
    vec a0 = SET1(0.f), a1 = SET1(1.f), a2 = SET1(2.f), a3 = SET1(3.f), a4 = SET1(4.f),
        a5 = SET1(5.f), a6 = SET1(6.f), a7 = SET1(7.f), a8 = SET1(8.f), a9 = SET1(9.f),
        a10 = SET1(10.f), a11 = SET1(11.f);
    for (long i = 0; i < j->iters; ++i) {
        a0 = FMA(a0, x, y); a1 = FMA(a1, x, y); a2 = FMA(a2, x, y); a3 = FMA(a3, x, y);
        a4 = FMA(a4, x, y); a5 = FMA(a5, x, y); a6 = FMA(a6, x, y); a7 = FMA(a7, x, y);
        a8 = FMA(a8, x, y); a9 = FMA(a9, x, y); a10 = FMA(a10, x, y); a11 = FMA(a11, x, y);
    }
    vec s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));
    s = ADD(s, ADD(ADD(a8, a9), ADD(a10, a11)));
    float out[LANES];
    STORE(out, s);
    j->sink = out[0];
    return 0;
}

/* FLOPs of one iteration of one thread. */
long flops_per_iter(void) { return 12L * LANES * 2; }

/* Runs `iters` iterations on each of `threads` threads (at most 256); returns 0 on success. */
int run(int threads, long iters) {
    pthread_t t[256];
    job jobs[256];
    if (threads < 1 || threads > 256) return -1;
    for (int k = 0; k < threads; ++k) {
        jobs[k].iters = iters;
        if (pthread_create(&t[k], 0, chains, &jobs[k])) return -1;
    }
    for (int k = 0; k < threads; ++k) pthread_join(t[k], 0);
    return 0;
}
"""


def _compile() -> ctypes.CDLL:
    """Build the probe for this machine's ISA (``-march=native``) once per source version."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    tag = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    lib = Path(tempfile.gettempdir()) / f"hatkernels_fma_peak_{os.getuid()}_{tag}.so"
    if not lib.exists():
        src, tmp = (lib.with_suffix(f".{os.getpid()}{ext}") for ext in (".c", ".so"))
        src.write_text(SOURCE)
        proc = subprocess.run([cc, "-O2", "-march=native", "-shared", "-fPIC", "-pthread",
                               str(src), "-o", str(tmp)], capture_output=True, text=True)
        src.unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the FMA probe failed: {proc.stderr[-500:]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.run.argtypes = [ctypes.c_int, ctypes.c_long]
    dll.flops_per_iter.restype = ctypes.c_long
    return dll


def fma_fn(iters: int) -> tuple[Callable[[], None], int]:
    """A call running ``iters`` iterations of the FMA chains on each of
    ``torch.get_num_threads()`` threads, and its FLOPs.
    Raises ``RuntimeError`` when the probe cannot be built here (no C compiler, no AVX2)."""
    dll = _compile()
    threads = torch.get_num_threads()

    def run() -> None:
        if dll.run(threads, iters) != 0:
            raise RuntimeError("FMA probe: could not start its threads")

    return run, threads * iters * dll.flops_per_iter()
