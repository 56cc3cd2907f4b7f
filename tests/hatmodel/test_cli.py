"""Every hatmodel command ends bad input with one line naming what is wrong and exit status 2,
not a traceback, and writes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("train", ["train.epochs=abc"], "train.epochs: expected an integer"),
    ("evaluate", ["{tmp}/no-such-run"], "no file at"),
    ("visualize", ["{tmp}/no-such-run"], "no file at"),
    ("index", ["{tmp}/no-such-run", "--out", "{tmp}/index", "--split", "test", "--side",
               "images"], "no file at"),
    ("search", ["{tmp}/no-such-index", "--checkpoint", "{tmp}/run", "--text", "a"], "no file at"),
]


@pytest.mark.parametrize("command,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, command, args, expected):
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "out"
    extra = ["--output-dir", str(out)] if command == "train" else []
    proc = subprocess.run([sys.executable, "-m", f"hatmodel.{command}", *args, *extra],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"python -m hatmodel.{command}: error:")
    assert expected in proc.stderr
    assert not out.exists() and not (tmp_path / "index").exists()
