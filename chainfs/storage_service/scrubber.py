"""Integrity: repair corrupt replicas from healthy ones; a background scrubber finds them.

A replica whose chunk file no longer matches the CRC32C in its record (a bit
flip on disk, a torn file) answers CHECKSUM_MISMATCH to reads (the client asks
another replica). The read path and the scrubber queue such a chunk for
:class:`Repairer`, which, under the chunk lock, confirms the damage and copies
the same committed version from a healthy replica of the chain
(:meth:`chunk_copy.ChunkCopier.pull`, the primitive `chainfs fsck --repair`
uses too): the file is replaced atomically (temp file + fsync + rename; the
record is unchanged, so versions stay in step along the chain).

When no replica holds a good copy the chunk is *lost*: reads keep answering
EIO, the node logs it once and counts it per target (``GetTargets``,
``QueryChunk``). Failed repairs retry with exponential backoff, a bounded number
of times, then wait (parked) until a good copy may exist again: the local
record changes (the chunk was rewritten or removed), the chain changes (a
target came back), or a replica is found good (a scrub or ``VerifyChunks``
reads it intact; the node holding it then asks its peers to repair from it).

:class:`Scrubber` re-reads every committed chunk of every local target with CRC
verification at a bounded rate (``scrub_rate_bytes_per_s``), one pass, a pause
(``scrub_round_pause_ms``), the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from chainfs.common.background import Periodic
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.chunk_copy import ChunkCopier, PullResult, run_io
from chainfs.storage_service.chunk_engine import ChunkEngine, ChunkRecord, parse_key
from chainfs.storage_service.craq import LocalTarget, record_to_meta
from chainfs.storage_service.failure_config import FailureConfig
from chainfs.storage_service.resync import RateLimiter

log = logging.getLogger(__name__)
Item = tuple[int, int, int]  # (target id, inode, chunk index)
Signature = tuple[int, int, int]  # (committed version, length, crc32c) of a record


def signature(rec: ChunkRecord | None) -> Signature | None:
    return None if rec is None else (rec.committed_version, rec.length, rec.crc32c)


@dataclass
class RepairEntry:
    """One damaged chunk replica and its repair schedule."""

    attempts: int = 0  # failed attempts since the last resume
    due: float = 0.0  # monotonic time of the next attempt; inf = parked
    lost: bool = False  # the last attempt found no good copy on any replica
    record: Signature | None = None  # the local record when the last attempt failed
    chain_version: int = 0  # the chain's version then


class Repairer(Periodic):
    """Repairs damaged chunk replicas from healthy ones, with bounded, backed-off retries."""

    name = "repair"

    def __init__(
        self, config: FailureConfig, targets: dict[int, LocalTarget], copier: ChunkCopier
    ) -> None:
        super().__init__(config.repair_retry_min_ms / 1000)
        self.config = config
        self.targets = targets
        self.copier = copier
        self.entries: dict[Item, RepairEntry] = {}  # bounded by repair_queue_entries
        self.repaired = 0
        self.failed = 0
        self.dropped = 0  # requests refused because the queue was full
        self._asking: set[asyncio.Task[None]] = set()  # peers being told of a good copy

    # ---- what other parts of the node call ------------------------------------------

    def request(self, target_id: int, inode: int, index: int) -> bool:
        """Queue a damaged chunk for repair; True if it was not known already.

        A chunk already queued (waiting for its next try, or parked as lost)
        is left alone: peers reading a damaged replica during their own repair
        must not start another round of repairs.
        """
        item = (target_id, inode, index)
        if item in self.entries or target_id not in self.targets:
            return False
        if len(self.entries) >= self.config.repair_queue_entries:
            self.dropped += 1  # logged once per round, not once per request
            return False
        self.entries[item] = RepairEntry(due=time.monotonic())
        self.wake()
        return True

    def found_good(self, target_id: int, inode: int, index: int) -> None:
        """A read found this replica intact: if it was waiting for repair, settle it now
        (which also tells the peers of a lost chunk to repair from it)."""
        entry = self.entries.get((target_id, inode, index))
        if entry is not None:
            self._resume(entry)

    def lost_chunks(self, target_id: int) -> int:
        return sum(1 for (t, _, _), e in self.entries.items() if t == target_id and e.lost)

    def is_lost(self, target_id: int, inode: int, index: int) -> bool:
        entry = self.entries.get((target_id, inode, index))
        return entry is not None and entry.lost

    async def repair_now(self, target_id: int, key: tuple[int, int], prefer: int) -> PullResult:
        """fsck --repair and a peer's request: copy ``key`` from the healthy replica now."""
        target = self.targets[target_id]
        async with target.locks.held(key):
            got = await self.copier.pull(target_id, key, prefer=prefer)
        self._settled((target_id, *key))
        return got

    # ---- the background loop ---------------------------------------------------------

    async def round(self) -> bool:
        if self.dropped:
            log.warning("repair queue full: %d damaged chunks left unqueued", self.dropped)
            self.dropped = 0
        await self._watch_parked()
        now = time.monotonic()
        for item in [i for i, e in self.entries.items() if e.due <= now]:
            await self._attempt(item)
        return False

    async def _attempt(self, item: Item) -> None:
        try:
            await self.repair(*item)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed(item, e)
        else:
            self._settled(item)

    async def repair(self, target_id: int, inode: int, index: int) -> bool:
        """Repair one chunk if it is damaged; True when a file was replaced."""
        target = self.targets[target_id]
        key = (inode, index)
        async with target.locks.held(key):
            rec = target.engine.get(inode, index)
            if rec is None or rec.has_pending or rec.committed_version == 0 or rec.length == 0:
                return False
            # Only the same committed version will do: ours is current, just damaged.
            got = await self.copier.pull(target_id, key, exact_version=rec.committed_version)
            if got.copied:
                self.repaired += 1
            return got.copied

    def _settled(self, item: Item) -> None:
        """The replica is healthy (repaired, found intact, or gone)."""
        entry = self.entries.pop(item, None)
        if entry is None or not entry.lost:
            return
        tid, inode, index = item
        log.warning("chunk (%d, %d) of target %d is no longer lost", inode, index, tid)
        # Peers that found no good copy may have given up: they can copy this one now.
        task = asyncio.get_running_loop().create_task(
            self.copier.ask_peers_to_repair(tid, (inode, index))
        )
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def stop(self) -> None:
        await super().stop()
        for task in list(self._asking):
            task.cancel()
        await asyncio.gather(*self._asking, return_exceptions=True)

    def _failed(self, item: Item, error: Exception) -> None:
        entry = self.entries.get(item)
        if entry is None:
            return
        tid, inode, index = item
        self.failed += 1
        entry.attempts += 1
        entry.record = signature(self.targets[tid].engine.get(inode, index))
        entry.chain_version = self.copier.chain_version(tid)
        no_good_copy = isinstance(error, ChainfsError) and error.code == Code.CHECKSUM_MISMATCH
        if no_good_copy and not entry.lost:
            log.error(
                "chunk (%d, %d) of target %d is lost: no replica holds a good copy (%s)",
                inode,
                index,
                tid,
                error,
            )
        elif not no_good_copy:
            log.warning(
                "repair of chunk (%d, %d) on target %d failed (attempt %d of %d): %s",
                inode,
                index,
                tid,
                entry.attempts,
                self.config.repair_attempts_max,
                error,
            )
        entry.lost = entry.lost or no_good_copy
        if entry.attempts >= self.config.repair_attempts_max:
            entry.due = math.inf  # parked until a good copy may exist (see _watch_parked)
            return
        delay_ms = self.config.repair_retry_min_ms * 2 ** (entry.attempts - 1)
        entry.due = time.monotonic() + min(delay_ms, self.config.repair_retry_max_ms) / 1000

    async def _watch_parked(self) -> None:
        """Resume a waiting repair whose chunk was rewritten or whose chain changed."""
        waiting = [(i, e) for i, e in self.entries.items() if e.attempts]
        if not waiting:
            return
        records = await run_io(self.copier.executor, self._records, [i for i, _ in waiting])
        for (item, entry), rec in zip(waiting, records, strict=True):
            if rec != entry.record or self.copier.chain_version(item[0]) != entry.chain_version:
                self._resume(entry)

    def _records(self, items: list[Item]) -> list[Signature | None]:
        return [
            signature(self.targets[t].engine.get(i, x)) if t in self.targets else None
            for t, i, x in items
        ]

    def _resume(self, entry: RepairEntry) -> None:
        entry.attempts = 0
        entry.due = time.monotonic()
        self.wake()


