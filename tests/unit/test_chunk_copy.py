"""The chunk-copy primitive of repair and fsck --repair: installing a replica's chunk
locally (real engines) and choosing the healthy replica (fake peers' data plane)."""

from __future__ import annotations

import asyncio
import glob
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import common_pb2 as cp
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_copy import ChunkCopier, install_copy, same_content
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.craq import LocalTarget, record_to_meta

CHUNK = 64 * 1024
KEY = (5, 2)


def _write(eng: ChunkEngine, data: bytes, chain_version: int = 1) -> None:
    rec = eng.get(*KEY)
    v = (rec.committed_version if rec else 0) + 1
    eng.prepare_write(KEY[0], KEY[1], 0, memoryview(data), crc.value(data), CHUNK, v)
    eng.commit(KEY[0], KEY[1], v, chain_version)


def _meta(eng: ChunkEngine) -> sp.ChunkMeta:
    rec = eng.get(*KEY)
    assert rec is not None
    return record_to_meta(KEY[0], KEY[1], rec)


def _flip(eng: ChunkEngine) -> None:
    rec = eng.get(*KEY)
    assert rec is not None
    path = eng.file_path(KEY[0], KEY[1], rec.file_gen)
    with open(path, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))


def _bytes(eng: ChunkEngine) -> bytes:
    rec = eng.get(*KEY)
    assert rec is not None
    return bytes(eng.read(KEY[0], KEY[1], 0, rec.length, True)[1])


@pytest.fixture
def engines(tmp_path: Path) -> Any:
    made: list[ChunkEngine] = []

    def make(name: str) -> ChunkEngine:
        e = ChunkEngine(tmp_path / name)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def test_install_onto_a_missing_chunk(engines: Any) -> None:
    good, local = engines("good"), engines("local")
    for d in (b"a" * 100, b"b" * 5000, b"c" * 70):
        _write(good, d, chain_version=4)
    m = _meta(good)
    got = install_copy(local, KEY, None, m, memoryview(_bytes(good)))
    assert same_content(got, m) and got.chain_version == 4
    assert _meta(local) == m
    assert _bytes(local) == b"c" * 70 + b"b" * 4930


def test_install_over_a_corrupt_file_at_the_same_version_rewrites_it(engines: Any) -> None:
    good, local = engines("good"), engines("local")
    data = bytes(range(256)) * 100
    _write(good, data)
    _write(local, data)
    _flip(local)
    with pytest.raises(ChainfsError) as e:
        _bytes(local)
    assert e.value.code == Code.CHECKSUM_MISMATCH
    rec = local.get(*KEY)
    install_copy(local, KEY, rec, _meta(good), memoryview(data))
    assert local.get(*KEY) == rec  # same record: only the bytes were replaced
    assert _bytes(local) == data


def test_install_over_a_replica_that_diverged_ahead(engines: Any) -> None:
    good, local = engines("good"), engines("local")
    _write(good, b"right")
    _write(local, b"right")
    _write(local, b"wrong, and newer")
    rec = local.get(*KEY)
    install_copy(local, KEY, rec, _meta(good), memoryview(b"right"))
    assert (_meta(local).committed_version, _bytes(local)) == (1, b"right")
    files = glob.glob(f"{local.path}/data/*/*")
    assert len(files) == 1, files  # the diverged file is gone


def test_install_refuses_changed_records_and_bad_bytes(engines: Any) -> None:
    good, local = engines("good"), engines("local")
    _write(good, b"x" * 10)
    _write(local, b"y" * 10)
    with pytest.raises(ChainfsError) as e:
        install_copy(local, KEY, None, _meta(good), memoryview(b"x" * 10))  # expected none
    assert e.value.code == Code.NOT_COMMITTED
    with pytest.raises(ChainfsError) as e:
        install_copy(local, KEY, local.get(*KEY), _meta(good), memoryview(b"z" * 10))
    assert e.value.code == Code.CHECKSUM_MISMATCH
    assert _bytes(local) == b"y" * 10  # untouched


