"""Training over two processes (gloo on the CPU, started with the ``spawn`` method) against one
process on the same global batches, and the failure modes of a run over several processes.

- In float64 the two-process gradient of a batch is the one-process gradient (InfoNCE and the
  hardest-negative hinge), and whole runs (frozen then unfrozen encoders, clipping, schedule)
  agree to float64 rounding: nothing is lost or counted twice in the split.
- In float32 per-step losses agree within 1e-5 and final weights within 1e-4 (relative) while
  the encoders are frozen. With training encoders Adam's first steps turn the rounding of
  near-zero gradients into steps of about the learning rate, and later steps of this tiny
  from-scratch model grow any rounding difference tenfold per step, whichever way the batch
  is split (one process encoding its batch in two halves drifts from itself as much): that
  phase is compared in float64.
- A two-process run killed after its first epoch and resumed ends bit-identical to one run
  straight through (dropout on: every rank reseeds its generators per epoch).
- A batch that does not split, different configs per rank, and a rank that dies are errors.
"""

import contextlib
import json
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from hatmodel import distributed
from hatmodel import train as train_cli
from hatmodel.config import load_config
from hatmodel.data import SceneDataset, build_dataset, build_tokenizer, epoch_pairs, train_loader
from hatmodel.losses import build_loss
from hatmodel.models import Tokens, build_model
from hatmodel.runtime import seed_everything

# Dropout and stochastic depth off: one process and two draw different random masks.
EXACT = ["train.threads=1", "model.text.config.hidden_dropout_prob=0.0",
         "model.text.config.attention_probs_dropout_prob=0.0",
         "model.image.kwargs.drop_path_rate=0.0"]
HINGE = ["loss.name=hinge", "loss.hardest_negative=true"]
# Two epochs of two steps of 16 pairs: encoders frozen in both, or in the first only.
FROZEN = ["train.epochs=2", "train.max_steps_per_epoch=2", "train.freeze_encoders_epochs=2"]
UNFROZEN = ["train.epochs=2", "train.max_steps_per_epoch=2", "train.freeze_encoders_epochs=1"]
RUNS = {  # name: (overrides, float64)
    "infonce": (EXACT + FROZEN, False),
    "hinge": (EXACT + FROZEN + HINGE, False),
    "infonce64": (EXACT + UNFROZEN, True),
    "hinge64": (EXACT + UNFROZEN + HINGE, True),
}
RESUMED = ["train.threads=1"] + UNFROZEN + ["train.schedule=step", "train.lr_step_epochs=1",
                                            "train.lr_gamma=0.5"]


@contextlib.contextmanager
def _precision(float64: bool):
    """Models built and images served in float64 inside (the scores and the loss stay
    float32, as the training step casts them)."""
    if not float64:
        yield
        return
    image, dtype = SceneDataset.image, torch.get_default_dtype()
    SceneDataset.image = lambda self, i, train=False: image(self, i, train).double()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        SceneDataset.image = image
        torch.set_default_dtype(dtype)


