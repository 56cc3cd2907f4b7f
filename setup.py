"""Build the optional compiled parts of hatkernels.

Two extensions, each skipped cleanly when it cannot be built (the package then runs on its
other backends and `python -m hatkernels.info` says why):

- ``hatkernels._C_cpu``: fused C++ CPU kernels (OpenMP), ``csrc/cpu`` + ``csrc/bindings/cpu.cpp``;
  portable: the kernels are built for the x86-64 baseline, AVX2 and AVX-512, and the level is
  chosen at run time (``HATKERNELS_CPU_ISA`` forces one).
- ``hatkernels._C_cuda``: CUDA kernels, ``csrc/cuda`` + ``csrc/bindings/cuda.cpp``; built when the
  torch it builds against has CUDA and ``nvcc`` is found.

Environment variables: ``HATKERNELS_SKIP_CPU_BUILD=1``, ``HATKERNELS_SKIP_CUDA_BUILD=1``,
``HATKERNELS_CUDA_ARCHS`` (e.g. ``"80;90"``; else ``TORCH_CUDA_ARCH_LIST``; default sm_80 and
sm_90), ``MAX_JOBS``, ``NVCC_THREADS``, ``DEBUG=1`` (no optimisation, debug symbols).

Build with ``pip install --no-build-isolation -e .`` so the extensions compile against the
torch that runs them.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(*patterns: str) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(ROOT, pattern)))
    return [os.path.relpath(p, ROOT) for p in found]


def _cuda_home() -> str | None:
    """CUDA_HOME, defaulting to /usr/local/cuda (torch guesses /usr/local from an nvcc wrapper)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(nvcc)) if nvcc else None


def _cuda_arch_flags() -> list[str]:
    archs = os.environ.get("HATKERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    archs = archs or "80;90"
    flags = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip().replace(".", "").replace("+PTX", "")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _extensions():
    cuda_home = _cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "hatkernels: torch not importable at build time; no compiled backends", file=sys.stderr
        )
        return [], {}

    debug = _flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -march: the CPU kernels are compiled once per instruction-set level (csrc/cpu/isa.h)
    # and the best one the running CPU supports is picked at run time, so the extension
    # runs on any CPU of the target architecture.
    cxx = [*opt, "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    extensions = []
    if not _flag("HATKERNELS_SKIP_CPU_BUILD"):
        sources = _sources("csrc/cpu/*.cpp", "csrc/bindings/cpu.cpp")
        extensions.append(
            CppExtension(
                "hatkernels._C_cpu",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
            )
        )

    want_cuda = not _flag("HATKERNELS_SKIP_CUDA_BUILD")
    if want_cuda and torch.version.cuda is None:
        print("hatkernels: torch has no CUDA; skipping the CUDA extension", file=sys.stderr)
    elif want_cuda and (cuda_home is None or shutil.which("nvcc") is None):
        print("hatkernels: nvcc not found; skipping the CUDA extension", file=sys.stderr)
    elif want_cuda and _sources("csrc/cuda/*.cu"):
        include_dirs = [os.path.join(ROOT, "csrc")]
        # ATen's CUDA headers reach cusparse.h, which ships with torch's pip dependencies.
        include_dirs += glob.glob(
            os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")
        )
        nvcc = [
            *opt,
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            *_cuda_arch_flags(),
            f"--threads={os.environ.get('NVCC_THREADS', '2')}",
        ]
        extensions.append(
            CUDAExtension(
                "hatkernels._C_cuda",
                _sources("csrc/cuda/*.cu", "csrc/bindings/cuda.cpp"),
                include_dirs=include_dirs,
                extra_compile_args={"cxx": [*opt, "-std=c++20"], "nvcc": nvcc},
            )
        )
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
