"""Every file that ``--resume``, ``hatmodel.evaluate`` and ``hatmodel.visualize`` read is read
without pickle: a crafted file (a pickle payload that would create a marker file when
unpickled) gets a ``ValueError`` naming the file and runs nothing, even when the manifest's
hashes are forged to match it. Corrupted and foreign checkpoints name the file; a resume with
another config is refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hatmodel import evaluate as evaluate_cli
from hatmodel import train as train_cli
from hatmodel import visualize as visualize_cli
from hatmodel.checkpoint import read_metadata, save_weights
from hatmodel.config import load_config
from hatmodel.models import build_model

OVERRIDES = ["train.epochs=2", "train.threads=1", "train.max_steps_per_epoch=2",
             "data.scenes.val_images=8", "data.scenes.test_images=8"]
EPOCH = "checkpoints/epoch_0001"


class _Payload:
    """Unpickling this creates ``marker`` (as any code in a crafted pickle could)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run") / "run"
    train_cli.train(load_config("hat_tiny", OVERRIDES), run, progress=False)
    torch.set_num_threads(threads)
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture
def payload(tmp_path):
    """(pickle bytes, marker path); the payload is checked to be live."""
    marker = tmp_path / "marker"
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data).close()
    assert marker.exists()
    marker.unlink()
    return data, marker


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _forge(run: Path, name: str, data: bytes) -> Path:
    """Replace ``name`` in the run with ``data`` and rewrite the manifest and the pointer so
    that the hashes match: the parsers, not only the hash check, must refuse it."""
    path = run / name
    path.unlink()  # break the hard links: the other names keep their bytes
    path.write_bytes(data)
    manifest, pointer = run / EPOCH / "manifest.json", run / "checkpoints/latest.json"
    if path.parent == run / EPOCH and path != manifest:
        entries = json.loads(manifest.read_text())
        entries["files"][path.name] = {"bytes": len(data), "sha256": _sha(path)}
        manifest.unlink()
        manifest.write_text(json.dumps(entries))
    if path != pointer:
        entry = json.loads(pointer.read_text())
        entry["manifest_sha256"] = _sha(manifest)
        pointer.write_text(json.dumps(entry))
    return path


def _resume(run: Path) -> dict:
    return train_cli.train(load_config("hat_tiny", OVERRIDES), run, resume=True, progress=False)


@pytest.mark.parametrize("name", ["checkpoints/latest.json", f"{EPOCH}/manifest.json",
                                  f"{EPOCH}/state.json", f"{EPOCH}/state.safetensors",
                                  f"{EPOCH}/last.safetensors", f"{EPOCH}/best.safetensors"])
def test_resume_refuses_a_crafted_file_and_names_it(run, payload, name):
    data, marker = payload
    path = _forge(run, name, data)
    with pytest.raises(ValueError, match=str(path)):
        _resume(run)
    assert not marker.exists()


def test_resume_refuses_a_modified_file_by_its_hash(run):
    path = run / EPOCH / "state.json"
    state = json.loads(path.read_text())
    state["best_rsum"] += 1
    path.unlink()
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"{path} does not match its size and SHA-256"):
        _resume(run)


def test_evaluate_and_visualize_refuse_a_crafted_checkpoint(run, payload):
    data, marker = payload
    best = run / "best.safetensors"
    best.unlink()
    best.write_bytes(data)
    for read in (lambda: evaluate_cli.main([str(run), "--no-progress"]),
                 lambda: visualize_cli.main([str(run), "--out", str(run / "a.png")]),
                 lambda: evaluate_cli.main([str(best), "--no-progress"])):
        with pytest.raises(ValueError, match=f"{best} is not a readable safetensors file"):
            read()
    assert not marker.exists()


def test_corrupted_and_foreign_checkpoints_name_the_file(run, tmp_path):
    best = run / "best.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    cfg = load_config("hat_tiny", ["model.embed_dim=8"])
    other = tmp_path / "other.safetensors"  # a hatmodel checkpoint of another size
    save_weights(other, build_model(cfg, 61), load_config("hat_tiny"), 0)
    bad_config = tmp_path / "bad_config.safetensors"
    save_file({"w": torch.ones(2)}, str(bad_config),
              metadata={"config": json.dumps({"train": {"nonsense": 1}}), "epoch": "0"})
    for path, needle in ((truncated, "is not a readable safetensors file"),
                         (foreign, "is not a hatmodel checkpoint"),
                         (other, "does not fit the model its config builds"),
                         (bad_config, "its config does not fit .*train.nonsense")):
        with pytest.raises(ValueError, match=f"{path}.*{needle}"):
            evaluate_cli.main([str(path), "--no-progress"])
    assert read_metadata(run / "last.safetensors")[1] == 1  # the good file still reads


def test_resume_with_another_config_is_refused_before_anything_is_written(run):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"resume: the config differs .*train\.lr: 0\.001 -> "
                                         r"0\.002"):
        train_cli.train(load_config("hat_tiny", [*OVERRIDES, "train.lr=0.002"]), run,
                        resume=True, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_earlier_pickle_layout_is_never_read(tmp_path, payload):
    data, marker = payload
    (tmp_path / "last_state.pt").write_bytes(data)
    with pytest.raises(ValueError, match="last_state.pt, a pickle file, which is not read"):
        _resume(tmp_path)
    assert not marker.exists()


def test_a_fresh_run_replaces_an_earlier_run(run):
    (run / "checkpoints" / "epoch_0007").mkdir()
    train_cli.train(load_config("hat_tiny", [*OVERRIDES, "train.epochs=1"]), run,
                    progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0000",
                                                                      "latest.json"]
    assert read_metadata(run / "last.safetensors")[1] == 0
    assert "held an earlier run: removed" in (run / "out.log").read_text()


@pytest.mark.parametrize("change", [
    lambda state: state["optimizer"].update(state=[1, 2]),
    lambda state: state["rng"].update(numpy={"__array__": [1], "dtype": "nonsense"}),
    lambda state: state["optimizer"]["state"].update(__items__=[[[1], 2]]),
    lambda state: state["scheduler"].update(__tensor__="missing"),
])
def test_resume_refuses_a_malformed_training_state_and_names_it(run, change):
    path = run / EPOCH / "state.json"
    state = json.loads(path.read_text())
    change(state)
    _forge(run, f"{EPOCH}/state.json", json.dumps(state).encode())
    with pytest.raises(ValueError, match=str(path)):
        _resume(run)
