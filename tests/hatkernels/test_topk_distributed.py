"""hier_topk sharded over 2 gloo ranks (processes spawned here; fork after OpenMP can hang)
returns, on every rank, exactly what one process returns on the whole gallery."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from hatkernels import TokenStore, hier_topk

CHUNK = 8
SCORING = [dict(pooling="max", direction="t2i"), dict(pooling="scan", direction="i2t")]


def inputs():
    gen = torch.Generator().manual_seed(5)
    images = torch.nn.functional.normalize(torch.randn(45, 4, 8, generator=gen), dim=-1)
    images = torch.cat([images, images[:6]])  # ties across the ranks' slices
    texts = torch.nn.functional.normalize(torch.randn(7, 6, 8, generator=gen), dim=-1)
    il = torch.randint(1, 5, (51,), generator=gen)
    tl = torch.randint(1, 7, (7,), generator=gen)
    return images, texts, il, tl


def searches(images, texts, il, tl, cut: tuple[int, int], store: TokenStore, group=None):
    """Every search of the test, on the gallery items ``cut`` (and the store view)."""
    a, b = cut
    out = {}
    for n, kw in enumerate(SCORING):
        for k in (1, 10):
            r = hier_topk(images[a:b], texts, k, image_lengths=il[a:b], text_lengths=tl,
                          chunk=CHUNK, group=group, **kw)
            out[f"t2i{n}k{k}.v"], out[f"t2i{n}k{k}.i"] = r
        r = hier_topk(texts, images[a:b], 4, query="images", image_lengths=tl,
                      text_lengths=il[a:b], chunk=CHUNK, group=group, **kw)
        out[f"i2t{n}.v"], out[f"i2t{n}.i"] = r
        r = hier_topk(store, texts, 6, text_lengths=tl, chunk=CHUNK, group=group, **kw)
        out[f"store{n}.v"], out[f"store{n}.i"] = r
    return out


def worker(rank: int, world: int, folder: str, cuts: list[tuple[int, int]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        store = TokenStore.open(f"{folder}/store")
        out = searches(*inputs(), cuts[rank], store.split(rank, world), group=dist.group.WORLD)
        save_file(out, f"{folder}/rank{rank}.safetensors")
        dist.barrier()  # no rank tears down while another finishes the last collective
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cuts", [[(0, 24), (24, 51)], [(0, 51), (51, 51)]],
                         ids=["split", "empty-rank"])
def test_two_gloo_ranks_equal_one_process(tmp_path, cuts) -> None:
    images, texts, il, tl = inputs()
    store = TokenStore.write(tmp_path / "store", images, il, dtype=torch.float32, shard_size=16)
    want = searches(images, texts, il, tl, (0, 51), store)
    mp.start_processes(worker, args=(2, str(tmp_path), cuts), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (rank, key)
