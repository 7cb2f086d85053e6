"""Resync: fill a returning (SYNCING) target from its predecessor, as 3FS does.

A target that comes back after a crash or a missed-heartbeat timeout reports
local state ONLINE; mgmtd moves it offline -> waiting -> syncing. While it is
syncing, CRAQ already forwards every new write to it (a chunk it misses or
holds at an older version answers CHUNK_VERSION_MISMATCH and gets the whole
chunk). What it missed while away is filled here, by the node holding its
*predecessor*: the last SERVING target before it in the chain.

One sync pass (:meth:`Resyncer._sync_pass`) merge-compares the two chunk
metadata lists in key order, a page of ``resync_batch_chunks`` at a time from
each side (the source's from its own RocksDB, the target's with
StorageControl.DumpChunkMeta), so memory stays bounded whatever the target
holds (:func:`merge_pages`). For every chunk id in either list, under the
source's chunk lock (no write of that chunk is in flight meanwhile; the
source's record is read again there, so a page that went stale is harmless):

- only on the source, or a different committed version / CRC / length, or a
  newer chain version on the source: send the whole committed chunk as a
  forwarded full-chunk UPDATE at the source's committed version (removing
  the target's copy first when it is at that version or later);
- only on the target: forwarded REMOVE_CHUNKS of that chunk.

A first metadata-only merge counts the bytes to send (the "bytes left" of
progress); the second one sends. Progress (bytes left, rate) and the end of
the pass go to the syncing node as data-plane SYNC_REPORT messages
(storage.proto SyncReportReq); it puts them in its heartbeats, so `chainfs
admin targets` shows them, and after "done" it reports UPTODATE and mgmtd
makes it SERVING. The bytes sent by all passes of a node are rate-limited by
``FailureConfig.resync_rate_bytes_per_s``, or while a rebalance runs with a
rate, by the rate mgmtd gives in heartbeat answers (:meth:`Resyncer.set_rate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc.aio

from chainfs.common.background import Periodic
from chainfs.common.dataplane.buffers import BufferPool
from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing, data_address
from chainfs.common.rpc.mgmt_client import local_state_for
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.access import sync_source
from chainfs.storage_service.chunk_copy import Key, push_chunk, remove_remote, run_io
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.chunk_record import ChunkRecord, chunk_key, parse_key
from chainfs.storage_service.craq import LocalTarget
from chainfs.storage_service.failure_config import FailureConfig

log = logging.getLogger(__name__)
S = TypeVar("S")
D = TypeVar("D")

_FORWARD_TIMEOUT_S = 30.0  # one whole-chunk send (64 MiB at worst)


class RateLimiter:
    """Token bucket in bytes/s shared by all passes of a node (0 = unlimited)."""

    def __init__(self, rate_bytes_per_s: int) -> None:
        self.rate = rate_bytes_per_s
        self._next = time.monotonic()
        self._changed = asyncio.Event()  # set (and replaced) by set_rate

    def set_rate(self, rate_bytes_per_s: int) -> None:
        """A new rate from now on; sends waiting under the old one go at once (a
        rebalance's unlimited rate reaches a node just after its first sends)."""
        self.rate = rate_bytes_per_s
        self._next = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def consume(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start > now:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), start - now)


predecessor = sync_source  # the sync source of a target (see access.sync_source)


# ---- the paged merge-compare ------------------------------------------------------

# A page source: ``fetch(after)`` -> up to one page of (key, item) with key >
# ``after`` (None = from the start), in key order, and whether it was the last.
PageFetch = Callable[[Key | None], Awaitable[tuple[list[tuple[Key, S]], bool]]]


