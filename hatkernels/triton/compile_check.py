"""Compile every Triton kernel for an NVIDIA target ahead of time, with no GPU present.

Triton's interpreter (how CI runs the kernels) accepts code that the real compiler rejects
(plain Python globals, some type mixes), so this builds each kernel to a cubin with the
``ptxas`` that ships with Triton, for every config that autotuning may pick and for each
input dtype. It needs ``TRITON_INTERPRET`` unset (the kernels must be JIT functions)::

    python -m hatkernels.triton.compile_check            # sm_90 (H100/H200)
    python -m hatkernels.triton.compile_check --arch 80 --first-config-only
"""

from __future__ import annotations

import argparse
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import max_align, scan_align, scan_backward
from .common import SCAN_CONFIGS, interpreting, items_per_tile

_INDEX = "*i32"
# Bytes of shared memory per block on sm_80 / sm_90 (opt-in maximum).
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _compile(kernel, types: dict[str, str], constants: dict, config: triton.Config,
             arch: int) -> int:
    """Shared memory (bytes) of ``kernel`` compiled with ``types`` for its runtime arguments."""
    fn = _jit(kernel)
    constants = {**constants, **config.kwargs}
    signature = {name: "constexpr" if name in constants else types[name]
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={k: v for k, v in constants.items()
                                                  if k in fn.arg_names})
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.metadata.shared


def _cases(dtype: str):
    """(kernel, argument types, constexprs, configs) for every kernel of the backend."""
    x = "*" + dtype
    precision = "ieee"
    gram_precision = "ieee" if dtype == "fp32" else "tf32"
    query = dict(q_rows_ptr=_INDEX, q_seg_ptr=_INDEX, q_len_ptr=_INDEX, n_q="i32")
    key = dict(k_rows_ptr=_INDEX, k_seg_ptr=_INDEX, k_off_ptr=_INDEX, k_item_base="i32",
               k_items="i32")
    sizes = dict(D="i32", KEY_SIZE="i32", QUERY_SIZE="i32")
    for winners in (False, True):
        types = dict(query, **key, **sizes, q_ptr=x, q_min_len="i32", k_ptr=x,
                     items_per_group="i32", out_ptr=_INDEX if winners else "*fp32",
                     stride_ok="i32", stride_oq="i32", win_ptr=_INDEX)
        yield max_align._max_kernel, types, dict(
            IS_MEAN=True, WINNERS=winners, PRECISION=precision,
            BLOCK_CQ=lambda c: items_per_tile(c.kwargs["BLOCK_Q"], 8), GROUP=8,
        ), max_align._FWD_CONFIGS
    grads = dict(query, **key, **sizes, grad_ptr="*fp32", stride_gk="i32", stride_gq="i32",
                 win_ptr=_INDEX)
    constants = dict(IS_MEAN=True, PRECISION=precision)
    yield max_align._grad_query_kernel, dict(grads, dq_ptr="*fp32", k_ptr=x), constants, \
        max_align._GRAD_CONFIGS
    yield max_align._grad_key_kernel, dict(grads, dk_ptr="*fp32", q_ptr=x), constants, \
        max_align._GRAD_CONFIGS

    shape = dict(Bt="i32", M="i32", N="i32", D="i32", lam="fp32")
    scan = dict(IS_MEAN=True, PRECISION=precision, GRAM_PRECISION=gram_precision, NP=32,
                BT=lambda c: max(1, c.kwargs["BLOCK_W"] // 32))
    for single in (True, False):
        types = dict(shape, Bi="i32", v_ptr=x, v_len_ptr=_INDEX, v_norm_ptr="*fp32", t_ptr=x,
                     t_len_ptr=_INDEX, gram_ptr="*fp32", out_ptr="*fp32")
        yield scan_align._scan_i2t_kernel, types, dict(scan, SINGLE=single, ACCUMULATE=False,
                                                       GROUP=8), SCAN_CONFIGS
        types = dict(shape, Bi="i32", v_ptr=x, v_len_ptr=_INDEX, t_ptr=x, t_len_ptr=_INDEX,
                     t_norm_ptr="*fp32", out_ptr="*fp32")
        yield scan_align._scan_t2i_kernel, types, dict(scan, SINGLE=single, ACCUMULATE=True,
                                                       GROUP=8), SCAN_CONFIGS
        types = dict(shape, v_ptr=x, v_len_ptr=_INDEX, v_norm_ptr="*fp32", t_ptr=x,
                     t_len_ptr=_INDEX, gram_ptr="*fp32", grad_ptr="*fp32", ds_ptr="*fp32",
                     dvn_ptr="*fp32", dgram_ptr="*fp32", image_base="i32", n_images="i32",
                     images_per_group="i32")
        yield scan_backward._scan_i2t_backward_kernel, types, dict(scan, SINGLE=single), \
            SCAN_CONFIGS
    types = dict(shape, v_ptr=x, v_len_ptr=_INDEX, t_ptr=x, t_len_ptr=_INDEX,
                 t_norm_ptr="*fp32", grad_ptr="*fp32", ds_ptr="*fp32", dtn_ptr="*fp32",
                 dgram_ptr="*fp32", image_base="i32", blocks_per_group="i32")
    yield scan_backward._scan_t2i_backward_kernel, types, dict(scan, R=64), \
        scan_backward._T2I_CONFIGS


def check(arch: int, dtypes: list[str], first_config_only: bool) -> list[str]:
    """Compile everything; returns one line per failure (empty: all compiled and fit)."""
    failures = []
    limit = _SHARED_LIMIT.get(arch, 101376)
    for dtype in dtypes:
        for kernel, types, constants, configs in _cases(dtype):
            for config in configs[:1] if first_config_only else configs:
                fixed = {k: (v(config) if callable(v) else v) for k, v in constants.items()}
                name = f"{_jit(kernel).__name__} {dtype} {config}"
                start = time.perf_counter()
                try:
                    shared = _compile(kernel, types, fixed, config, arch)
                except Exception as exc:  # noqa: BLE001 - reported, not hidden
                    failures.append(f"{name}: {type(exc).__name__}: {str(exc)[-400:]}")
                    continue
                status = "ok" if shared <= limit else f"shared memory {shared} > {limit}"
                if shared > limit:
                    failures.append(f"{name}: {status}")
                print(f"{name}: {status} ({shared} B, {time.perf_counter() - start:.1f} s)",
                      flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--first-config-only", action="store_true",
                        help="one autotune config per kernel (fast)")
    args = parser.parse_args(argv)
    if interpreting():
        print("compile_check: unset TRITON_INTERPRET (kernels must be JIT functions)",
              file=sys.stderr)
        return 2
    failures = check(args.arch, args.dtypes.split(","), args.first_config_only)
    for line in failures:
        print("FAILED", line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
