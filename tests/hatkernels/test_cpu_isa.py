"""Instruction-set levels of the compiled CPU kernels (csrc/cpu/isa.h).

The kernels are compiled for the x86-64 baseline ("scalar"), AVX2 and AVX-512, and the best
level the CPU supports runs unless ``HATKERNELS_CPU_ISA`` names one. Every level the machine
supports must pass the float64 reference checks; a bad value must raise a ValueError naming
the variable; and no code outside the AVX2 / AVX-512 levels may use AVX instructions (else
the extension could die with SIGILL on an older CPU).
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import Counter

import pytest
import torch

from alignment_cases import check_against_reference, cpu_backends, make_case
from hatkernels import hier_align, info

pytestmark = pytest.mark.skipif(
    "cpu" not in cpu_backends(), reason="hatkernels._C_cpu is not built"
)

LEVELS = ["scalar", "avx2", "avx512"]
ENV = "HATKERNELS_CPU_ISA"


def _ext():
    from hatkernels import _C_cpu

    return _C_cpu


def _require(level: str) -> None:
    if level not in _ext().supported_cpu_isas():
        pytest.skip(f"this CPU cannot run {level} (it runs {_ext().supported_cpu_isas()})")


def test_default_is_the_best_supported_level(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    supported = _ext().supported_cpu_isas()
    assert supported[0] == "scalar" and set(supported) <= set(LEVELS)
    assert supported == [level for level in LEVELS if level in supported]
    assert _ext().cpu_isa() == supported[-1]
    monkeypatch.setenv(ENV, "auto")
    assert _ext().cpu_isa() == supported[-1]


@pytest.mark.parametrize("pooling", ["max", "scan"])
@pytest.mark.parametrize("level", LEVELS)
def test_each_level_matches_the_reference(monkeypatch, level, pooling):
    _require(level)
    monkeypatch.setenv(ENV, level)
    assert _ext().cpu_isa() == level
    # Several tiles each way, odd D (partial vectors and register blocks), two levels.
    case = make_case(23, 13, 45, [(49, 32, 37), (5, 7, 3)])
    for direction, reduce in (("t2i", "mean"), ("i2t", "sum"), ("both", "mean")):
        check_against_reference(case, "cpu", torch.float32, pooling=pooling,
                                direction=direction, reduce=reduce, weights=[1.0, 0.5])


def test_levels_run_different_code(monkeypatch):
    """The override really switches code: FMA levels round differently from the baseline."""
    supported = _ext().supported_cpu_isas()
    if len(supported) < 2:
        pytest.skip("this CPU runs only the baseline level")
    case = make_case(29, 6, 9, [(20, 12, 40)], normalise=False)
    args = (case.images[0].float(), case.texts[0].float())
    kw = dict(image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0],
              pooling="scan", direction="both", backend="cpu")
    outs = {}
    for level in supported:
        monkeypatch.setenv(ENV, level)
        outs[level] = hier_align(*args, **kw)
    assert not torch.equal(outs["scalar"], outs[supported[-1]])


@pytest.mark.parametrize("value", ["avx9", "AVX2", "native", " scalar"])
def test_unknown_level_raises(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"^{ENV}: expected one of auto, scalar, avx2, avx512"):
        _ext().cpu_isa()
    case = make_case(1, 2, 3, [(4, 5, 6)])
    with pytest.raises(ValueError, match=f"^{ENV}"):
        hier_align(case.images[0].float(), case.texts[0].float(),
                   image_lengths=case.image_lengths[0], text_lengths=case.text_lengths[0],
                   pooling="max", backend="cpu")


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_unsupported_level_raises(monkeypatch, level):
    if level in _ext().supported_cpu_isas():
        pytest.skip(f"this CPU runs {level}; the refusal needs a CPU without it")
    monkeypatch.setenv(ENV, level)
    with pytest.raises(ValueError, match=f"^{ENV}: '{level}' is not supported by this CPU"):
        _ext().cpu_isa()


def test_info_reports_the_level_and_the_settings(monkeypatch):
    monkeypatch.setenv(ENV, "scalar")
    monkeypatch.setenv("HATKERNELS_BACKEND", "cpu")
    text = info.report()
    assert "cpu kernels: instruction set scalar (this CPU supports: scalar" in text
    assert f"  {ENV}=scalar" in text and "  HATKERNELS_BACKEND=cpu" in text
    monkeypatch.setenv(ENV, "avx9")
    assert f"cpu kernels: error: {ENV}: expected one of" in info.report()


def test_only_the_avx_levels_use_avx_instructions():
    """Disassemble the extension: every function that touches ymm/zmm/mask registers or uses a
    VEX/EVEX (v-prefixed) instruction must belong to the avx2 or avx512 level. Anything else
    (the baseline kernels, the dispatch, the bindings, library code the kernels instantiate)
    must run on any x86-64 CPU."""
    if shutil.which("objdump") is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs objdump on x86-64")
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _ext().__file__],
                          capture_output=True, text=True, check=True).stdout
    users, func = Counter(), None
    for line in dump.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            func = head.group(1)
        elif "\t" in line:
            ins = line.split("\t", 1)[1].strip()
            if re.search(r"%[yz]mm|%k[0-7]\b", ins) or re.match(r"v[a-z0-9]+\s", ins):
                users[func] += 1
    levels = Counter("avx512" if "::avx512::" in f else "avx2" if "::avx2::" in f else f
                     for f in users)
    assert levels["avx512"] > 0 and levels["avx2"] > 0, "no level code found to audit"
    others = sorted(f for f in levels if f not in ("avx2", "avx512"))
    assert not others, f"AVX instructions outside the AVX levels: {others[:5]}"
