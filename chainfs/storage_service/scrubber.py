"""Integrity: repair corrupt replicas from healthy ones; a background scrubber finds them.

A replica whose chunk file no longer matches the CRC32C in its record (a bit
flip on disk, a torn file) answers CHECKSUM_MISMATCH to reads (the client asks
another replica). The read path and the scrubber queue such a chunk for
:class:`Repairer`, which, under the chunk lock, confirms the damage and copies
the same committed version from a healthy replica of the chain
(:meth:`chunk_copy.ChunkCopier.pull`, the primitive `chainfs fsck --repair`
uses too): the file is replaced atomically (temp file + fsync + rename; the
record is unchanged, so versions stay in step along the chain).

:class:`Scrubber` re-reads every committed chunk of every local target with CRC
verification at a bounded rate (``scrub_rate_bytes_per_s``), one pass, a pause
(``scrub_round_pause_ms``), the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service.chunk_copy import ChunkCopier, run_io
from chainfs.storage_service.chunk_engine import ChunkEngine, ChunkRecord, parse_key
from chainfs.storage_service.craq import LocalTarget
from chainfs.storage_service.failure_config import FailureConfig
from chainfs.storage_service.resync import RateLimiter

log = logging.getLogger(__name__)


class Repairer:
    """Repairs queued corrupt chunks, one at a time, from healthy replicas."""

    def __init__(
        self, config: FailureConfig, targets: dict[int, LocalTarget], copier: ChunkCopier
    ) -> None:
        self.config = config
        self.targets = targets
        self.copier = copier
        self.queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue(config.repair_queue_entries)
        self.queued: set[tuple[int, int, int]] = set()
        self.repaired = 0
        self.failed = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def request(self, target_id: int, inode: int, index: int) -> None:
        """Queue a chunk for repair (dropped, with a warning, when the queue is full)."""
        item = (target_id, inode, index)
        if item in self.queued or target_id not in self.targets:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning(
                "repair queue full; chunk (%d, %d) of target %d left", inode, index, target_id
            )
            return
        self.queued.add(item)

    async def _run(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                ok = await self.repair(*item)
                if ok:
                    self.repaired += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failed += 1
                log.warning(
                    "repair of chunk (%d, %d) on target %d failed: %s", item[1], item[2], item[0], e
                )
            finally:
                self.queued.discard(item)

    async def repair(self, target_id: int, inode: int, index: int) -> bool:
        """Repair one chunk if it is damaged; True when a file was replaced."""
        target = self.targets[target_id]
        key = (inode, index)
        await target.locks.acquire(key)
        try:
            rec = target.engine.get(inode, index)
            if rec is None or rec.has_pending or rec.committed_version == 0 or rec.length == 0:
                return False
            # Only the same committed version will do: ours is current, just damaged.
            got = await self.copier.pull(target_id, key, exact_version=rec.committed_version)
            return got.copied
        finally:
            target.locks.release(key)


class Scrubber:
    """Background CRC32C re-check of every committed chunk, at a bounded rate."""

    def __init__(
        self,
        config: FailureConfig,
        targets: dict[int, LocalTarget],
        repairer: Repairer,
        executor: Executor,
        fenced: Callable[[], bool],
    ) -> None:
        self.config = config
        self.targets = targets
        self.repairer = repairer
        self.executor = executor
        self.fenced = fenced
        self.limiter = RateLimiter(config.scrub_rate_bytes_per_s)
        self.checked_bytes = 0
        self.found_corrupt = 0
        self.passes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.config.scrub_rate_bytes_per_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            for tid in list(self.targets):
                try:
                    await self.scrub_target(tid)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("scrub of target %d failed", tid)
            self.passes += 1
            log.debug("scrub pass %d took %.1fs", self.passes, time.monotonic() - started)
            await asyncio.sleep(self.config.scrub_round_pause_ms / 1000)

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
                inode, index = parse_key(key)
                try:
                    await run_io(
                        self.executor, target.engine.read, inode, index, 0, rec.length, True
                    )
                    self.checked_bytes += rec.length
                except ChainfsError as e:
                    if e.code == Code.CHECKSUM_MISMATCH:
                        self.found_corrupt += 1
                        log.warning(
                            "scrub: chunk (%d, %d) of target %d is corrupt", inode, index, tid
                        )
                        self.repairer.request(tid, inode, index)
            if len(batch) < page:
                return
