"""TokenStore: round trips in every dtype, views and splits, and files that are bad or
incomplete (each named in the error, nothing written on bad input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hatkernels import TokenStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tokens(n: int = 11, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    levels = [torch.randn(n, 5, 8, generator=gen), torch.randn(n, 2, 3, generator=gen)]
    lengths = [torch.randint(1, 6, (n,), generator=gen), None]
    return levels, lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids", [None, "str"])
def test_round_trip(tmp_path, dtype: torch.dtype, ids) -> None:
    levels, lengths = tokens()
    names = [f"img_{i}.png" for i in range(11)] if ids == "str" else None
    with TokenStore.writer(tmp_path / "s", [(5, 8), (2, 3)], dtype=dtype, fingerprint="abc",
                           shard_size=4) as w:
        w.add([t[:6] for t in levels], [lengths[0][:6], None], names and names[:6])
        w.add([levels[0][6:, :4], levels[1][6:]], [lengths[0][6:].clamp(max=4), None],
              names and names[6:])
    store = TokenStore.open(tmp_path / "s", fingerprint="abc")
    assert len(store) == 11 and store.dtype == dtype and store.levels == [(5, 8), (2, 3)]
    assert store.ids == (names or list(range(11)))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 3]
    got, got_len = store.read()
    want0 = torch.cat([levels[0][:6], torch.nn.functional.pad(levels[0][6:, :4], (0, 0, 0, 1))])
    assert torch.equal(got[0], want0.to(dtype)) and torch.equal(got[1], levels[1].to(dtype))
    assert got_len[0].tolist() == lengths[0][:6].tolist() + lengths[0][6:].clamp(max=4).tolist()
    assert got_len[1].tolist() == [2] * 11
    view = store[3:9]
    assert len(view) == 6 and view.ids == store.ids[3:9]
    assert torch.equal(view.read()[0][0], got[0][3:9])
    assert [(o, len(lv[0])) for o, lv, _ in view.chunks(3)] == [(0, 1), (1, 3), (4, 1), (5, 1)]
    assert len(store[5:5]) == 0 and store[5:5].read()[0][0].shape == (0, 5, 8)


def test_split_at_shards(tmp_path) -> None:
    levels, lengths = tokens(10)
    store = TokenStore.write(tmp_path / "s", levels, lengths, shard_size=3)  # shards 3,3,3,1
    parts = [store.split(r, 2) for r in range(2)]
    assert [(p.start, p.stop) for p in parts] == [(0, 6), (6, 10)]
    parts = [store.split(r, 5) for r in range(5)]
    assert sum(len(p) for p in parts) == 10 and parts[0].start == 0 and parts[-1].stop == 10
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    with pytest.raises(ValueError, match="^rank: "):
        store.split(2, 2)


def test_bad_input_writes_nothing(tmp_path) -> None:
    levels, lengths = tokens()
    with pytest.raises(TypeError, match="^dtype: "):
        TokenStore.write(tmp_path / "a", levels, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"^levels\[1\]: expected shape \[3, <= 2, 3\]"):
        TokenStore.write(tmp_path / "b", [levels[0][:3], levels[1]])
    with pytest.raises(ValueError, match=r"^lengths\[0\]: values must lie in \[1, 5\]"):
        TokenStore.write(tmp_path / "c", levels, [lengths[0] + 5, None])
    with pytest.raises(TypeError, match="^ids: "):
        TokenStore.write(tmp_path / "d", levels, ids=[1] * 10 + ["x"])
    with pytest.raises(ValueError, match="^shard_size: "):
        TokenStore.write(tmp_path / "e", levels, shard_size=0)
    assert list(tmp_path.iterdir()) == []  # no store, no leftover temporary folder
    TokenStore.write(tmp_path / "s", levels)
    with pytest.raises(ValueError, match="^path: .* already exists"):
        TokenStore.write(tmp_path / "s", levels)
    TokenStore.write(tmp_path / "s", [t[:2] for t in levels], overwrite=True)
    assert len(TokenStore.open(tmp_path / "s")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_bad_files(tmp_path) -> None:
    levels, lengths = tokens()
    TokenStore.write(tmp_path / "s", levels, lengths, fingerprint="model-a", shard_size=4)
    with pytest.raises(ValueError, match="^fingerprint: the store .* model 'model-a'"):
        TokenStore.open(tmp_path / "s", fingerprint="model-b")
    with pytest.raises(ValueError, match="^path: .* is not a token store"):
        TokenStore.open(tmp_path)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="^path: shard .*shard-00001.safetensors is truncated"):
        TokenStore.open(tmp_path / "s")
    shard.unlink()
    with pytest.raises(ValueError, match="^path: shard .*shard-00001.safetensors is missing"):
        TokenStore.open(tmp_path / "s")
    shard.write_bytes(data)
    TokenStore.open(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    good = manifest.read_text()
    for bad in ("{", json.dumps({**json.loads(good), "count": 3}),
                json.dumps({**json.loads(good), "dtype": "int8"}),
                good.replace("shard-00000", "../shard-00000")):
        manifest.write_text(bad)
        with pytest.raises(ValueError, match="^path: "):
            TokenStore.open(tmp_path / "s")


def test_killed_writer_leaves_no_store(tmp_path) -> None:
    """A writer killed between shards leaves only a hidden temporary folder, which does not
    open as a store; the destination does not exist."""
    script = (
        "import os, torch\n"
        "from hatkernels import TokenStore\n"
        f"w = TokenStore.writer({str(tmp_path / 's')!r}, [(2, 4)], shard_size=2)\n"
        "w.add(torch.randn(5, 2, 4))\n"
        "os._exit(9)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 9
    assert not (tmp_path / "s").exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".s.tmp-") and any(leftover.iterdir())
    with pytest.raises(ValueError, match="is not a token store"):
        TokenStore.open(leftover)


def test_exception_in_writer_block_cleans_up(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with TokenStore.writer(tmp_path / "s", [(2, 4)], shard_size=2) as w:
            w.add(torch.randn(5, 2, 4))
            raise RuntimeError("encoder failed")
    assert list(tmp_path.iterdir()) == []
