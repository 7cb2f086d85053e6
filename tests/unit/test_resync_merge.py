"""Resync's paged merge-compare: bounded pages, every key once in order, and a whole
sync pass against a fake successor node that is a real chunk engine."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.routing import Routing
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_copy import Key
from chainfs.storage_service.chunk_engine import ChunkEngine, ChunkRecord, parse_key
from chainfs.storage_service.craq import LocalTarget, record_to_meta
from chainfs.storage_service.failure_config import FailureConfig
from chainfs.storage_service.resync import PageFetch, Resyncer, merge_pages, source_page

CHUNK = 64 * 1024


def _pages(items: list[tuple[Key, Any]], batch: int, log: list[int]) -> PageFetch[Any]:
    """A listing served a page at a time (like DumpChunkMeta), recording page sizes."""

    async def fetch(after: Key | None) -> tuple[list[tuple[Key, Any]], bool]:
        rest = [kv for kv in items if after is None or kv[0] > after]
        page = rest[:batch]
        log.append(len(page))
        return page, len(rest) <= batch

    return fetch


async def _collect(src: PageFetch[Any], dst: PageFetch[Any]) -> list[tuple[Key, Any, Any]]:
    return [x async for x in merge_pages(src, dst)]


@pytest.mark.parametrize("seed", range(6))
def test_merge_yields_every_key_once_in_order_with_both_sides(seed: int) -> None:
    rng = random.Random(seed)
    universe = [(rng.randrange(5), rng.randrange(50)) for _ in range(300)]
    src_keys = sorted({k for k in universe if rng.random() < 0.6})
    dst_keys = sorted({k for k in universe if rng.random() < 0.6})
    batch = rng.choice([1, 2, 7, 64, 1000])
    src_log: list[int] = []
    dst_log: list[int] = []
    got = asyncio.run(
        _collect(
            _pages([(k, ("s", k)) for k in src_keys], batch, src_log),
            _pages([(k, ("d", k)) for k in dst_keys], batch, dst_log),
        )
    )
    want = sorted(set(src_keys) | set(dst_keys))
    assert [k for k, _, _ in got] == want
    for k, s, d in got:
        assert s == (("s", k) if k in src_keys else None)
        assert d == (("d", k) if k in dst_keys else None)
    assert max(src_log + dst_log) <= batch
    # Each side is read once, page by page (no re-listing).
    assert sum(src_log) == len(src_keys) and sum(dst_log) == len(dst_keys)


def test_merge_memory_stays_bounded_whatever_the_list_sizes() -> None:
    """100,000 keys a side through pages of 256: what the merge holds is a page, not a list."""
    n, batch = 100_000, 256

    def lazy(tag: str, step: int) -> PageFetch[str]:
        async def fetch(after: Key | None) -> tuple[list[tuple[Key, str]], bool]:
            start = 0 if after is None else after[1] + 1
            start += (-start) % step
            page = [((1, i), tag) for i in range(start, min(n, start + batch * step), step)]
            return page, start + batch * step >= n

        return fetch

    async def run() -> tuple[int, int]:
        count = both = 0
        async for _, s, d in merge_pages(lazy("s", 1), lazy("d", 2)):
            count += 1
            both += s is not None and d is not None
        return count, both

    tracemalloc.start()
    try:
        count, both = asyncio.run(run())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (count, both) == (n, n // 2)
    # Materialising either list would take tens of MB; two pages take well under 2 MB.
    assert peak < 2 * 1024 * 1024, peak


def test_merge_rejects_an_unsorted_listing() -> None:
    async def bad(after: Key | None) -> tuple[list[tuple[Key, int]], bool]:
        return [((2, 0), 1), ((1, 0), 2)], True

    async def empty(after: Key | None) -> tuple[list[tuple[Key, int]], bool]:
        return [], True

    with pytest.raises(Exception, match="out of order"):
        asyncio.run(_collect(bad, empty))


def _write(eng: ChunkEngine, key: Key, data: bytes, chain_version: int = 1) -> None:
    rec = eng.get(*key)
    version = (rec.committed_version if rec else 0) + 1
    eng.prepare_write(key[0], key[1], 0, memoryview(data), crc.value(data), CHUNK, version)
    eng.commit(key[0], key[1], version, chain_version)


def test_source_page_pages_a_real_engine_in_key_order(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")
    try:
        keys = [(3, 1), (1, 0), (1, 2), (2, 7), (1 << 40, 0)]
        for k in keys:
            _write(eng, k, b"x" * (k[1] + 1))
        seen: list[Key] = []
        after: Key | None = None
        while True:
            page, last = source_page(eng, after, 2)
            assert len(page) <= 2
            seen += [k for k, _ in page]
            if last:
                break
            after = page[-1][0]
        assert seen == sorted(keys)
    finally:
        eng.close()


class _FakeSuccessor:
    """The syncing node's data plane, answered by a real chunk engine (the dest)."""

    def __init__(self, engine: ChunkEngine) -> None:
        self.engine = engine
        self.reports: list[sp.SyncReportReq] = []
        self.updates: list[Key] = []
        self.removes: list[Key] = []

    async def request(
        self,
        address: str,
        msg_type: int,
        header: bytes,
        payload: Sequence[Any] = (),
        timeout_s: float | None = None,
        **_: Any,
    ) -> Any:
        eng = self.engine
        rsp: Any
        if msg_type == sp.UPDATE:
            req = sp.UpdateReq.FromString(header)
            key = (req.chunk.inode, req.chunk.index)
            assert req.full_chunk and req.from_target == 1 and req.target_id == 2
            data = memoryview(b"".join(bytes(p) for p in payload))
            rec = eng.get(*key)
            if rec is None or rec.committed_version < req.update_version:
                eng.prepare_replace(
                    key[0], key[1], data, req.crc32c, req.chunk_size, req.update_version
                )
                rec = eng.commit(key[0], key[1], req.update_version, req.chain_version)
            self.updates.append(key)
            assert rec is not None
            rsp = sp.UpdateRsp(
                committed_version=rec.committed_version, length=rec.length, crc32c=rec.crc32c
            )
        elif msg_type == sp.REMOVE_CHUNKS:
            rm = sp.RemoveChunksReq.FromString(header)
            key = (rm.inode, rm.begin_index)
            rec = eng.get(*key)
            if rec is not None:
                eng.prepare_remove(*key)
                eng.commit(key[0], key[1], rec.committed_version + 1, rm.chain_version)
            self.removes.append(key)
            rsp = sp.RemoveChunksRsp(removed=1)
        elif msg_type == sp.SYNC_REPORT:
            self.reports.append(sp.SyncReportReq.FromString(header))
            rsp = sp.SyncReportRsp()
        else:
            raise AssertionError(f"unexpected message {msg_type}")
        return type("Reply", (), {"header": rsp.SerializeToString()})()