class _Cursor(Generic[S]):
    """One side of the merge: holds one page at a time."""

    def __init__(self, fetch: PageFetch[S], what: str) -> None:
        self._fetch = fetch
        self._what = what
        self._page: list[tuple[Key, S]] = []
        self._pos = 0
        self._last: Key | None = None
        self._done = False
        self.pages = 0
        self.max_page = 0

    async def peek(self) -> tuple[Key, S] | None:
        while self._pos >= len(self._page):
            if self._done:
                return None
            page, last = await self._fetch(self._last)
            self.pages += 1
            self.max_page = max(self.max_page, len(page))
            for k, _ in page:  # the merge is only right over sorted, advancing keys
                if self._last is not None and k <= self._last:
                    raise ChainfsError(
                        Code.INTERNAL,
                        f"{self._what} listing out of order at {k} after {self._last}",
                    )
                self._last = k
            self._page, self._pos, self._done = page, 0, last or not page
        return self._page[self._pos]

    def advance(self) -> None:
        self._pos += 1
        if self._pos >= len(self._page):
            self._page, self._pos = [], 0  # let the page go before the next is fetched


async def merge_pages(
    source: PageFetch[S], dest: PageFetch[D]
) -> AsyncIterator[tuple[Key, S | None, D | None]]:
    """Every key of either listing once, in key order, with what each side holds.

    At most one page of each side is held at a time.
    """
    src, dst = _Cursor(source, "source"), _Cursor(dest, "target")
    while True:
        s = await src.peek()
        d = await dst.peek()
        if s is None and d is None:
            return
        if d is None or (s is not None and s[0] < d[0]):
            assert s is not None
            yield s[0], s[1], None
            src.advance()
        elif s is None or d[0] < s[0]:
            yield d[0], None, d[1]
            dst.advance()
        else:
            yield s[0], s[1], d[1]
            src.advance()
            dst.advance()


def needs_send(rec: ChunkRecord | None, meta: sp.ChunkMeta | None) -> bool:
    """Must the source's committed chunk ``rec`` go to a target holding ``meta``?"""
    if rec is None or rec.committed_version == 0:
        return False  # nothing committed (a pending-only chunk): writes will carry it
    if meta is None:
        return True
    return (
        meta.committed_version != rec.committed_version
        or meta.crc32c != rec.crc32c
        or meta.length != rec.length
        or rec.chain_version > meta.chain_version
    )


def source_page(
    engine: ChunkEngine, after: Key | None, limit: int
) -> tuple[list[tuple[Key, ChunkRecord]], bool]:
    """One page of a local target's chunk records after ``after`` (runs in an I/O thread)."""
    begin = chunk_key(*after) + b"\0" if after is not None else b"C"
    out: list[tuple[Key, ChunkRecord]] = []
    for key, rec in engine.iter_records(begin):
        if len(out) >= limit:
            return out, False
        out.append((parse_key(key), rec))
    return out, True


def needs_action(rec: ChunkRecord | None, meta: sp.ChunkMeta | None) -> bool:
    """Does a listed pair (source record, target meta) need a send or a remove?"""
    if needs_send(rec, meta):
        return True
    return meta is not None and (
        rec is None or (rec.committed_version == 0 and not rec.has_pending)
    )


@dataclass
class _Progress:
    bytes_left: int = 0
    rate_bytes_per_s: int = 0


