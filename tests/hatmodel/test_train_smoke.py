"""Training end to end on the tiny config: steps lower the loss, a run writes its artefacts,
checkpoints round-trip through ``hatmodel.evaluate``, and a killed run resumes exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hatmodel import evaluate as evaluate_cli
from hatmodel import train as train_cli
from hatmodel.checkpoint import load_for_eval, read_metadata
from hatmodel.config import load_config
from hatmodel.data import build_dataset, build_tokenizer, epoch_pairs, train_loader
from hatmodel.evaluate import METRIC_KEYS
from hatmodel.losses import build_loss
from hatmodel.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = load_config("hat_tiny")
    data, tok = build_dataset(cfg, "train"), build_tokenizer(cfg)
    model = build_model(cfg, tok.vocab_size).eval()  # no dropout: a clean descent
    batch = next(iter(train_loader(data, tok, epoch_pairs(64, 5, "images", 0, 0), 16)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss(cfg)
    losses = []
    for _ in range(12):
        loss = loss_fn(model(batch.images, batch.input_ids, batch.attention_mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_hinge_recipe_trains_too():
    torch.manual_seed(0)
    cfg = load_config("hat_tiny", ["loss.name=hinge", "loss.hardest_negative=false"])
    data, tok = build_dataset(cfg, "train"), build_tokenizer(cfg)
    model = build_model(cfg, tok.vocab_size).eval()  # no dropout: a clean descent
    batch = next(iter(train_loader(data, tok, epoch_pairs(64, 5, "images", 0, 0), 16)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss(cfg)
    first = None
    for _ in range(12):
        loss = loss_fn(model(batch.images, batch.input_ids, batch.attention_mask))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_cli_run_writes_everything_and_evaluate_reproduces_it(tmp_path):
    out = tmp_path / "run"
    metrics = train_cli.main(["--config", "hat_tiny", "--output-dir", str(out), "--no-progress",
                              "--seed", "1"])
    for name in ("out.log", "config.yaml", "history.json", "curves.png", "metrics.json",
                 "best.safetensors", "last.safetensors", "checkpoints/latest.json",
                 "checkpoints/epoch_0001/state.json", "checkpoints/epoch_0001/manifest.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001",
                                                                      "latest.json"]
    assert (out / "last.safetensors").samefile(out / "checkpoints/epoch_0001/last.safetensors")
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == set(METRIC_KEYS) and saved == pytest.approx(metrics)
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    assert all({"loss", "val_rsum", "spread"} <= set(r) for r in history)
    log = (out / "out.log").read_text()
    assert "epoch 1:" in log and "val" in log and "test" in log
    cfg, epoch = read_metadata(out / "last.safetensors")
    assert cfg["seed"] == 1 and epoch == 1

    # Round trip: the stored config rebuilds the model and the weights load strictly.
    model, cfg2, _ = load_for_eval(out)
    assert cfg2["model"] == cfg["model"]
    weights = load_file(str(out / "best.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    again = evaluate_cli.main([str(out), "--no-progress", "--out", str(tmp_path / "m.json")])
    assert again == pytest.approx(metrics)
    assert not list(out.rglob("*.tmp"))


class Killed(Exception):
    pass


def test_resume_after_a_kill_ends_exactly_like_an_uninterrupted_run(tmp_path):
    overrides = ["train.epochs=3", "train.warmup_steps=2", "train.schedule=step",
                 "train.lr_step_epochs=1", "train.lr_gamma=0.5", "train.freeze_encoders_epochs=1"]
    cfg = load_config("hat_tiny", overrides)
    whole = train_cli.train(cfg, tmp_path / "whole", progress=False)

    def kill(epoch, record):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_cli.train(cfg, tmp_path / "split", progress=False, on_epoch_end=kill)
    resumed = train_cli.main(["--config", "hat_tiny", "--output-dir", str(tmp_path / "split"),
                              "--resume", "--no-progress", *overrides])
    assert resumed == whole
    a = load_file(str(tmp_path / "whole" / "last.safetensors"))
    b = load_file(str(tmp_path / "split" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "whole" / "history.json").read_text())
    hb = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert ha[0]["frozen"] and not ha[1]["frozen"]


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path):
    """A run killed during its first epoch has nothing to resume: --resume (as torchrun's
    restarts pass it) trains from the start, says so, and ends like a fresh run."""
    cfg = load_config("hat_tiny", ["train.epochs=1"])
    fresh = train_cli.train(cfg, tmp_path / "fresh", progress=False)
    (tmp_path / "killed" / "checkpoints" / "epoch_0000").mkdir(parents=True)  # half-written
    (tmp_path / "killed" / ".last.safetensors.123.tmp").write_bytes(b"")
    resumed = train_cli.train(cfg, tmp_path / "killed", resume=True, progress=False)
    assert resumed == fresh
    assert "no complete checkpoint yet: starting from the beginning" in \
        (tmp_path / "killed" / "out.log").read_text()
    assert not list((tmp_path / "killed").rglob("*.tmp"))


@pytest.mark.parametrize("backend,pooling,threads",
                         [("torch", "scan", 1), ("cpu", "scan", 2), ("cpu", "max", 2)])
def test_same_inputs_give_bit_identical_runs(tmp_path, backend, pooling, threads):
    """Nothing in the pipeline (data order, dropout, the loss, checkpoints) adds
    nondeterminism: two runs of one config end with the same weights, bit for bit (the cpu
    backend on two threads, where its kernels split the work)."""
    from hatkernels import available_backends

    if backend not in available_backends():
        pytest.skip(f"the {backend} backend is not built here")
    cfg = load_config("hat_tiny", [
        "train.epochs=1", f"train.threads={threads}", "train.max_steps_per_epoch=2",
        "data.scenes.val_images=8", "data.scenes.test_images=8",
        f"model.align.backend={backend}", f"model.align.pooling={pooling}"])
    metrics = [train_cli.train(cfg, tmp_path / str(i), progress=False) for i in range(2)]
    assert metrics[0] == metrics[1]
    a, b = (load_file(str(tmp_path / str(i) / "last.safetensors")) for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
