"""The client's chunk I/O engine: one per connection, shared by files, the KV cache and FUSE.

``ChunkIO`` holds the connection's clients (mgmtd, routing cache, meta,
storage) and moves file bytes: a large read is cut at chunk boundaries into
groups sent in parallel (bounded per connection), each group batched per
storage node by the storage client, which picks a serving replica at random,
fails over to another replica and refreshes routing on stale-version answers.
Bytes land in the caller's buffer; holes read as zeros. Writes go one chunk
piece at a time, their buffers bounded by the connection's byte budget.

It also keeps the meta sessions of open files: one shared read session per
inode however many read-only opens of this connection have it, so a file
another client unlinks stays readable until the last of them closes.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from chainfs.client import metrics as client_metrics
from chainfs.client.budget import ByteBudget
from chainfs.client.caps import CapabilityCache
from chainfs.client.config import ClientConfig
from chainfs.client.layout import Layout, Piece, split
from chainfs.common.dataplane import DataPlaneConfig
from chainfs.common.dataplane.sync_client import SyncDataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import MetaClient
from chainfs.common.rpc.mgmt_client import FramedMgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import ReadReq, StorageClient, cut_chunks

log = logging.getLogger(__name__)

# (inode, its layout, the piece of the range, the destination of the whole range)
ReadWork = tuple[int, Layout, Piece, memoryview]

_ZEROS = bytes(1 << 20)  # source for zero-filling holes without allocating


@dataclass
class OpenHandle:
    """What meta told us about an open file."""

    path: str
    inode: int
    layout: Layout
    size: int
    session: Any = None  # meta's write session (None when opened read-only)
    read_session: bool = False  # counted on the connection's shared read session of the inode


class ChunkIO:
    """The clients of one connection and the chunk reads and writes made through them."""

    def __init__(
        self,
        config: ClientConfig,
        mgmt: FramedMgmtClient,
        routing: RoutingCache,
        meta: MetaClient,
        storage: StorageClient,
    ) -> None:
        self.config = config
        self.mgmt = mgmt
        self.routing = routing
        self.meta = meta
        self.storage = storage
        self.budget = ByteBudget(config.write_buffer_budget_bytes)
        self._read_sem = asyncio.Semaphore(config.max_inflight_reads)
        # Read sessions at meta, one per inode: ino -> [session id, open handles using it].
        self._read_sessions: dict[int, list[Any]] = {}
        self._read_session_paths: dict[str, int] = {}  # path opened -> ino of a held session
        # Sessions to end at meta in the background (close does not wait for it):
        # one sender ends, in one call, all that queued while its last call ran.
        self._ends_queued: list[tuple[int, bytes]] = []
        self._ends_room = asyncio.Event()  # set when _ends_queued has room
        self._ends_sender: asyncio.Task[None] | None = None
        self._ends_go: asyncio.Event | None = None  # set: the sender goes now
        # Ends queued by callers' threads (queue_end_from_thread), under
        # _ends_lock: they leave with the next meta call made from a caller's
        # thread, or, by a timer the first of them arms, through the sender above.
        self._thread_ends: list[tuple[int, bytes]] = []
        self._thread_ends_armed = False
        self._ends_lock = threading.Lock()
        self._loop_soon: Callable[[Callable[[], object]], None] | None = None
        meta.before_call = self._send_ends_along
        meta.ends_along = self._take_ends_along
        meta.ends_unsent = self._thread_ends_unsent
        # Bytes asked of storage by reads since connect: by the loop's reads, and
        # by read_now and read_now_many from callers' threads (under _sync_lock).
        self.storage_read_bytes = 0
        self.sync_read_bytes = 0
        self._sync_lock = threading.Lock()
        # Bytes the files' read-ahead holds (fetched or in flight), bounded by config.
        self.read_ahead_held_bytes = 0
        self._address: str | None = None  # set by connect(): a forked child reconnects to it

    @property
    def caps_signed(self) -> bool:
        """Whether meta signs capabilities for this cluster (it sent one)."""
        caps = self.storage.caps
        return isinstance(caps, CapabilityCache) and caps.signed

    @classmethod
    async def connect(cls, address: str, config: ClientConfig) -> ChunkIO:
        """Reach mgmtd at ``address`` and learn the cluster; ConnectionError if unreachable."""
        config.validate()
        io = cls(config, *_clients(address, config))
        try:
            await io.routing.refresh()  # starts the routing watch too
        except ChainfsError as e:
            await io.close()
            if e.code in (Code.UNAUTHENTICATED, Code.EPERM):
                raise PermissionError(e.errno, f"chainfs at {address}: {e.message}") from None
            raise ConnectionError(
                errno.ECONNREFUSED if e.code == Code.UNAVAILABLE else e.errno,
                f"cannot connect to chainfs at {address} within "
                f"{config.connect_timeout_ms / 1000:g}s: {e.message}",
            ) from None
        io._address = address
        _engines.add(io)
        return io

    def _drop_inherited(self) -> None:
        """In a fork()ed child: leave the parent's clients untouched (their
        sockets and event loop are the parent's; closing them here would
        unregister the parent's sockets from the epoll instance both share)
        and make fresh ones that connect on first use. Sessions held are the
        parent's: the child takes its own."""
        assert self._address is not None, "only connected engines are reset"
        _inherited.append((self.mgmt, self.routing, self.meta, self.storage, self._ends_sender))
        self.mgmt, self.routing, self.meta, self.storage = _clients(self._address, self.config)
        self.budget = ByteBudget(self.config.write_buffer_budget_bytes)
        self._read_sem = asyncio.Semaphore(self.config.max_inflight_reads)
        self._read_sessions = {}
        self._read_session_paths = {}
        # The parent ends the sessions it queued; the child's loop is new.
        self._ends_queued = []
        self._ends_room = asyncio.Event()
        self._ends_sender = None
        self._ends_go = None
        self._thread_ends = []
        self._thread_ends_armed = False
        self._ends_lock = threading.Lock()
        self.meta.before_call = self._send_ends_along
        self.meta.ends_along = self._take_ends_along
        self.meta.ends_unsent = self._thread_ends_unsent
        self.read_ahead_held_bytes = 0
        self._sync_lock = threading.Lock()  # the parent's may have been held at fork

    async def close(self) -> None:
        """Wait for read sessions being ended, then close every client."""
        self._queue_ends(self._take_thread_ends())
        if self._ends_sender is not None:  # each call bounded by the meta call timeout
            if self._ends_go is not None:
                self._ends_go.set()  # closing: end what is queued now, not after the delay
            await self._ends_sender
        await self.routing.stop()
        await self.meta.aclose()
        await self.storage.close()
        await self.mgmt.close()

    # -- reads -----------------------------------------------------------------
    async def read_into(self, h: OpenHandle, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the file's bytes at ``offset`` (holes as zeros)."""
        if len(out):
            await self.read_pieces(
                [(h.inode, h.layout, p, out) for p in split(h.layout, offset, len(out))]
            )

    async def read_pieces(self, work: list[ReadWork]) -> None:
        """Read chunk pieces into their destinations: groups in parallel, bounded."""
        if not work:
            return
        groups = self._groups(work)
        if len(groups) == 1:
            await self._read_group(groups[0])
            return
        it = iter(groups)

        async def worker() -> None:
            for g in it:
                await self._read_group(g)

        workers = [
            asyncio.ensure_future(worker())
            for _ in range(min(len(groups), self.config.max_inflight_reads))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise

    def _groups(self, work: list[ReadWork]) -> list[list[tuple[ReadReq, memoryview]]]:
        """Cut the pieces into groups of at most ``read_group_bytes`` / ``read_group_ios``."""
        groups: list[list[tuple[ReadReq, memoryview]]] = []
        group: list[tuple[ReadReq, memoryview]] = []
        group_bytes = 0
        for ino, _layout, p, dest in work:
            target = dest[p.buf_offset : p.buf_offset + p.length]
            req = ReadReq(p.chain_id, ino, p.chunk_index, p.chunk_offset, p.length, target)
            group.append((req, target))
            group_bytes += p.length
            if (
                group_bytes >= self.config.read_group_bytes
                or len(group) >= self.config.read_group_ios
            ):
                groups.append(group)
                group, group_bytes = [], 0
        if group:
            groups.append(group)
        return groups

    async def _read_group(self, group: list[tuple[ReadReq, memoryview]]) -> None:
        self.storage_read_bytes += sum(req.length for req, _ in group)
        async with self._read_sem:
            with client_metrics.IO.observe("read"):
                got = await self.storage.read_batch([r for r, _ in group])
        client_metrics.READ_BYTES.inc(sum(len(data) for data in got))
        for (req, target), data in zip(group, got, strict=True):
            n = len(data)
            if n < req.length:  # a hole, or the end of a short chunk: zeros
                _zero(target, n, req.length)

    def read_now(self, sync: SyncDataClient, ino: int, layout: Layout, out: memoryview) -> bool:
        """Fill ``out`` with the file's first ``len(out)`` bytes from the calling
        thread (any thread; no event loop) when they sit in one chunk and one
        replica serves them cleanly (``StorageClient.read_now``); False, with
        nothing counted, for anything else: the caller then reads the usual way."""
        pieces = split(layout, 0, len(out))
        if len(pieces) != 1:
            return False
        p = pieces[0]
        req = ReadReq(p.chain_id, ino, p.chunk_index, p.chunk_offset, p.length, out)
        start = time.perf_counter()
        if self.storage.read_now(sync, req) is None:
            return False
        client_metrics.IO.record("read", time.perf_counter() - start)
        client_metrics.READ_BYTES.inc(p.length)
        with self._sync_lock:
            self.sync_read_bytes += p.length
        return True

    def read_now_many(
        self, sync: SyncDataClient, files: Sequence[tuple[int, Layout, memoryview]]
    ) -> list[bool]:
        """Per (inode, layout, out): fill ``out`` with the file's first ``len(out)``
        bytes from the calling thread (any thread; no event loop) when they sit
        in one chunk and one replica serves them cleanly
        (``StorageClient.read_now_many``: one frame per storage node, groups of
        at most ``read_group_ios`` reads and ``read_group_bytes`` one after the
        other, none started once ``sync.timeout_s`` has passed since the call
        began). False, with nothing counted, for anything else: the caller then
        reads those the usual way."""
        stop_at = time.monotonic() + sync.timeout_s
        done = [False] * len(files)
        at: list[int] = []  # positions in ``files`` of the reads in ``group``
        group: list[ReadReq] = []
        group_bytes = 0
        cfg = self.config
        for k, (ino, layout, out) in enumerate(files):
            pieces = split(layout, 0, len(out))
            if len(pieces) != 1:
                continue
            p = pieces[0]
            at.append(k)
            group.append(ReadReq(p.chain_id, ino, p.chunk_index, p.chunk_offset, p.length, out))
            group_bytes += p.length
            if group_bytes >= cfg.read_group_bytes or len(group) >= cfg.read_group_ios:
                if time.monotonic() >= stop_at:
                    return done  # the rest (unread) takes the usual way
                self._read_group_now(sync, at, group, done)
                at, group, group_bytes = [], [], 0
        if group and time.monotonic() < stop_at:
            self._read_group_now(sync, at, group, done)
        return done

    def _read_group_now(
        self, sync: SyncDataClient, at: list[int], group: list[ReadReq], done: list[bool]
    ) -> None:
        start = time.perf_counter()
        nbytes = 0
        for k, req, data in zip(at, group, self.storage.read_now_many(sync, group), strict=True):
            if data is not None:
                done[k] = True
                nbytes += req.length
        if not nbytes:
            return
        client_metrics.IO.record("read", time.perf_counter() - start)
        client_metrics.READ_BYTES.inc(nbytes)
        with self._sync_lock:
            self.sync_read_bytes += nbytes

    def take_read_ahead(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of the read-ahead budget; False (nothing taken) when full."""
        if self.read_ahead_held_bytes + nbytes > self.config.read_ahead_budget_bytes:
            return False
        self.read_ahead_held_bytes += nbytes
        return True

    def return_read_ahead(self, nbytes: int) -> None:
        assert 0 <= nbytes <= self.read_ahead_held_bytes, (nbytes, self.read_ahead_held_bytes)
        self.read_ahead_held_bytes -= nbytes

    # -- writes and lengths ----------------------------------------------------
    async def write_piece(self, h: OpenHandle, piece: Piece, data: bytearray) -> None:
        """Write one chunk piece to its chain (acknowledged by every replica)."""
        assert len(data) == piece.length, (len(data), piece)
        with client_metrics.IO.observe("write"):
            await self.storage.write(
                piece.chain_id, h.inode, piece.chunk_index, piece.chunk_offset, data,
                h.layout.chunk_size,
            )  # fmt: skip
        client_metrics.WRITE_BYTES.inc(len(data))

    async def write_parts(self, h: OpenHandle, offset: int, parts: Sequence[memoryview]) -> None:
        """Write ``parts`` one after the other at ``offset``, straight from the
        caller's buffers (no copy, so no write budget): one update per chunk, at
        most max_inflight_writes_per_file chunks in flight."""
        views = [p.cast("B") if p.format != "B" else p for p in parts]
        total = sum(len(v) for v in views)
        pieces = split(h.layout, offset, total)
        sem = asyncio.Semaphore(self.config.max_inflight_writes_per_file)

        async def one(piece: Piece) -> None:
            lo, hi = piece.buf_offset, piece.buf_offset + piece.length
            mine: list[memoryview] = []
            at = 0
            for v in views:  # the parts' slices inside [lo, hi) of the whole
                a, b = max(lo, at), min(hi, at + len(v))
                if a < b:
                    mine.append(v[a - at : b - at])
                at += len(v)
            async with sem:
                with client_metrics.IO.observe("write"):
                    await self.storage.write_parts(
                        piece.chain_id, h.inode, piece.chunk_index, piece.chunk_offset, mine,
                        h.layout.chunk_size,
                    )  # fmt: skip
            client_metrics.WRITE_BYTES.inc(piece.length)

        if len(pieces) == 1:
            await one(pieces[0])
            return
        tasks = [asyncio.ensure_future(one(p)) for p in pieces]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def sync_handle(self, h: OpenHandle, length: int, exact: bool) -> None:
        """Report the length written through ``h`` to meta (``exact``: ask storage, fsync)."""
        if h.session is None:
            return
        inode = await self.meta.sync(h.inode, h.session, length, exact=exact, wrote=True)
        h.size = inode.size

    async def cut_chunks(self, h: OpenHandle, length: int) -> None:
        """Drop the file's bytes at and past ``length`` from storage."""
        layout = h.layout
        await cut_chunks(
            self.storage, layout.chains, h.inode, layout.chunk_size, length,
            self.config.storage.max_parallel_nodes,
        )  # fmt: skip

    async def truncate_handle(self, h: OpenHandle, length: int) -> None:
        await self.meta.setattr(h.inode, size=length)
        h.size = length

    # -- sessions of open files ------------------------------------------------
    def wants_read_session(self, path: str) -> bool:
        """Whether an open of ``path`` must ask meta for a read session (none held for it)."""
        return path not in self._read_session_paths

    def read_session_opens(self) -> dict[int, int]:
        """Inode -> number of open handles sharing its read session."""
        return {ino: held[1] for ino, held in self._read_sessions.items()}

    async def hold_read_session(self, path: str, ino: int, session_id: bytes) -> None:
        """Count one more read-only open of ``ino`` on its shared read session."""
        held = self._read_sessions.get(ino)
        if held is not None:
            held[1] += 1
            self._read_session_paths[path] = ino
            if session_id:  # another path (a hard link) took a second one: not needed
                await self.end_session_later(ino, session_id)
            return
        if not session_id:
            # We held one for what this path named before; it names another file now.
            session_id = (await self.meta.open(ino, session=True)).session_id
            if ino in self._read_sessions:  # taken meanwhile by a concurrent open
                await self.hold_read_session(path, ino, session_id)
                return
        self._read_sessions[ino] = [session_id, 1]
        self._read_session_paths[path] = ino

    async def close_handle(self, h: OpenHandle, length: int, wrote: bool) -> None:
        """Release ``h``'s sessions: its share of the read session, its write session at meta.

        A write open that wrote nothing has no length to report (what it knows
        came from meta): its session ends in the background, so a create is one
        round trip for the caller."""
        if h.read_session:
            h.read_session = False
            await self._release_read_session(h.inode)
        if h.session is not None:
            if wrote:
                await self.meta.close(h.inode, h.session, length, wrote)
            else:
                await self.end_session_later(h.inode, h.session)

    async def _release_read_session(self, ino: int) -> None:
        held = self._read_sessions.get(ino)
        assert held is not None and held[1] > 0, (ino, held)
        held[1] -= 1
        if held[1] == 0:
            del self._read_sessions[ino]
            for path in [p for p, i in self._read_session_paths.items() if i == ino]:
                del self._read_session_paths[path]
            await self.end_session_later(ino, held[0])

    async def end_session_later(self, ino: int, session_id: bytes) -> None:
        """End a session that reports nothing at meta without making close wait
        (``close`` awaits it); waits only while max_background_session_ends are queued."""
        while len(self._ends_queued) >= self.config.max_background_session_ends:
            self._ends_room.clear()
            await self._ends_room.wait()
        with self._ends_lock:  # a caller's thread may take them along (_take_ends_along)
            self._ends_queued.append((ino, session_id))
        if self._ends_sender is None or self._ends_sender.done():
            self._ends_sender = asyncio.ensure_future(self._send_session_ends())

    def queue_end_from_thread(
        self, ino: int, session_id: bytes, loop_soon: Callable[[Callable[[], object]], None]
    ) -> bool:
        """From a caller's thread: end a session that reports nothing, without a
        hop to the loop. The end leaves with the next meta call a caller's thread
        makes (one more request in the same send, committed in the same batch),
        else after session_end_delay_ms through the loop's sender; ``loop_soon``
        wakes the loop for that timer, once per batch. False, with nothing done,
        when max_background_session_ends are queued already."""
        with self._ends_lock:
            bound = self.config.max_background_session_ends
            if len(self._ends_queued) + len(self._thread_ends) >= bound:
                return False
            self._loop_soon = loop_soon
            self._thread_ends.append((ino, session_id))
            arm, self._thread_ends_armed = not self._thread_ends_armed, True
        if arm:
            try:
                loop_soon(self._arm_thread_ends)
            except BaseException:
                with self._ends_lock:
                    self._thread_ends_armed = False
                    if (ino, session_id) in self._thread_ends:
                        self._thread_ends.remove((ino, session_id))
                        raise
                # Taken along by another thread's call meanwhile: ended.
        return True

    def _take_ends_along(self) -> list[tuple[int, bytes]]:
        """Every end queued (by callers' threads and on the loop), for a call
        from a caller's thread to carry."""
        with self._ends_lock:
            batch = self._thread_ends + self._ends_queued
            self._thread_ends, self._ends_queued = [], []
        return batch

    def _take_thread_ends(self) -> list[tuple[int, bytes]]:
        with self._ends_lock:
            batch, self._thread_ends = self._thread_ends, []
        return batch

    def _thread_ends_unsent(self, batch: list[tuple[int, bytes]]) -> None:
        """From a caller's thread: ends its call carried got no answer; the
        loop's sender ends them (it fails over and retries)."""
        soon = self._loop_soon
        if soon is not None:
            soon(functools.partial(self._queue_ends, batch))

    def _arm_thread_ends(self) -> None:
        asyncio.get_running_loop().call_later(
            self.config.session_end_delay_ms / 1000, self._flush_thread_ends
        )

    def _flush_thread_ends(self) -> None:
        """On the loop, a delay after the first of a batch: what no call carried."""
        with self._ends_lock:
            batch, self._thread_ends = self._thread_ends, []
            self._thread_ends_armed = False
        self._queue_ends(batch)

    def _queue_ends(self, batch: list[tuple[int, bytes]]) -> None:
        """On the loop: queue ends for the sender (room was taken when they queued)."""
        if batch:
            with self._ends_lock:
                self._ends_queued += batch
            if self._ends_sender is None or self._ends_sender.done():
                self._ends_sender = asyncio.ensure_future(self._send_session_ends())

    def _send_ends_along(self, method: str) -> None:
        """Another call to meta starts: the queued session ends leave with it.

        The sender wakes before that call's request is flushed, so both requests
        go out in one send, meta commits both in one synced batch and answers
        both in one send: one wakeup each way instead of two."""
        go = self._ends_go
        if go is not None and method != "EndSessions":
            go.set()

    async def _send_session_ends(self) -> None:
        go = self._ends_go = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(
            self.config.session_end_delay_ms / 1000, go.set
        )
        try:
            await go.wait()
        finally:
            timer.cancel()
            self._ends_go = None
        while True:
            with self._ends_lock:
                batch, self._ends_queued = self._ends_queued, []
            self._ends_room.set()  # taken here, or along a caller's thread's call
            if not batch:
                return
            try:
                await self.meta.end_sessions(batch)
            except ChainfsError as e:  # meta prunes them once we are gone
                log.warning("ending %d sessions failed: %s", len(batch), e)


def _clients(
    address: str, config: ClientConfig
) -> tuple[FramedMgmtClient, RoutingCache, MetaClient, StorageClient]:
    """A connection's clients, not yet connected (each connects on first use;
    no event loop needed). Only framed transports: they survive fork()."""
    timeout_s = config.connect_timeout_ms / 1000
    control_plane = DataPlaneConfig(tls=config.tls)  # mgmtd and meta: default bounds
    mgmt = FramedMgmtClient(
        address, timeout_s=timeout_s, dataplane=control_plane, credential=config.credential()
    )
    routing = RoutingCache(mgmt)
    routing.start_after_first_fetch()
    client_id = secrets.token_bytes(16)
    storage_config = config.storage
    if config.tls is not None:
        dp = replace(storage_config.dataplane, tls=config.tls)
        storage_config = replace(storage_config, dataplane=dp)
    meta = MetaClient(
        routing,
        client_id,
        timeout_s=config.meta_timeout_ms / 1000,
        attempt_timeout_s=config.meta_attempt_timeout_ms / 1000,
        transport="frame",
        dataplane=control_plane,
        credential=config.credential(),
        stat_coalesce_inflight=config.meta_stat_coalesce_inflight,
        stat_batch_max=config.meta_stat_batch_max,
    )

    async def fetch_caps(inodes: list[int], right: int) -> None:
        await meta.batch_stat(inodes, want_capability=right)  # replies reach caps.put

    caps = CapabilityCache(
        fetch_caps,
        config.capability_renew_before_ms,
        config.capability_cache_entries,
        config.batch_stat_paths,
    )
    meta.on_capability = caps.put
    # The user's token goes to storage too: capabilities authorize each chunk,
    # the token says who asks (an admin's fsck drops orphan chunks no file owns;
    # a revoked token stops at storage as at meta).
    storage = StorageClient(
        routing, client_id, storage_config, caps=caps, credential=config.credential()
    )
    return mgmt, routing, meta, storage


# Connected engines of this process; a fork()ed child resets each (see _drop_inherited).
_engines: weakref.WeakSet[ChunkIO] = weakref.WeakSet()
# What children dropped, kept referenced so no finalizer ever closes it here.
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    for io in list(_engines):
        io._drop_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _zero(view: memoryview, start: int, end: int) -> None:
    while start < end:
        n = min(end - start, len(_ZEROS))
        view[start : start + n] = _ZEROS[:n]
        start += n
