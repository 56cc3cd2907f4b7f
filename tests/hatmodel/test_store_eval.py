"""Evaluation through token stores: the same score matrix as in memory (bit for bit when the
captions fit in one chunk), bounded chunks otherwise, and 2 gloo ranks (spawned here) equal
to one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from hatmodel.config import load_config
from hatmodel.data import build_dataset, build_tokenizer
from hatmodel.evaluate import evaluate_model
from hatmodel.models import build_model
from hatmodel.store_eval import score_with_store, wants_store

CPU = torch.device("cpu")
SMALL_BUDGET = 4 * 100 * 30  # rows of 30 captions: several row blocks and caption chunks


def tiny():
    torch.manual_seed(0)
    cfg = load_config("hat_tiny")
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer.vocab_size).eval()
    return model, build_dataset(cfg, "test"), tokenizer


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny()
    torch.set_num_threads(threads)


def test_store_equals_memory(setup, tmp_path) -> None:
    model, data, tok = setup
    want_metrics, want = evaluate_model(model, data, tok, CPU, batch_size=8, progress=False)
    metrics, sims = evaluate_model(model, data, tok, CPU, batch_size=8, progress=False,
                                   store=tmp_path / "s")
    assert torch.equal(sims, want) and metrics == want_metrics
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["images.0", "texts.0"]
    sims = score_with_store(model, data, tok, CPU, folder=tmp_path / "t", batch_size=8,
                            shard_size=3, progress=False)  # many shards, one chunk
    assert torch.equal(sims, want)
    with pytest.raises(ValueError, match="^eval.store: .* is not empty"):
        evaluate_model(model, data, tok, CPU, store=tmp_path / "t", progress=False)


def test_chunked_and_automatic(setup, tmp_path) -> None:
    model, data, tok = setup
    _, want = evaluate_model(model, data, tok, CPU, batch_size=8, progress=False)
    sims = score_with_store(model, data, tok, CPU, batch_size=8, memory_budget=SMALL_BUDGET,
                            progress=False)
    torch.testing.assert_close(sims, want, rtol=1e-5, atol=1e-6)
    assert not wants_store(model, tok, 100, 1 << 30, CPU)
    assert wants_store(model, tok, 100, 1000, CPU)
    # Past the budget, evaluate_model goes through a temporary store (and removes it).
    _, auto = evaluate_model(model, data, tok, CPU, batch_size=8, progress=False,
                             memory_budget=SMALL_BUDGET)
    assert torch.equal(auto, sims)


def worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=2)
    try:
        model, data, tok = tiny()
        sims = score_with_store(model, data, tok, CPU, folder=f"{folder}/store", batch_size=6,
                                memory_budget=SMALL_BUDGET, progress=False,
                                group=dist.group.WORLD)
        save_file({"sims": sims}, f"{folder}/rank{rank}.safetensors")
        dist.barrier()  # no rank tears down while another finishes the last collective
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(setup, tmp_path) -> None:
    model, data, tok = setup
    want = score_with_store(model, data, tok, CPU, batch_size=6, memory_budget=SMALL_BUDGET,
                            progress=False)
    mp.start_processes(worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "images.0", "images.1", "texts.0", "texts.1"]
    for rank in range(2):
        assert torch.equal(load_file(str(tmp_path / f"rank{rank}.safetensors"))["sims"], want)