def _routing() -> Routing:
    info = mp.RoutingInfo(version=5)
    info.nodes.add(node_id=1, type=mp.STORAGE, data_address="127.0.0.1:1")
    info.nodes.add(node_id=2, type=mp.STORAGE, data_address="127.0.0.1:2")
    info.targets.add(target_id=1, node_id=1, chain_id=9, public_state=mp.SERVING)
    info.targets.add(target_id=2, node_id=2, chain_id=9, public_state=mp.SYNCING)
    info.chains.add(chain_id=9, chain_version=3, targets=[1, 2])
    return Routing(info)


def _state(eng: ChunkEngine) -> dict[bytes, tuple[int, int, int]]:
    out = {}
    for key, rec in eng.iter_records():
        m = record_to_meta(0, 0, rec)
        out[key] = (m.committed_version, m.length, m.crc32c)
    return out


@pytest.mark.parametrize("buffer_bytes", [64 << 20, 8192])  # 8 KiB: sends wait for buffers
def test_sync_pass_makes_the_target_identical_page_by_page(
    tmp_path: Path, buffer_bytes: int
) -> None:
    rng = random.Random(4)
    src, dst = ChunkEngine(tmp_path / "src"), ChunkEngine(tmp_path / "dst")
    executor = ThreadPoolExecutor(2)
    try:
        expect_sent: set[Key] = set()
        expect_removed: set[Key] = set()
        for i in range(60):
            key = (rng.randrange(1, 6), i)
            data = rng.randbytes(rng.randrange(1, 3000))
            kind = rng.choice(["both", "src_only", "dst_only", "src_newer", "dst_newer"])
            if kind in ("both", "src_newer", "dst_newer"):
                _write(src, key, data)
                _write(dst, key, data)
            if kind == "src_only":
                _write(src, key, data)
            if kind == "dst_only":
                _write(dst, key, data)
                expect_removed.add(key)
            if kind == "src_newer":
                _write(src, key, data[::-1] + b"!")
            if kind == "dst_newer":
                _write(dst, key, b"?" + data)
            if kind in ("src_only", "src_newer", "dst_newer"):
                expect_sent.add(key)
        _write(src, (7, 0), rng.randbytes(20_000))  # larger than the small pool: own buffer
        expect_sent.add((7, 0))
        config = FailureConfig(
            resync_batch_chunks=4,
            resync_parallel_chunks=3,
            resync_report_interval_ms=1,
            resync_buffer_bytes=buffer_bytes,
        )
        succ = _FakeSuccessor(dst)
        routing = _routing()
        rs = Resyncer(
            config,
            {1: LocalTarget(1, src)},
            lambda: routing,
            succ,  # type: ignore[arg-type]
            executor,
            lambda: False,
        )
        dest_log: list[int] = []

        def dest_pages(control: Any, dest: int) -> PageFetch[sp.ChunkMeta]:
            async def fetch(after: Key | None) -> tuple[list[tuple[Key, sp.ChunkMeta]], bool]:
                page, last = source_page(dst, after, config.resync_batch_chunks)
                dest_log.append(len(page))
                return [(k, record_to_meta(k[0], k[1], r)) for k, r in page], last

            return fetch

        rs._dest_pages = dest_pages  # type: ignore[method-assign]
        sent_bytes = sum(
            r.length for k, r in ((k, src.get(*k)) for k in expect_sent) if r is not None
        )
        version = asyncio.run(rs._sync_pass(1, 2, 9))
        assert version == 3
        assert _state(dst) == _state(src)
        for raw_key, rec in src.iter_records():
            k = parse_key(raw_key)
            assert bytes(dst.read(k[0], k[1], 0, rec.length, True)[1]) == bytes(
                src.read(k[0], k[1], 0, rec.length, True)[1]
            )
        assert set(succ.updates) == expect_sent  # chunks in step were not sent again
        assert set(succ.removes) >= expect_removed
        assert max(dest_log) <= config.resync_batch_chunks
        first, last = succ.reports[0], succ.reports[-1]
        assert not first.done and first.bytes_left == sent_bytes  # counted up front
        assert last.done and last.bytes_left == 0
        # Progress while chunks are in flight: bytes left going down, a rate.
        middle = succ.reports[1:-1]
        assert middle and all(not r.done and r.rate_bytes_per_s > 0 for r in middle)
        lefts = [first.bytes_left] + [r.bytes_left for r in middle]
        assert lefts == sorted(lefts, reverse=True) and lefts[-1] < lefts[0]
        assert rs.bytes_sent == sent_bytes
        assert rs.buffers.in_use_bytes == 0  # every read buffer went back
    finally:
        executor.shutdown()
        src.close()
        dst.close()


def test_records_compare_as_resync_expects() -> None:
    from chainfs.storage_service.resync import needs_action, needs_send

    rec = ChunkRecord(committed_version=2, length=5, crc32c=7, chain_version=3, file_gen=2)
    meta = record_to_meta(1, 0, rec)
    assert not needs_send(rec, meta) and not needs_action(rec, meta)
    assert needs_send(rec, None)
    older = sp.ChunkMeta()
    older.CopyFrom(meta)
    older.chain_version = 2
    assert needs_send(rec, older)  # a newer chain version on the source
    assert needs_action(None, meta) and not needs_send(None, meta)
