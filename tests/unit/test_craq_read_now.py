"""Reads answered at once on the event loop (Craq.batch_read_now): the same answers
as batch_read (committed bytes only, CRCs checked, per-io errors), and None,
holding nothing, whenever the read would have to wait."""

from __future__ import annotations

import os

import pytest

from chainfs.common.checksum import crc32c
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.craq import Craq
from tests.unit.test_craq import FakeLinks, chain, head_write, write_req

__all__ = ["chain"]  # the fixture, shared with test_craq

Chain = tuple[FakeLinks, dict[int, ChunkEngine]]


def read_req(*ios: tuple[int, int, int, int]) -> sp.BatchReadReq:
    """ios: (target, chunk index, offset, length) of chunks of inode 7 in chain 1."""
    return sp.BatchReadReq(
        ios=[
            sp.ReadIO(
                chain_id=1,
                target_id=t,
                chunk=sp.ChunkId(inode=7, index=i),
                offset=off,
                length=n,
            )
            for t, i, off, n in ios
        ],
    )


def _rot(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"X", 0)
    finally:
        os.close(fd)


async def test_page_cache_reads_are_answered_at_once(chain: Chain) -> None:
    links, _ = chain
    await head_write(links, write_req(b"hello, chunk"), b"hello, chunk")
    tail: Craq = links.craqs[3]
    now = tail.batch_read_now(read_req((103, 0, 7, 5), (103, 3, 0, 10)))
    assert now is not None
    rsp, payload, release = now
    first, missing = rsp.results
    assert first.status.code == Code.OK and first.length == 5
    assert (first.committed_version, first.chunk_length) == (1, 12)
    assert missing.status.code == Code.OK and missing.length == 0  # no chunk: empty
    assert [bytes(p) for p in payload] == [b"chunk"]
    assert tail.read_pool.in_use_bytes > 0  # held until the reply is sent
    release()
    assert tail.read_pool.in_use_bytes == 0


async def test_pending_versions_and_damaged_blocks_are_refused_at_once(chain: Chain) -> None:
    links, engines = chain
    await head_write(links, write_req(b"v1", request_id=1), b"v1")
    links.down.add(3)  # the tail never sees v2: head and middle keep it pending
    with pytest.raises(ChainfsError):
        await head_write(links, write_req(b"v2", request_id=2), b"v2")
    head = links.craqs[1]
    now = head.batch_read_now(read_req((101, 0, 0, 2)))
    assert now is not None
    assert now[0].results[0].status.code == Code.NOT_COMMITTED
    assert now[1] == []
    now[2]()
    tail_eng = engines[103]
    rec = tail_eng.get(7, 0)
    assert rec is not None
    _rot(tail_eng.file_path(7, 0, rec.file_gen))  # bit rot under the committed v1
    now = links.craqs[3].batch_read_now(read_req((103, 0, 0, 2)))
    assert now is not None
    assert now[0].results[0].status.code == Code.CHECKSUM_MISMATCH
    assert now[1] == []
    now[2]()


async def test_reads_that_would_wait_are_left_to_batch_read(chain: Chain) -> None:
    links, _ = chain
    await head_write(links, write_req(b"data"), b"data")
    tail = links.craqs[3]
    # A chain our routing does not know: batch_read fetches routing first.
    unknown = read_req((103, 0, 0, 4))
    unknown.ios[0].chain_id = 9
    assert tail.batch_read_now(unknown) is None
    assert (await tail.batch_read(unknown))[0].results[0].status.code == Code.UNKNOWN_CHAIN
    # A batch queued for read buffers goes first: no read overtakes it.
    pool = tail.read_pool
    hog = pool.try_acquire(pool.capacity_bytes)
    assert hog is not None
    served: list[object] = []
    pool.when_available(4096, served.append)
    assert tail.batch_read_now(read_req((103, 0, 0, 4))) is None
    hog.release()
    assert len(served) == 1
    served[0].release()  # type: ignore[attr-defined]
    now = tail.batch_read_now(read_req((103, 0, 0, 4)))
    assert now is not None and [bytes(p) for p in now[1]] == [b"data"]
    now[2]()
    assert pool.in_use_bytes == 0


async def test_each_io_gets_its_own_result_in_order(chain: Chain) -> None:
    """Served, missing and refused ios mixed in one batch, several on one
    (chain, target): results in io order, the same at once as via batch_read."""
    links, _ = chain
    await head_write(links, write_req(b"0123456789"), b"0123456789")
    tail = links.craqs[3]
    req = read_req(
        (103, 0, 2, 3),
        (103, 0, 60 << 20, 8 << 20),  # past the largest chunk: EINVAL for this io alone
        (103, 5, 0, 4),  # no such chunk: empty
        (103, 0, 8, 100),  # clamped at the chunk's end
    )
    now = tail.batch_read_now(req)
    assert now is not None
    later = await tail.batch_read(req)
    for rsp, payload, release in (now, later):
        codes = [r.status.code for r in rsp.results]
        assert codes == [Code.OK, Code.EINVAL, Code.OK, Code.OK]
        assert "outside any chunk" in rsp.results[1].status.message
        assert [r.length for r in rsp.results] == [3, 0, 0, 2]
        served = [rsp.results[i] for i in (0, 3)]
        assert all((r.committed_version, r.chunk_length) == (1, 10) for r in served)
        assert all(r.chunk_crc32c == crc32c(b"0123456789") for r in served)
        assert rsp.results[2].committed_version == 0  # a missing chunk: all zeros
        assert [bytes(p) for p in payload] == [b"234", b"89"]
        release()
    assert now[0].SerializeToString() == later[0].SerializeToString()
    assert tail.read_pool.in_use_bytes == 0
