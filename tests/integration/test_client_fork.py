"""The client library after fork(): children reconnect on their own, the parent goes on.

Real processes: a LocalCluster, a PyTorch DataLoader with the default (fork)
start, multiprocessing pools with fork, forkserver and spawn, a bare
os.fork(). Also: the client path never imports gRPC.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import chainfs
from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster
from tests.conftest import require
from tests.integration.client_fixtures import CHUNK, module_cluster, pattern

pytestmark = pytest.mark.timeout(300)

RECORD = 70_001  # odd-sized records: a misplaced byte cannot line up
RECORDS = 48
FILES = {f"/fork/files/{i}.bin": pattern(1_000 + 4_099 * i, f"f{i}") for i in range(12)}
BIG = pattern(2 * CHUNK + 17, "big")  # spans chunks (and so chains)

# The parent's connection, inherited by fork()ed pool workers (set by the tests).
_INHERITED: FileSystem | None = None
_OWN: dict[str, FileSystem] = {}  # a spawn/forkserver worker's own connection, per address


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "client-fork")


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> FileSystem:
    """The parent's connection: it wrote the data and reads it before any fork."""
    fs = cluster.client()
    fs.mkdir("/fork/files", parents=True, exist_ok=True)
    fs.write_file("/fork/shard.bin", pattern(RECORD * RECORDS, "shard"))
    for path, data in FILES.items():
        fs.write_file(path, data)
    fs.write_file("/fork/big.bin", BIG)
    assert fs.read_file("/fork/big.bin") == BIG
    return fs


def _records() -> list[tuple[str, int, int]]:
    return [("/fork/shard.bin", i * RECORD, RECORD) for i in range(RECORDS)]


def _want(rec: tuple[str, int, int]) -> bytes:
    _, off, n = rec
    return pattern(RECORD * RECORDS, "shard")[off : off + n]


def _read_inherited(path: str) -> bytes:
    assert _INHERITED is not None
    return _INHERITED.read_file(path)


def _read_own(args: tuple[str, str]) -> bytes:
    address, path = args
    if address not in _OWN:
        _OWN[address] = chainfs.connect(address)
    return _OWN[address].read_file(path)


def test_dataloader_default_fork_after_the_parent_read(fs: FileSystem) -> None:
    require("torch", importlib.util.find_spec("torch") is not None, "pip install torch")
    from torch.utils.data import DataLoader

    from chainfs.client.torch import ChainfsDataset

    assert multiprocessing.get_start_method() == "fork"  # the default this test is about
    records = _records()
    ds = ChainfsDataset(fs, records)  # holds the parent's open connection
    loader = DataLoader(ds, batch_size=5, num_workers=4, collate_fn=list, timeout=120)
    for _epoch in range(2):
        got = [bytes(x) for batch in loader for x in batch]
        assert got == [_want(r) for r in records]
        assert fs.read_file("/fork/big.bin") == BIG  # the parent, between and after epochs


def test_fork_pool_workers_use_the_inherited_connection(fs: FileSystem) -> None:
    global _INHERITED
    _INHERITED = fs
    try:
        with multiprocessing.get_context("fork").Pool(4) as pool:
            got = pool.map(_read_inherited, [*FILES, "/fork/big.bin"])
    finally:
        _INHERITED = None
    assert got == [*FILES.values(), BIG]
    assert fs.read_file("/fork/big.bin") == BIG
    assert fs.listdir("/fork/files") == sorted(p.rsplit("/", 1)[1] for p in FILES)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_forkserver_and_spawn_pools(fs: FileSystem, cluster: LocalCluster, method: str) -> None:
    with multiprocessing.get_context(method).Pool(2) as pool:
        got = pool.map(_read_own, [(cluster.address, p) for p in FILES])
    assert got == list(FILES.values())
    assert fs.read_file("/fork/big.bin") == BIG


def test_bare_fork_child_reads_writes_and_sees_inherited_files_closed(fs: FileSystem) -> None:
    f = fs.open("/fork/big.bin", "rb")
    assert f.read(1000) == BIG[:1000]
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 1
        try:
            code = _child_checks(fs, f)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's open file and connection are untouched by the child.
    assert f.read(1000) == BIG[1000:2000]
    f.close()
    assert fs.read_file("/fork/from-child.bin") == b"written by the child"
    fs.remove("/fork/from-child.bin")


def _child_checks(fs: FileSystem, inherited: Any) -> int:
    """In a forked child: 0 if all is as promised, else which check failed."""
    try:
        inherited.read(10)
        return 2  # a file the parent opened holds the parent's session: closed here
    except ValueError:
        pass
    if fs.read_file("/fork/big.bin") != BIG:
        return 3
    fs.write_file("/fork/from-child.bin", b"written by the child")
    fs.close()
    return 0


def test_client_path_never_imports_grpc(fs: FileSystem, cluster: LocalCluster) -> None:
    code = (
        "import sys\n"
        "sys.modules['grpc'] = None  # any import of grpc fails\n"
        "import chainfs\n"
        f"fs = chainfs.connect({cluster.address!r})\n"
        "data = fs.read_file('/fork/big.bin')\n"
        "fs.write_file('/fork/no-grpc.bin', data[:100_000])\n"
        "fs.close()\n"
        "print(len(data))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(BIG)
    assert fs.read_file("/fork/no-grpc.bin") == BIG[:100_000]