class Scrubber(Periodic):
    """Background CRC32C re-check of every committed chunk, at a bounded rate."""

    name = "scrub"

    def __init__(
        self,
        config: FailureConfig,
        targets: dict[int, LocalTarget],
        repairer: Repairer,
        executor: Executor,
        fenced: Callable[[], bool],
    ) -> None:
        super().__init__(config.scrub_round_pause_ms / 1000)
        self.config = config
        self.targets = targets
        self.repairer = repairer
        self.executor = executor
        self.fenced = fenced
        self.limiter = RateLimiter(config.scrub_rate_bytes_per_s)
        self.checked_bytes = 0
        self.found_corrupt = 0

    def start(self) -> None:
        if self.config.scrub_rate_bytes_per_s > 0:
            super().start()

    async def round(self) -> bool:
        """One pass over every local target."""
        started = time.monotonic()
        for tid in list(self.targets):
            try:
                await self.scrub_target(tid)
            except ChainfsError as e:
                log.warning("scrub of target %d failed: %s", tid, e)
        log.debug("scrub pass %d took %.1fs", self.rounds + 1, time.monotonic() - started)
        return False

    @staticmethod
    def _page(engine: ChunkEngine, begin: bytes, n: int) -> list[tuple[bytes, ChunkRecord]]:
        return [kv for _, kv in zip(range(n), engine.iter_records(begin), strict=False)]

    async def scrub_target(self, tid: int) -> None:
        target = self.targets[tid]
        after = b""
        page = 1024
        while True:
            begin = after + b"\0" if after else b"C"
            batch = await run_io(self.executor, self._page, target.engine, begin, page)
            if not batch:
                return
            for key, rec in batch:
                after = key
                if rec.committed_version == 0 or rec.has_pending or rec.length == 0:
                    continue
                if self.fenced():
                    return  # the node serves nothing now; the next pass starts over
                await self.limiter.consume(rec.length)
                if await self.check(tid, *parse_key(key)) == sp.VERDICT_OK:
                    self.checked_bytes += rec.length
            if len(batch) < page:
                return

    async def check(
        self, tid: int, inode: int, index: int, queue_repair: bool = True
    ) -> sp.ChunkVerdict.ValueType:
        """Read one chunk with CRC verification; tell the repairer what was found
        (damage only with ``queue_repair``: fsck reports damage and repairs it itself)."""
        engine = self.targets[tid].engine
        rec = engine.get(inode, index)
        if rec is None or rec.committed_version == 0:
            return sp.VERDICT_ABSENT
        if rec.has_pending:
            return sp.VERDICT_BUSY
        try:
            await run_io(self.executor, engine.read, inode, index, 0, rec.length, True)
        except ChainfsError as e:
            if e.code == Code.NOT_COMMITTED:
                return sp.VERDICT_BUSY
            if e.code != Code.CHECKSUM_MISMATCH:
                raise
            self.found_corrupt += 1
            if queue_repair and self.repairer.request(tid, inode, index):
                log.warning("scrub: chunk (%d, %d) of target %d is corrupt", inode, index, tid)
            return sp.VERDICT_DAMAGED
        self.repairer.found_good(tid, inode, index)
        return sp.VERDICT_OK

    async def verify(self, req: sp.VerifyChunksReq, max_chunks: int) -> sp.VerifyChunksRsp:
        """VerifyChunks (fsck --verify-data): check chunks of one local target in place."""
        if req.target_id not in self.targets:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {req.target_id} is not on this node")
        if len(req.chunks) > max_chunks:
            raise ChainfsError(
                Code.EINVAL, f"{len(req.chunks)} chunks in one request; at most {max_chunks}"
            )
        engine = self.targets[req.target_id].engine
        rsp = sp.VerifyChunksRsp()
        for c in req.chunks:
            verdict = await self.check(req.target_id, c.inode, c.index, queue_repair=False)
            rec = engine.get(c.inode, c.index)
            out = rsp.results.add(chunk=c, verdict=verdict)
            if rec is not None:
                out.meta.CopyFrom(record_to_meta(c.inode, c.index, rec))
        return rsp