class SyncReceiver:
    """The syncing side: remembers reports, answers local states for heartbeats."""

    def __init__(
        self, routing: Callable[[], Routing | None], on_done: Callable[[], None] | None = None
    ) -> None:
        """``on_done``: called when a target's sync first completes (heartbeat it now)."""
        self._routing = routing
        self._on_done = on_done
        self.done: set[int] = set()
        self.progress: dict[int, _Progress] = {}

    def public_state(self, target_id: int) -> int:
        r = self._routing()
        if r is None:
            return mp.PUBLIC_STATE_UNSPECIFIED
        t = r.targets.get(target_id)
        return t.public_state if t is not None else mp.PUBLIC_STATE_UNSPECIFIED

    def heartbeat(self, target_id: int, used: int, cap: int) -> mp.TargetHeartbeat:
        state = self.public_state(target_id)
        if state != mp.SYNCING:
            # A finished sync only counts while syncing; a new absence needs a new one.
            self.done.discard(target_id)
            self.progress.pop(target_id, None)
        p = self.progress.get(target_id, _Progress())
        return mp.TargetHeartbeat(
            target_id=target_id,
            local_state=local_state_for(state, sync_done=target_id in self.done),  # type: ignore[arg-type]
            used_bytes=used,
            capacity_bytes=cap,
            sync_bytes_left=p.bytes_left,
            sync_rate_bytes_per_s=p.rate_bytes_per_s,
        )

    def handle_report(
        self, rep: sp.SyncReportReq, local_targets: dict[int, LocalTarget]
    ) -> sp.SyncReportRsp:
        if rep.target_id not in local_targets:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {rep.target_id} is not on this node")
        state = self.public_state(rep.target_id)
        if state != mp.SYNCING:
            raise ChainfsError(
                Code.STALE_CHAIN_VERSION,
                f"target {rep.target_id} is {mp.PublicTargetState.Name(state)} here, "  # type: ignore[arg-type]
                "not syncing",
            )
        self.progress[rep.target_id] = _Progress(rep.bytes_left, rep.rate_bytes_per_s)
        if rep.done:
            first = rep.target_id not in self.done
            self.done.add(rep.target_id)
            if first:
                log.info("target %d: resync from %d done", rep.target_id, rep.from_target)
                if self._on_done is not None:
                    self._on_done()  # mgmtd makes it serving on the heartbeat saying so
            self.progress[rep.target_id] = _Progress(0, rep.rate_bytes_per_s)
        return sp.SyncReportRsp()