class Killed(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _recording(step):
    """``step`` (a ``train_step``) that also records every step's loss in the returned list."""
    losses: list[float] = []

    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        losses.append(out[0])
        return out

    return recording, losses


def _check_gathers(ctx: distributed.Context) -> None:
    """Captions of different lengths per rank gather into the padded batch, with lengths, and
    gradients come back summed over the ranks to the rank that owns the rows."""
    r = ctx.rank
    level = torch.full((2, 3 + r, 4), float(r + 1), requires_grad=True)
    got = distributed.gather_tokens(Tokens([level], [None]), ctx)
    want = torch.zeros(4, 4, 4)
    want[:2, :3], want[2:] = 1.0, 2.0
    assert torch.equal(got.levels[0], want)
    assert got.lengths[0].tolist() == [3, 3, 4, 4]
    (got.levels[0] * (r + 1)).sum().backward()  # rank 0 weighs by 1, rank 1 by 2
    assert torch.equal(level.grad, torch.full_like(level, 3.0))


def _float64_gradients(overrides: list[str], ctx: distributed.Context) -> dict[str, torch.Tensor]:
    """Loss, scores and parameter gradients of the first global batch, all in float64 (where
    one process and several may differ only by float64 rounding)."""
    cfg = load_config("hat_tiny", EXACT + overrides)
    seed_everything(0)
    with _precision(True):
        tokenizer, data = build_tokenizer(cfg), build_dataset(cfg, "train")
        model = build_model(cfg, tokenizer.vocab_size)
        pairs = distributed.shard_batches(epoch_pairs(64, 5, "images", 0, 0)[:16], 16, ctx)
        batch = next(iter(train_loader(data, tokenizer, pairs, 16 // ctx.world_size)))
    scores, index = distributed.batch_scores(model, batch, ctx)
    loss = build_loss(cfg)(scores, index[:, None] == index[None, :])
    loss.backward()
    distributed.average_gradients(model, ctx)
    return {"loss": loss.detach()[None], "scores": scores.detach(),
            **{k: p.grad for k, p in model.named_parameters()}}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """Every two-process scenario in one start of the two interpreters (each costs seconds);
    the last one kills rank 1. Exit codes: 0 done, 1 a failure (its traceback in a file),
    3 rank 1 killed on purpose, 4 rank 0 ended by the error the death caused."""
    _join(rank, world, port)
    root = Path(folder)
    try:
        _scenarios(rank, root)
    except BaseException:
        (root / f"rank{rank}.failure").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _scenarios(rank: int, root: Path) -> None:
    ctx, _ = distributed.setup(load_config("hat_tiny"), torch.device("cpu"))
    assert (ctx.rank, ctx.world_size) == (rank, 2)
    _check_gathers(ctx)

    with pytest.raises(ValueError, match="^train.batch_size: the global batch"):
        train_cli.train(load_config("hat_tiny", ["train.batch_size=15"]), root / "odd")
    with pytest.raises(ValueError, match="^config: rank 1 runs another config"):
        train_cli.train(load_config("hat_tiny", [f"seed={rank}"]), root / "mixed")
    assert not (root / "odd").exists() and not (root / "mixed").exists()  # nothing written

    for name, overrides in (("infonce", []), ("hinge", HINGE)):
        grads = _float64_gradients(overrides, ctx)
        if rank == 0:
            save_file(grads, str(root / f"{name}.gradients.safetensors"))

    train_cli.train_step, losses = _recording(train_cli.train_step)
    for name, (overrides, float64) in RUNS.items():
        losses.clear()
        with _precision(float64):
            metrics = train_cli.train(load_config("hat_tiny", overrides), root / name,
                                      progress=False)
        (root / f"{name}.rank{rank}.json").write_text(json.dumps([losses, metrics]))

    cfg = load_config("hat_tiny", RESUMED)
    train_cli.train(cfg, root / "whole", progress=False)

    def kill(epoch, record):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        train_cli.train(cfg, root / "split", progress=False, on_epoch_end=kill)
    train_cli.train(cfg, root / "split", resume=True, progress=False)

    step = train_cli.train_step

    def die_at_third_step(*args, **kwargs):
        die_at_third_step.calls += 1
        if rank == 1 and die_at_third_step.calls == 3:
            (root / "death").write_text(str(time.time()))
            os._exit(3)
        return step(*args, **kwargs)

    die_at_third_step.calls = 0
    train_cli.train_step = die_at_third_step
    try:
        train_cli.train(load_config("hat_tiny", ["train.threads=1"]), root / "dying",
                        progress=False)
    except Exception as error:  # the survivor says what ended it, and when
        (root / "survivor").write_text(json.dumps([time.time(), f"{type(error).__name__}: "
                                                                f"{error}"]))
        os._exit(4)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The run folder of :func:`_worker`, started on two ranks as torchrun would."""
    root = tmp_path_factory.mktemp("ddp")
    spawn = mp.get_context("spawn")
    port = _free_port()
    ranks = [spawn.Process(target=_worker, args=(r, 2, port, str(root))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    hung = [r for r, p in enumerate(ranks) if p.is_alive()]
    for p in ranks:
        p.kill()
    failures = [f.read_text() for f in sorted(root.glob("*.failure"))]
    assert not failures, "\n".join(failures)
    assert not hung, f"rank(s) {hung} hung"
    assert [p.exitcode for p in ranks] == [4, 3]
    return root


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_like_one(two_ranks, tmp_path, one_thread, monkeypatch, name):
    overrides, float64 = RUNS[name]
    step, losses = _recording(train_cli.train_step)
    monkeypatch.setattr(train_cli, "train_step", step)
    with _precision(float64):
        train_cli.train(load_config("hat_tiny", overrides), tmp_path, progress=False)
    (two, metrics), (two_1, metrics_1) = (
        json.loads((two_ranks / f"{name}.rank{r}.json").read_text()) for r in (0, 1))
    assert len(losses) == len(two) == 4
    assert two_1 == two and metrics_1 == metrics  # every rank has the global batch's loss
    assert two == pytest.approx(losses, rel=1e-5)
    a = load_file(str(tmp_path / "last.safetensors"))
    b = load_file(str(two_ranks / name / "last.safetensors"))
    assert a.keys() == b.keys()
    errors = {k: _relative(a[k], b[k]) for k in a if a[k].is_floating_point()}
    # Attention key biases have an exact gradient of 0 (a softmax ignores a shift): Adam
    # turns the rounding noise of their gradient into full steps in any run.
    worst = max((e, k) for k, e in errors.items() if not k.endswith("key.bias"))
    assert worst[0] < (1e-9 if float64 else 1e-4), worst
    assert sorted(p.name for p in (two_ranks / name).iterdir()) == sorted(
        p.name for p in tmp_path.iterdir())
    log = (two_ranks / name / "out.log").read_text()
    assert "2 processes: each encodes 8 of the 16 pairs" in log and "test (" in log


@pytest.mark.parametrize("name, overrides", [("infonce", []), ("hinge", HINGE)])
def test_two_processes_compute_the_one_process_gradient(two_ranks, one_thread, name, overrides):
    one = _float64_gradients(overrides, distributed.SINGLE)
    two = load_file(str(two_ranks / f"{name}.gradients.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], rtol=1e-10, atol=1e-14), key


def test_two_processes_resume_exactly(two_ranks):
    a = load_file(str(two_ranks / "whole" / "last.safetensors"))
    b = load_file(str(two_ranks / "split" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((two_ranks / "whole" / "history.json").read_text())
    hb = json.loads((two_ranks / "split" / "history.json").read_text())
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb] and len(ha) == 2
    assert "resumed after epoch 0" in (two_ranks / "split" / "out.log").read_text()


def test_a_dead_rank_ends_the_other_with_an_error(two_ranks):
    died = float((two_ranks / "death").read_text())
    ended, message = json.loads((two_ranks / "survivor").read_text())
    # The default timeout is 30 minutes: rank 0 learnt of the death from the closed connection.
    assert ended - died < 60, (ended - died, message)
    assert message


def test_one_process_needs_no_process_group(tmp_path, one_thread):
    assert not dist.is_initialized()
    ctx, device = distributed.setup(load_config("hat_tiny"), torch.device("cpu"))
    assert ctx is distributed.SINGLE and not ctx.active and device == torch.device("cpu")
    pairs = torch.arange(12).view(6, 2)
    assert distributed.shard_batches(pairs, 3, ctx) is pairs


def test_shard_batches_takes_each_rank_s_rows_of_every_global_batch():
    pairs = torch.arange(16).view(8, 2)  # two global batches of 4
    rank1 = distributed.Context(rank=1, world_size=2)
    assert distributed.shard_batches(pairs, 4, rank1).tolist() == [[4, 5], [6, 7],
                                                                    [12, 13], [14, 15]]
    with pytest.raises(ValueError, match="^train.batch_size"):
        distributed.shard_batches(pairs[:6], 4, rank1)
