"""CRAQ rules on three in-process replicas; the data plane between them is a fake
that calls the successor's Craq directly (and can fail, like a dead link)."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chainfs.common.checksum import crc32c
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import common_pb2 as cp
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.config import StorageConfig
from chainfs.storage_service.craq import Craq, LocalTarget

CHUNK = 1 << 16


class FakeLinks:
    def __init__(self) -> None:
        self.craqs: dict[int, Craq] = {}
        self.down: set[int] = set()  # node ids whose inbound link fails
        self.lose_ack: set[int] = set()  # node ids that apply an update, but the ack is lost
        self.forwards = 0

    async def update(
        self, node: mp.NodeInfo, req: sp.UpdateReq, payload: Sequence[memoryview], timeout_s: float
    ) -> sp.UpdateRsp:
        self.forwards += 1
        if node.node_id in self.down:
            raise ChainfsError(Code.UNAVAILABLE, f"link to node {node.node_id} is down")
        wire = sp.UpdateReq.FromString(req.SerializeToString())
        data = memoryview(b"".join(bytes(p) for p in payload))
        rsp = await self.craqs[node.node_id].update(wire, data)
        if node.node_id in self.lose_ack:
            raise ChainfsError(Code.UNAVAILABLE, f"ack from node {node.node_id} lost")
        return rsp

    async def remove(
        self, node: mp.NodeInfo, req: sp.RemoveChunksReq, timeout_s: float
    ) -> sp.RemoveChunksRsp:
        if node.node_id in self.down:
            raise ChainfsError(Code.UNAVAILABLE, f"link to node {node.node_id} is down")
        return await self.craqs[node.node_id].remove(
            sp.RemoveChunksReq.FromString(req.SerializeToString())
        )


def routing_info() -> Routing:
    info = mp.RoutingInfo(version=5)
    for i in (1, 2, 3):
        info.nodes.append(
            mp.NodeInfo(node_id=i, type=mp.STORAGE, data_address=f"n{i}", status=mp.NODE_ONLINE)
        )
        info.targets.append(
            mp.TargetInfo(
                target_id=100 + i,
                node_id=i,
                chain_id=1,
                public_state=mp.SERVING,
                local_state=mp.UPTODATE,
            )
        )
    info.chains.append(mp.ChainInfo(chain_id=1, chain_version=3, targets=[101, 102, 103]))
    return Routing(info)


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[tuple[FakeLinks, dict[int, ChunkEngine]]]:
    links = FakeLinks()
    routing = routing_info()
    pool = ThreadPoolExecutor(2)
    config = StorageConfig(forward_retries=1, forward_retry_backoff_ms=1)
    engines: dict[int, ChunkEngine] = {}

    async def no_refresh(_v: int) -> Routing | None:
        return None

    for i in (1, 2, 3):
        eng = ChunkEngine(tmp_path / f"t{i}")
        engines[100 + i] = eng
        links.craqs[i] = Craq(
            config, {100 + i: LocalTarget(100 + i, eng)}, lambda: routing, no_refresh, links, pool
        )
    yield links, engines
    pool.shutdown()
    for eng in engines.values():
        eng.close()


def write_req(
    data: bytes, offset: int = 0, request_id: int = 1, client: bytes = b"c" * 16
) -> sp.UpdateReq:
    return sp.UpdateReq(
        req=cp.RequestInfo(client_id=client, request_id=request_id),
        chain_id=1,
        chain_version=3,
        target_id=101,
        chunk=sp.ChunkId(inode=7, index=0),
        type=sp.WRITE,
        offset=offset,
        length=len(data),
        crc32c=crc32c(data),
        chunk_size=CHUNK,
    )


async def head_write(links: FakeLinks, req: sp.UpdateReq, data: bytes) -> sp.UpdateRsp:
    return await links.craqs[1].update(req, memoryview(data))


def states(engines: dict[int, ChunkEngine]) -> list[tuple[int, int, int, int]]:
    out = []
    for eng in engines.values():
        rec = eng.get(7, 0)
        out.append(
            (0, 0, 0, 0)
            if rec is None
            else (rec.committed_version, rec.pending_version, rec.length, rec.crc32c)
        )
    return out


def content(eng: ChunkEngine) -> bytes:
    return bytes(eng.read(7, 0, 0, CHUNK, verify=True)[1])


async def test_write_commits_on_every_replica(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    links, engines = chain
    rsp = await head_write(links, write_req(b"hello"), b"hello")
    assert rsp.committed_version == 1 and rsp.length == 5
    assert len(set(states(engines))) == 1
    assert all(content(e) == b"hello" for e in engines.values())


async def test_unknown_outcome_keeps_pending_and_retry_redrives(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    links, engines = chain
    await head_write(links, write_req(b"v1", request_id=1), b"v1")
    links.down.add(3)  # middle -> tail link dies
    with pytest.raises(ChainfsError) as e:
        await head_write(links, write_req(b"v2!", request_id=2), b"v2!")
    assert e.value.code == Code.UNAVAILABLE
    s = states(engines)
    assert s[0][:2] == (1, 2) and s[1][:2] == (1, 2) and s[2][:2] == (1, 0)
    for eng in list(engines.values())[:2]:
        with pytest.raises(ChainfsError) as e:
            eng.read(7, 0, 0, 10, verify=True)
        assert e.value.code == Code.NOT_COMMITTED
    assert content(engines[103]) == b"v1"  # the tail still serves the committed bytes
    links.down.clear()
    rsp = await head_write(links, write_req(b"v2!", request_id=2), b"v2!")  # the retry
    assert rsp.committed_version == 2
    assert len(set(states(engines))) == 1 and states(engines)[0][:2] == (2, 0)
    assert all(content(e) == b"v2!" for e in engines.values())


async def test_tail_commits_at_once_and_a_retry_is_applied_once(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    """The tail writes each update as committed in one record write; when its ack is
    lost, the retry of the same request finds that version committed there and the
    chain commits it without the tail applying it again."""
    links, engines = chain
    await head_write(links, write_req(b"0123456789", request_id=1), b"0123456789")
    tail = engines[103]
    writes: list[object] = []
    for name in ("put", "put_with_journal", "put_dropping_journal"):
        real = getattr(tail.records, name)

        def counted(*args: object, _real: object = real, **kw: object) -> None:
            writes.append(args[2])
            _real(*args, **kw)  # type: ignore[operator]

        setattr(tail.records, name, counted)
    links.lose_ack.add(3)
    with pytest.raises(ChainfsError) as e:
        await head_write(links, write_req(b"XY", offset=4, request_id=2), b"XY")
    assert e.value.code == Code.UNAVAILABLE
    s = states(engines)
    assert s[0][:2] == (1, 2) and s[1][:2] == (1, 2) and s[2][:2] == (2, 0)
    assert content(tail) == b"0123XY6789"
    assert all(not r.has_pending for r in writes)  # type: ignore[attr-defined]
    tail_writes = len(writes)
    links.lose_ack.clear()
    rsp = await head_write(links, write_req(b"XY", offset=4, request_id=2), b"XY")  # the retry
    assert rsp.committed_version == 2 and len(writes) == tail_writes  # not applied again
    assert len(set(states(engines))) == 1 and states(engines)[0][:2] == (2, 0)
    assert all(content(e) == b"0123XY6789" for e in engines.values())
    # The same request once more, answered from what the head committed.
    rsp = await head_write(links, write_req(b"XY", offset=4, request_id=2), b"XY")
    assert rsp.committed_version == 2 and len(writes) == tail_writes


async def test_other_writer_after_a_failed_update_redrives_first(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    links, engines = chain
    links.down.add(2)
    with pytest.raises(ChainfsError):
        await head_write(links, write_req(b"aaaa", request_id=1), b"aaaa")
    links.down.clear()
    await head_write(links, write_req(b"bb", offset=2, request_id=9, client=b"d" * 16), b"bb")
    assert states(engines)[0][:2] == (2, 0) and len(set(states(engines))) == 1
    assert all(content(e) == b"aabb" for e in engines.values())


async def test_replica_missing_a_version_gets_the_whole_chunk(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    links, engines = chain
    await head_write(links, write_req(b"0123456789", request_id=1), b"0123456789")
    tail = engines[103]
    rec = tail.prepare_remove(7, 0)  # the tail lost the chunk (e.g. a replaced disk)
    assert rec is not None
    tail.commit(7, 0, rec.pending_version, 3)
    await head_write(links, write_req(b"XY", offset=4, request_id=2), b"XY")
    assert len(set(states(engines))) == 1
    assert all(content(e) == b"0123XY6789" for e in engines.values())


async def test_definite_error_downstream_aborts_upstream_pending(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    links, engines = chain
    await head_write(links, write_req(b"abc", request_id=1), b"abc")
    engines[103].options = type(engines[103].options)(disk_usage_limit_ratio=1e-9)
    req = write_req(b"new", request_id=2)
    req.chunk.index = 1
    with pytest.raises(ChainfsError) as e:
        await head_write(links, req, b"new")
    assert e.value.code == Code.ENOSPC
    assert all(eng.get(7, 1) is None for eng in engines.values())


async def test_concurrent_writes_serialize_per_chunk(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    links, engines = chain
    blobs = [os.urandom(100) for _ in range(20)]
    await asyncio.gather(
        *(
            head_write(links, write_req(b, offset=i * 50, request_id=i + 1), b)
            for i, b in enumerate(blobs)
        )
    )
    s = states(engines)
    assert len(set(s)) == 1 and s[0][:2] == (20, 0)
    assert len({content(e) for e in engines.values()}) == 1


async def test_remove_goes_down_the_chain(chain: tuple[FakeLinks, dict[int, ChunkEngine]]) -> None:
    links, engines = chain
    for i in range(5):
        req = write_req(b"z", request_id=i + 1)
        req.chunk.index = i
        await head_write(links, req, b"z")
    rsp = await links.craqs[1].remove(
        sp.RemoveChunksReq(
            chain_id=1, chain_version=3, target_id=101, inode=7, begin_index=1, end_index=4
        )
    )
    assert rsp.removed == 3 and not rsp.more
    for eng in engines.values():
        assert [i for i, _ in eng.list_chunks(7)] == [0, 4]


async def test_a_failure_after_the_tail_decided_is_not_definite(
    chain: tuple[FakeLinks, dict[int, ChunkEngine]],
) -> None:
    """The tail decides a small overwrite committed at once with its record write,
    then writes the bytes in place. If that write fails (ENOSPC: the range was a
    hole left by a truncate), the tail holds the new version: the predecessors
    must keep theirs pending (not abort as after "nothing applied"), and the next
    update settles the chain on it and applies on top of whole bytes."""
    links, engines = chain
    await head_write(links, write_req(b"0123456789", request_id=1), b"0123456789")
    tail = engines[103]
    real = tail.files.write_in_place
    calls: list[object] = []

    def disk_full(*args: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)  # type: ignore[arg-type]

    tail.files.write_in_place = disk_full  # type: ignore[method-assign]
    with pytest.raises(ChainfsError) as e:
        await head_write(links, write_req(b"XY", offset=4, request_id=2), b"XY")
    assert e.value.code not in (Code.ENOSPC, Code.EIO)  # not "applied nothing"
    s = states(engines)
    assert s[0][:2] == (1, 2) and s[1][:2] == (1, 2) and s[2][:2] == (2, 0)
    # Another writer: version 2 is driven through first, then its update lands.
    rsp = await head_write(links, write_req(b"ab", offset=0, request_id=9, client=b"d" * 16), b"ab")
    assert rsp.committed_version == 3
    assert len(set(states(engines))) == 1 and states(engines)[0][:2] == (3, 0)
    assert all(content(e) == b"ab23XY6789" for e in engines.values())
    assert tail.records.journal_keys() == []
