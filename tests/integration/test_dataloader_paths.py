"""The dataloader path: file read-ahead, torch datasets through the agent, tar shards,
tensors in the KV cache."""

from __future__ import annotations

import io
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import chainfs.usrbio as usrbio
from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import CHUNK, module_cluster, pattern
from tests.integration.usrbio_fixtures import AgentProcess

pytestmark = pytest.mark.timeout(300)

torch = pytest.importorskip("torch")

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "dataloader")


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> FileSystem:
    return cluster.client()


# -- read-ahead ---------------------------------------------------------------------
def test_sequential_reads_through_read_ahead_match_and_release_the_budget(
    fs: FileSystem,
) -> None:
    data = pattern(6 * CHUNK + 777, "ra")
    with fs.open("/ra", "wb") as f:
        f.write(data)
    io_engine = fs._afs.io
    rng = random.Random(3)
    with fs.open("/ra", "rb") as f:
        got = bytearray()
        while True:  # mixed sizes, small and several chunks long, all sequential
            part = f.read(rng.choice([1000, 64 * 1024, MiB + 3, 3 * CHUNK]))
            if not part:
                break
            got += part
            held = io_engine.read_ahead_held_bytes
            assert held <= fs.config.read_ahead_bytes
        assert bytes(got) == data
        # A jump drops what was read ahead and reads the right bytes.
        f.seek(CHUNK + 5)
        assert f.read(100) == data[CHUNK + 5 : CHUNK + 105]
        f.seek(17)
        buf = bytearray(2 * CHUNK)
        assert f.readinto(buf) == 2 * CHUNK and bytes(buf) == data[17 : 17 + 2 * CHUNK]
        assert f.read(2 * CHUNK) == data[17 + 2 * CHUNK : 17 + 4 * CHUNK]
        assert io_engine.read_ahead_held_bytes > 0  # chunks in flight ahead of the reader
    assert io_engine.read_ahead_held_bytes == 0  # close returns it all


# -- torch datasets through the agent ---------------------------------------------------
def test_datasets_read_through_the_agent_and_fall_back_without_one(
    cluster: LocalCluster, fs: FileSystem, tmp_path: Path
) -> None:
    from chainfs.client.torch import ChainfsDataset, ChainfsIterableDataset

    files = {f"/ds/{i}": pattern(100_000 + i * 7919, f"ds{i}") for i in range(12)}
    fs.mkdir("/ds", exist_ok=True)
    for p, d in files.items():
        with fs.open(p, "wb") as f:
            f.write(d)
    records: list[Any] = [*files, ("/ds/3", 10, 5000)]
    expected = [*files.values(), files["/ds/3"][10:5010]]
    agent = AgentProcess(cluster.address, tmp_path, workers=2).start()
    try:
        # A buffer smaller than the batch: several rounds, and one record through the client.
        ds = ChainfsDataset(fs, records, agent_socket=agent.socket, agent_buffer_bytes=200_000)
        assert ds.__getitems__(list(range(len(records)))) == expected
        with usrbio.connect(agent.socket) as probe:
            assert probe.stats()["bytes_read"] > 0  # the agent did read them
        it = ChainfsIterableDataset(fs, records, agent_socket=agent.socket, fetch_batch=5)
        assert list(it) == expected
    finally:
        agent.stop()
    missing = ChainfsDataset(fs, records, agent_socket=str(tmp_path / "no-agent.sock"))
    assert missing[0] == expected[0]  # no agent there: the client reads it


# -- tar shards ---------------------------------------------------------------------------
def _write_shards(fs: FileSystem) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    fs.mkdir("/shards", exist_ok=True)
    samples: dict[str, dict[str, bytes]] = {}
    shards = []
    for s in range(6):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            for j in range(7 + s):
                key = f"train/{s:02d}{j:03d}"
                sample = {"txt": pattern(50 + j, key), "cls": str(j).encode(), "x.npy": b"n" * j}
                samples[key] = sample
                for ext, payload in sample.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        path = f"/shards/shard-{s:04d}.tar"
        with fs.open(path, "wb") as f:
            f.write(raw.getvalue())
        shards.append(path)
    return shards, samples


def test_tar_shards_yield_every_sample_once_across_2_ranks_x_2_workers(
    cluster: LocalCluster, fs: FileSystem
) -> None:
    from torch.utils.data import DataLoader

    from chainfs.client.torch import ChainfsTarDataset

    shards, samples = _write_shards(fs)
    seen: Counter[str] = Counter()
    for rank in range(2):
        ds = ChainfsTarDataset(
            cluster.address, shards, shuffle=True, seed=5, rank=rank, world_size=2
        )
        loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
        for key, sample in loader:
            seen[key] += 1
            assert sample == samples[key], key
    assert seen == Counter(samples.keys())  # each exactly once


# -- tensors in the KV cache ---------------------------------------------------------------
def test_torch_tensor_round_trip_through_the_kv_cache(fs: FileSystem, tmp_path: Path) -> None:
    cache = fs.kvcache("/kv-tensors")
    value = torch.randn(3, 1000, 700).to(torch.bfloat16)  # about 4 MiB, no numpy dtype
    assert cache.put("layer0", value)
    out = torch.empty_like(value)
    assert cache.get_into("layer0", out) == value.numel() * value.element_size()
    assert torch.equal(out, value)
    as_numpy = value.view(torch.int16).numpy().copy()
    assert cache.put("layer1", as_numpy)
    (n,) = cache.batch_get_into(["layer1"], [out])
    assert n == as_numpy.nbytes and torch.equal(out, value)
    with pytest.raises(TypeError, match="contiguous"):
        cache.put("bad", value.transpose(1, 2))
    with pytest.raises(TypeError, match="contiguous"):
        cache.get_into("layer0", out.transpose(1, 2))
    assert cache.get("bad") is None  # nothing stored by the refused put
    cache.close()


def test_kv_cache_get_into_a_registered_shared_buffer(
    cluster: LocalCluster, fs: FileSystem, tmp_path: Path
) -> None:
    agent = AgentProcess(cluster.address, tmp_path, workers=1).start()
    try:
        with usrbio.connect(agent.socket) as client:
            buf = client.register_buffer(2 * MiB)
            cache = fs.kvcache("/kv-shm")
            value = pattern(MiB + 3, "shm")
            cache.put("k", value)
            assert cache.get_into("k", buf) == len(value)
            assert bytes(buf.view[: len(value)]) == value
            cache.close()
    finally:
        agent.stop()
