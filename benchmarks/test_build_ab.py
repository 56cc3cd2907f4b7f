"""benchmarks/build_ab.py: its cases are checked before any worker starts, and a run of one
build against itself reports the same checksum for both and a ratio of 1 for the first."""

from __future__ import annotations

import os
import subprocess
import sys

import build_ab
import pytest

from hatkernels import available_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("case", ["max-t2i", "dot-t2i-fwd", "max-up-fwd", "scan-i2t-bwd",
                                  "max-t2i-fwd-x"])
def test_bad_cases_raise(case):
    with pytest.raises(ValueError, match="--cases"):
        build_ab.parse_case(case)


def test_good_cases():
    assert build_ab.parse_case("scan-both-fwdbwd") == ("scan", "both", "fwdbwd")
    assert build_ab.parse_case("max-i2t-bwd") == ("max", "i2t", "bwd")


@pytest.mark.skipif("cpu" not in available_backends(), reason="hatkernels._C_cpu is not built")
def test_one_build_against_itself():
    out = subprocess.run([sys.executable, build_ab.__file__, "--rounds", "1", "--cases",
                          "max-t2i-fwd", ROOT, ROOT], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| max-t2i-fwd")]
    assert len(rows) == 2
    assert rows[0][4].strip().startswith("1.000")
    assert rows[0][5] == rows[1][5]