class _Peers:
    """The data plane of the other replicas, answered by real engines (one per target)."""

    def __init__(self, engines: dict[int, ChunkEngine], lie: frozenset[int] = frozenset()) -> None:
        self.engines = engines
        self.lie = lie  # targets that send bytes not matching their CRC (a bad disk, no verify)
        self.reads: list[int] = []

    async def request(
        self,
        address: str,
        msg_type: int,
        header: bytes,
        payload: Sequence[Any] = (),
        timeout_s: float | None = None,
        **_: Any,
    ) -> Any:
        data = memoryview(b"")
        if msg_type == sp.LIST_CHUNKS:
            req = sp.ListChunksReq.FromString(header)
            eng = self.engines[req.target_id]
            rsp: Any = sp.ListChunksRsp(status=cp.Status())
            for index, rec in eng.list_chunks(req.inode, req.begin_index, limit=1):
                rsp.chunks.append(record_to_meta(req.inode, index, rec))
        elif msg_type == sp.BATCH_READ:
            io = sp.BatchReadReq.FromString(header).ios[0]
            self.reads.append(io.target_id)
            eng = self.engines[io.target_id]
            held = eng.get(io.chunk.inode, io.chunk.index)
            assert held is not None
            raw = bytearray(eng.read(io.chunk.inode, io.chunk.index, 0, io.length, True)[1])
            if io.target_id in self.lie:
                raw[0] ^= 0xFF
            data = memoryview(raw)
            rsp = sp.BatchReadRsp(status=cp.Status())
            rsp.results.add(
                length=len(raw),
                committed_version=held.committed_version,
                chunk_length=held.length,
                chunk_crc32c=held.crc32c,
            )
        else:
            raise AssertionError(msg_type)
        return type("Reply", (), {"header": rsp.SerializeToString(), "payload": data})()


def _routing(order: list[int], states: dict[int, int] | None = None) -> Routing:
    info = mp.RoutingInfo(version=2)
    info.nodes.add(node_id=1, type=mp.STORAGE, data_address="127.0.0.1:1")
    for t in order:
        st = (states or {}).get(t, mp.SERVING)
        info.targets.add(target_id=t, node_id=1, chain_id=1, public_state=st)
    info.chains.add(chain_id=1, chain_version=7, targets=order)
    return Routing(info)


def _pull(local: ChunkEngine, peers: _Peers, routing: Routing, **kw: Any) -> Any:
    ex = ThreadPoolExecutor(2)
    try:
        copier = ChunkCopier({1: LocalTarget(1, local)}, lambda: routing, peers, ex, 5.0)  # type: ignore[arg-type]
        return asyncio.run(copier.pull(1, KEY, **kw))
    finally:
        ex.shutdown()


def test_pull_takes_the_newest_replica_whose_bytes_match(engines: Any) -> None:
    local, a, b, c = (engines(n) for n in "labc")
    _write(local, b"v1")
    for e in (a, b):
        _write(e, b"v1")
        _write(e, b"v2 newest")
    _write(c, b"v1")
    peers = _Peers({2: a, 3: b, 4: c}, lie=frozenset({2}))
    got = _pull(local, peers, _routing([1, 2, 3, 4]))
    assert (got.copied, got.from_target, got.bytes_copied) == (True, 3, len(b"v2 newest"))
    assert peers.reads == [2, 3]  # the newest first; the one sending bad bytes is passed over
    assert _bytes(local) == b"v2 newest" and _meta(local) == _meta(b)


def test_pull_leaves_a_healthy_newest_replica_alone(engines: Any) -> None:
    local, a = engines("l"), engines("a")
    _write(a, b"old")
    _write(local, b"old")
    _write(local, b"newer")
    peers = _Peers({2: a})
    got = _pull(local, peers, _routing([2, 1]))
    assert not got.copied and "newest" in got.reason and peers.reads == []
    # Same version, different bytes: replaced only when the caller names the truth.
    _write(a, b"other")
    assert not _pull(local, peers, _routing([2, 1])).copied
    got = _pull(local, peers, _routing([2, 1]), prefer=2)
    assert got.copied and _bytes(local) == b"other"


def test_pull_repairs_a_corrupt_replica_at_its_own_version_only(engines: Any) -> None:
    local, a, b = engines("l"), engines("a"), engines("b")
    _write(local, b"same" * 50)
    _write(a, b"same" * 50)
    _write(b, b"same" * 50)
    _write(b, b"newer")
    _flip(local)
    peers = _Peers({2: a, 3: b})
    got = _pull(local, peers, _routing([1, 2, 3]), exact_version=1)
    assert (got.copied, got.from_target) == (True, 2)
    assert _bytes(local) == b"same" * 50
    # Offline replicas are never asked.
    _flip(local)
    peers = _Peers({2: a, 3: b})
    with pytest.raises(ChainfsError):
        _pull(local, peers, _routing([1, 2, 3], {2: mp.OFFLINE}), exact_version=1)
    assert peers.reads == []
