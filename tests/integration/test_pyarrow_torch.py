"""pyarrow (Parquet, partitioned datasets) and PyTorch (datasets, checkpoints) on chainfs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

import chainfs
from chainfs.client.fsspec_adapter import ChainFileSystem
from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster
from tests.conftest import require
from tests.integration.client_fixtures import module_cluster, pattern

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "client-adapters")


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> FileSystem:
    return cluster.client()


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        require("torch", False, "the CPU build of torch (deploy/bootstrap.sh installs it)")
    return torch


# -- pyarrow ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def arrow_fs(cluster: LocalCluster) -> Any:
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(ChainFileSystem(address=cluster.address)))


def _table(rows: int) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "year": pa.array([2020 + i % 4 for i in range(rows)], pa.int32()),
            "name": pa.array([f"row-{i}" for i in range(rows)]),
            "blob": pa.array([pattern(64, str(i)) for i in range(rows)], pa.binary()),
            "x": pa.array([i * 0.5 for i in range(rows)], pa.float64()),
        }
    )


def test_parquet_write_read(arrow_fs: Any, fs: FileSystem) -> None:
    import pyarrow.parquet as pq

    table = _table(50_000)
    arrow_fs.create_dir("/arrow")
    pq.write_table(table, "/arrow/t.parquet", filesystem=arrow_fs, row_group_size=10_000)
    assert fs.stat("/arrow/t.parquet").st_size > 0
    back = pq.read_table("/arrow/t.parquet", filesystem=arrow_fs)
    assert back.equals(table)
    # Column projection and row-group reads use ranged reads of the file.
    meta = pq.ParquetFile(arrow_fs.open_input_file("/arrow/t.parquet")).metadata
    assert meta.num_row_groups == 5 and meta.num_rows == 50_000
    only = pq.read_table("/arrow/t.parquet", filesystem=arrow_fs, columns=["id", "x"])
    assert only.equals(table.select(["id", "x"]))


def test_partitioned_dataset_write_read(arrow_fs: Any, fs: FileSystem) -> None:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = _table(20_000)
    ds.write_dataset(
        table,
        "/arrow/ds",
        filesystem=arrow_fs,
        format="parquet",
        partitioning=ds.partitioning(table.select(["year"]).schema, flavor="hive"),
    )
    assert sorted(fs.listdir("/arrow/ds")) == [f"year={y}" for y in range(2020, 2024)]
    dataset = ds.dataset("/arrow/ds", filesystem=arrow_fs, format="parquet", partitioning="hive")
    back = dataset.to_table().sort_by("id")
    assert back.select(["id", "name", "blob", "x"]).equals(
        table.select(["id", "name", "blob", "x"])
    )
    assert back.column("year").to_pylist() == table.column("year").to_pylist()
    filtered = dataset.to_table(filter=pc.field("year") == 2021)
    assert filtered.num_rows == 5_000
    assert set(filtered.column("id").to_pylist()) == {i for i in range(20_000) if i % 4 == 1}


# -- PyTorch ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(fs: FileSystem) -> dict[str, Any]:
    """A shard file of fixed-size records plus a few small whole files."""
    record = 100_000
    count = 60
    shard = pattern(record * count, "shard")
    fs.mkdir("/torch/files", parents=True, exist_ok=True)
    fs.write_file("/torch/shard.bin", shard)
    files = {}
    for i in range(8):
        data = pattern(1000 + i * 37, f"file{i}")
        fs.write_file(f"/torch/files/{i}.bin", data)
        files[f"/torch/files/{i}.bin"] = data
    records = [("/torch/shard.bin", i * record, record) for i in range(count)]
    return {"records": records, "shard": shard, "files": files, "record": record}


def _want(samples: dict[str, Any], rec: Any) -> bytes:
    if isinstance(rec, str):
        return bytes(samples["files"][rec])
    _, off, n = rec
    return bytes(samples["shard"][off : off + n])


def test_map_dataset_with_dataloader(cluster: LocalCluster, samples: dict[str, Any]) -> None:
    torch = _torch()
    from torch.utils.data import DataLoader

    from chainfs.client.torch import ChainfsDataset

    records = samples["records"]

    def to_tensor(b: Any) -> Any:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)

    ds = ChainfsDataset(cluster.address, records, transform=to_tensor)
    assert len(ds) == len(records)
    loader = DataLoader(ds, batch_size=8, shuffle=False)
    seen = []
    for batch in loader:
        assert batch.shape[1] == samples["record"]
        seen.extend(bytes(row.numpy()) for row in batch)
    assert seen == [_want(samples, r) for r in records]
    # Whole files as records, in worker processes (each opens its own connection).
    fds = ChainfsDataset(cluster.address, list(samples["files"]))
    loader = DataLoader(
        fds, batch_size=3, num_workers=2, collate_fn=list, multiprocessing_context="spawn"
    )
    got = [x for batch in loader for x in batch]
    assert got == [_want(samples, p) for p in samples["files"]]


def test_iterable_dataset_shards_without_duplicates(
    cluster: LocalCluster, samples: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _torch()
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from chainfs.client import torch as ctorch

    records = samples["records"]
    want = {_want(samples, r) for r in records}
    assert len(want) == len(records)

    # Every (rank, worker) reader of 3 ranks x 2 workers, with the worker info a
    # DataLoader worker would see: together they read each record exactly once.
    world, workers = 3, 2
    everything: list[bytes] = []
    for rank in range(world):
        for worker in range(workers):
            info = SimpleNamespace(id=worker, num_workers=workers)
            monkeypatch.setattr(ctorch, "get_worker_info", lambda info=info: info)
            ds = ctorch.ChainfsIterableDataset(
                cluster.address, records, shuffle=True, seed=1, fetch_batch=7,
                rank=rank, world_size=world,
            )  # fmt: skip
            ds.set_epoch(2)
            part = list(ds)
            assert abs(len(part) - len(records) / (world * workers)) <= 1
            everything.extend(part)
    monkeypatch.undo()
    assert len(everything) == len(records)  # no duplicates, nothing lost
    assert set(everything) == want

    # Real DataLoader worker processes on one rank.
    ds = ctorch.ChainfsIterableDataset(cluster.address, records, fetch_batch=5)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = list(loader)
    assert len(got) == len(records) and set(got) == want

    # Another epoch: the same records, in another order.
    ds0 = ctorch.ChainfsIterableDataset(cluster.address, records, shuffle=True, seed=1)
    ds0.set_epoch(3)
    order3 = ds0.shard()
    ds0.set_epoch(4)
    assert sorted(order3) == sorted(ds0.shard()) and order3 != ds0.shard()


def test_checkpoint_save_load_atomic(
    cluster: LocalCluster, fs: FileSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = _torch()
    from chainfs.client import torch as ctorch

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    state = {"model": model.state_dict(), "step": 42, "big": torch.arange(3_000_000)}
    fs.mkdir("/ckpt", exist_ok=True)
    ctorch.save_checkpoint(state, "/ckpt/model.pt", fs)
    loaded = ctorch.load_checkpoint("/ckpt/model.pt", fs, weights_only=True)
    assert loaded["step"] == 42
    assert torch.equal(loaded["big"], state["big"])
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    # By address in the URL, no FileSystem at hand.
    url = f"chainfs://{cluster.address}/ckpt/model.pt"
    assert ctorch.load_checkpoint(url, weights_only=True)["step"] == 42

    # A save that fails half-way leaves the previous checkpoint intact and no temp file.
    real_save = torch.save

    def failing_save(obj: Any, f: Any, **kw: Any) -> None:
        f.write(b"partial garbage")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ctorch.save_checkpoint({"step": 43}, "/ckpt/model.pt", fs)
    monkeypatch.setattr(torch, "save", real_save)
    assert ctorch.load_checkpoint("/ckpt/model.pt", fs, weights_only=True)["step"] == 42
    assert fs.listdir("/ckpt") == ["model.pt"]
    # Overwrite: readers see the old or the new file, never a mix.
    ctorch.save_checkpoint({"step": 44}, "/ckpt/model.pt", fs)
    assert ctorch.load_checkpoint("/ckpt/model.pt", fs, weights_only=True) == {"step": 44}


def test_chainfs_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import chainfs, chainfs.aio, chainfs.client, chainfs.client.fsspec_adapter\n"
        "assert chainfs.connect and 'torch' not in [m for m in sys.modules if sys.modules[m]]\n"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert callable(chainfs.connect)