class Resyncer(Periodic):
    """The source side: one task per (local serving target, syncing successor).

    Each round (every ``resync_scan_interval_ms``) starts the syncs the routing
    now asks of this node and stops those it no longer does; the syncs run as
    their own tasks, so a long one never delays the next round.
    """

    name = "resync"

    def __init__(
        self,
        config: FailureConfig,
        targets: dict[int, LocalTarget],
        routing: Callable[[], Routing | None],
        client: DataClient,
        executor: Executor,
        fenced: Callable[[], bool],
        credential: cpb.Credential | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        """``credential``: this node's, for the destination's StorageControl.
        ``on_start``: called when syncs start (heartbeat now: its answer carries the
        rate of a rebalance run, which must not wait for the next interval)."""
        super().__init__(config.resync_scan_interval_ms / 1000)
        self._on_start = on_start
        self.credential = credential
        self.config = config
        self.targets = targets
        self._routing = routing
        self.client = client
        self.executor = executor
        self.fenced = fenced
        self.limiter = RateLimiter(config.resync_rate_bytes_per_s)
        # Chunks are read into these (all syncs); unmapped when no sync runs.
        self.buffers = BufferPool(config.resync_buffer_bytes, config.resync_buffer_bytes)
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.finished: dict[tuple[int, int], int] = {}  # (source, dest) -> chain version done
        self.bytes_sent = 0

    def set_rate(self, rate_bytes_per_s: int | None) -> None:
        """Limit sends to this rate (0 = unlimited); None = the configured rate."""
        rate = self.config.resync_rate_bytes_per_s if rate_bytes_per_s is None else rate_bytes_per_s
        if rate != self.limiter.rate:
            log.info("resync rate now %d bytes/s (0 = unlimited)", rate)
            self.limiter.set_rate(rate)

    # ---- scheduling ----------------------------------------------------------

    async def stop(self) -> None:
        await super().stop()  # no new syncs start after this
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.tasks.clear()

    def wanted(self, routing: Routing) -> dict[tuple[int, int], int]:
        """(local source, syncing dest) -> chain id, for every sync this node must drive."""
        out: dict[tuple[int, int], int] = {}
        for chain_id, chain in routing.chains.items():
            for tid in chain.targets:
                t = routing.targets.get(tid)
                if t is None or t.public_state != mp.SYNCING:
                    continue
                src = predecessor(routing, chain, int(tid))
                if src is not None and src in self.targets:
                    out[(src, int(tid))] = int(chain_id)
        return out

    async def round(self) -> bool:
        self._schedule()
        return False

    def _schedule(self) -> None:
        routing = self._routing()
        want = self.wanted(routing) if routing is not None and not self.fenced() else {}
        for key, task in list(self.tasks.items()):
            if key not in want or task.done():
                if not task.done():
                    log.info("resync %d -> %d no longer wanted; stopping", *key)
                    task.cancel()
                del self.tasks[key]
        assert routing is not None or not want
        started = False
        for key, chain_id in want.items():
            if key in self.tasks:
                continue
            version = routing.chains[chain_id].chain_version if routing is not None else 0
            if self.finished.get(key) == version:
                continue  # done for this chain version; the target reports UPTODATE
            self.tasks[key] = asyncio.get_running_loop().create_task(
                self._drive(key[0], key[1], chain_id)
            )
            started = True
        if started and self._on_start is not None:
            self._on_start()
        if not self.tasks:
            self.buffers.trim()

    async def _drive(self, src: int, dest: int, chain_id: int) -> None:
        """Sync passes until one completes (retrying after failures)."""
        while True:
            try:
                version = await self._sync_pass(src, dest, chain_id)
                self.finished[(src, dest)] = version
                return
            except asyncio.CancelledError:
                raise
            except ChainfsError as e:
                log.warning("resync %d -> %d failed: %s; retrying", src, dest, e)
            except Exception:
                log.exception("resync %d -> %d failed; retrying", src, dest)
            await asyncio.sleep(self.config.resync_retry_ms / 1000)

    # ---- one pass --------------------------------------------------------------

    def _current(self, src: int, dest: int, chain_id: int) -> tuple[Routing, mp.ChainInfo]:
        """Routing, re-checked before every step: still syncing, still our job."""
        if self.fenced():
            raise ChainfsError(Code.FENCED, "node is fenced: resync paused")
        routing = self._routing()
        if routing is None:
            raise ChainfsError(Code.UNAVAILABLE, "no routing info")
        chain = routing.chains.get(chain_id)
        t = routing.targets.get(dest)
        if chain is None or t is None or t.public_state != mp.SYNCING:
            raise ChainfsError(Code.STALE_CHAIN_VERSION, f"target {dest} is no longer syncing")
        if predecessor(routing, chain, dest) != src:
            raise ChainfsError(Code.STALE_CHAIN_VERSION, f"target {src} no longer feeds {dest}")
        return routing, chain

    def _source_pages(self, target: LocalTarget) -> PageFetch[ChunkRecord]:
        batch = self.config.resync_batch_chunks

        async def fetch(after: Key | None) -> tuple[list[tuple[Key, ChunkRecord]], bool]:
            return await run_io(self.executor, source_page, target.engine, after, batch)

        return fetch

    def _dest_pages(self, control: StorageControl, dest: int) -> PageFetch[sp.ChunkMeta]:
        batch = self.config.resync_batch_chunks

        async def fetch(after: Key | None) -> tuple[list[tuple[Key, sp.ChunkMeta]], bool]:
            cursor = chunk_key(*after) if after is not None else b""
            rsp = await control.chunk_meta_page(dest, cursor, batch)
            page = [((m.chunk.inode, m.chunk.index), m) for m in rsp.chunks]
            return page, not rsp.next

        return fetch

    async def _count_bytes(
        self, src_pages: PageFetch[ChunkRecord], dst_pages: PageFetch[sp.ChunkMeta]
    ) -> int:
        """Bytes the pass will send (metadata only, one page of each side at a time)."""
        total = 0
        async for _, rec, meta in merge_pages(src_pages, dst_pages):
            if needs_send(rec, meta):
                assert rec is not None
                total += rec.length
        return total

    async def _sync_pass(self, src: int, dest: int, chain_id: int) -> int:
        routing, chain = self._current(src, dest, chain_id)
        node = routing.node_of_target(dest)
        target = self.targets[src]
        started = time.monotonic()
        control = StorageControl(node.rpc_address, _FORWARD_TIMEOUT_S, self.credential)
        try:
            log.info("resync %d -> %d (chain %d): comparing chunk lists", src, dest, chain_id)
            src_pages = self._source_pages(target)
            dst_pages = self._dest_pages(control, dest)
            left = await self._count_bytes(src_pages, dst_pages)
            counted = time.monotonic()
            sent, sent_chunks, removed = await self._copy(
                src, dest, chain_id, target, src_pages, dst_pages, left, counted
            )
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError, RuntimeError):
                await control.close()
        await self._report(src, dest, chain_id, True, 0, sent, counted)
        log.info(
            "resync %d -> %d (chain %d) done: %d chunks (%d bytes) sent, %d removed, %.2fs "
            "(%.2fs of it counting)",
            src,
            dest,
            chain_id,
            sent_chunks,
            sent,
            removed,
            time.monotonic() - started,
            counted - started,
        )
        return int(chain.chain_version)

    async def _report(
        self, src: int, dest: int, chain_id: int, done: bool, left: int, sent: int, since: float
    ) -> None:
        elapsed = max(time.monotonic() - since, 1e-3)
        routing, chain = self._current(src, dest, chain_id)
        req = sp.SyncReportReq(
            chain_id=chain_id,
            chain_version=chain.chain_version,
            target_id=dest,
            from_target=src,
            done=done,
            bytes_left=0 if done else max(left, 0),
            rate_bytes_per_s=int(sent / elapsed),
        )
        reply = await self.client.request(
            data_address(routing.node_of_target(dest)),
            sp.SYNC_REPORT,
            req.SerializeToString(),
            timeout_s=_FORWARD_TIMEOUT_S,
        )
        sp.SyncReportRsp.FromString(bytes(reply.header))

    async def _copy(
        self,
        src: int,
        dest: int,
        chain_id: int,
        target: LocalTarget,
        src_pages: PageFetch[ChunkRecord],
        dst_pages: PageFetch[sp.ChunkMeta],
        left: int,
        since: float,
    ) -> tuple[int, int, int]:
        """The sending merge: (bytes sent, chunks sent, chunks removed)."""
        sent = sent_chunks = removed = 0
        last_report = time.monotonic()
        reporting = False
        report_every = self.config.resync_report_interval_ms / 1000
        await self._report(src, dest, chain_id, False, left, 0, since)

        async def progress() -> None:
            """A progress report when one is due (one at a time; sends go on meanwhile)."""
            nonlocal last_report, reporting
            if reporting or time.monotonic() - last_report < report_every:
                return
            reporting = True
            try:
                last_report = time.monotonic()
                await self._report(src, dest, chain_id, False, left - sent, sent, since)
            finally:
                reporting = False

        # At most resync_parallel_chunks chunks in flight (each under its lock).
        slots = asyncio.Semaphore(self.config.resync_parallel_chunks)

        async def one(key: Key, listed: sp.ChunkMeta | None) -> None:
            nonlocal sent, sent_chunks, removed
            try:
                async with target.locks.held(key):
                    routing, chain = self._current(src, dest, chain_id)
                    node = routing.node_of_target(dest)
                    rec = target.engine.get(*key)  # again, under the lock: the page may be stale
                    if rec is None or (rec.committed_version == 0 and not rec.has_pending):
                        if listed is not None:
                            await remove_remote(
                                self.client, node, chain, src, dest, key, _FORWARD_TIMEOUT_S
                            )
                            removed += 1
                    elif needs_send(rec, listed):
                        if listed is not None and listed.committed_version >= rec.committed_version:
                            await remove_remote(
                                self.client, node, chain, src, dest, key, _FORWARD_TIMEOUT_S
                            )
                        n = await push_chunk(
                            self.client,
                            self.executor,
                            target.engine,
                            node,
                            chain,
                            src,
                            dest,
                            key,
                            rec,
                            _FORWARD_TIMEOUT_S,
                            self.limiter.consume,
                            self.buffers,
                        )
                        sent += n
                        sent_chunks += 1
                        self.bytes_sent += n
                if sent:
                    await progress()
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as tg:  # the first failure cancels the rest
                async for key, rec, meta in merge_pages(src_pages, dst_pages):
                    if not needs_action(rec, meta):
                        continue  # in step when listed: later writes reach the target anyway
                    await slots.acquire()
                    tg.create_task(one(key, meta))
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return sent, sent_chunks, removed
