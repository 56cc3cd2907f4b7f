"""A training run SIGKILLed inside the write of each file of a checkpoint (a child process
running ``python -m hatmodel.train``'s ``main``, the file half written when it dies), then
resumed, ends with the same ``metrics.json``, history and weights as an uninterrupted run.

The kills form one chain in one run folder: each child resumes where the previous one died
and dies at the next point, so every point is covered with one short process each."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hatmodel import train as train_cli

ARGS = ["--config", "hat_tiny", "--no-progress", "train.epochs=2", "train.threads=1",
        "train.max_steps_per_epoch=2", "data.scenes.val_images=8", "data.scenes.test_images=8"]

# Run in one helper process: it imports everything once (no torch computation, so forking
# is safe), then forks one child per kill point, each running hatmodel.train's main. In the
# child, hatmodel.checkpoint.write_file, through which every file of a run folder is written,
# kills the process (SIGKILL: no cleanup runs) in the middle of the nth write of the named
# file, after half of its bytes reached the temporary file; a hard link (best / last published
# from an epoch folder) is created in one step, so it is not truncated. After each child the
# helper prints its exit status and the committed epoch, as one JSON line.
DRIVER = r"""
import json, os, signal, sys
from pathlib import Path
import timm, transformers.models.bert.modeling_bert
from hatmodel import checkpoint, train

chain, args = json.loads(sys.argv[1]), sys.argv[2:]
real_write_file = checkpoint.write_file

def run(target, nth, resume):
    seen = 0

    def write_file(path, write):
        nonlocal seen
        if Path(path).name != target:
            return real_write_file(path, write)
        seen += 1
        if seen != nth:
            return real_write_file(path, write)

        def half_then_die(tmp):
            write(tmp)
            if os.stat(tmp).st_nlink == 1:
                with open(tmp, "r+b") as f:
                    f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        return real_write_file(path, half_then_die)

    checkpoint.write_file = write_file
    train.main(args + (["--resume"] if resume else []))

run_dir = Path(args[args.index("--output-dir") + 1])
for i, (target, nth) in enumerate(chain):
    pid = os.fork()
    if pid == 0:
        try:
            run(target, nth, i > 0)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    pointer = run_dir / "checkpoints" / "latest.json"
    print(json.dumps({
        "target": target, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "committed": json.loads(pointer.read_text())["epoch"] if pointer.is_file() else None,
        "tmp": sorted(p.name for p in run_dir.rglob("*.tmp")),
    }), flush=True)
"""

# (file whose write is killed, which write of it in that process, epoch committed after it)
CHAIN = [
    ("config.yaml", 1, None),        # the first thing a run writes
    ("last.safetensors", 1, None),   # epoch 0's weights: nothing committed yet
    ("best.safetensors", 1, None),   # epoch 0's best (a link inside its folder)
    ("latest.json", 1, None),        # the commit point of epoch 0 itself
    ("best.safetensors", 2, 0),      # after the commit: publishing best.safetensors
    ("state.safetensors", 1, 0),     # epoch 1's optimizer tensors
    ("state.json", 1, 0),            # epoch 1's training state
    ("manifest.json", 1, 0),         # epoch 1's manifest
    ("last.safetensors", 2, 1),      # after epoch 1's commit: publishing last.safetensors
    ("history.json", 1, 1),          # history.json, rewritten from the committed state
    ("curves.png", 1, 1),            # the training curves
    ("metrics.json", 1, 1),          # the final test's output
]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_sigkill_in_every_checkpoint_write_then_resume_ends_like_an_uninterrupted_run(
        tmp_path):
    whole = train_cli.main([*ARGS, "--output-dir", str(tmp_path / "whole")])
    run = tmp_path / "killed"
    chain = json.dumps([[target, nth] for target, nth, _ in CHAIN])
    driver = subprocess.run([sys.executable, "-c", DRIVER, chain, *ARGS, "--output-dir", str(run)],
                            capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    steps = [json.loads(line) for line in driver.stdout.splitlines() if line.startswith("{")]
    assert [s["target"] for s in steps] == [c[0] for c in CHAIN], driver.stderr[-3000:]
    for step, (_, _, committed) in zip(steps, CHAIN):
        assert step["signal"] == signal.SIGKILL, step
        assert step["committed"] == committed, step
    # The half-written weights of epoch 0 stay behind until the next run tidies up.
    assert any(name.startswith(".last.safetensors.") for name in steps[1]["tmp"])
    resumed = train_cli.main([*ARGS, "--output-dir", str(run), "--resume"])

    assert resumed == whole
    for name in ("metrics.json", "history.json"):
        a, b = (json.loads((folder / name).read_text()) for folder in (tmp_path / "whole", run))
        if name == "history.json":  # wall-clock times differ; everything else is exact
            a, b = ([{k: v for k, v in r.items() if k != "elapsed_s"} for r in h] for h in (a, b))
        assert a == b, name
    for name in ("last.safetensors", "best.safetensors"):
        a, b = (load_file(str(folder / name)) for folder in (tmp_path / "whole", run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = (run / "out.log").read_text()
    assert "no complete checkpoint yet: starting from the beginning" in log
    assert "resumed after epoch 0" in log and "resumed after epoch 1" in log
    # Nothing of the killed writers is left: no temporary file, one epoch folder.
    assert not list(run.rglob("*.tmp"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0001",
                                                                      "latest.json"]
