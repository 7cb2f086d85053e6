"""Integrity: repair corrupt replicas from healthy ones; a background scrubber finds them.

A replica whose chunk file no longer matches the CRC32C in its record (a bit
flip on disk, a torn file) answers CHECKSUM_MISMATCH to reads (the client asks
another replica). The read path and the scrubber queue such a chunk for
:class:`Repairer`, which, under the chunk lock, confirms the damage, reads the
same committed version from another SERVING replica of the chain (its CRC32C
must equal our record's), and atomically replaces our file (temp file + fsync +
rename; the record is unchanged, so versions stay in step along the chain).

:class:`Scrubber` re-reads every committed chunk of every local target with CRC
verification at a bounded rate (``scrub_rate_bytes_per_s``), one pass, a pause
(``scrub_round_pause_ms``), the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any, TypeVar

from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.storage_client import data_address
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_engine import ChunkEngine, ChunkRecord, parse_key
from chainfs.storage_service.craq import LocalTarget
from chainfs.storage_service.failure_config import FailureConfig
from chainfs.storage_service.resync import RateLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")


def rewrite_committed(
    engine: ChunkEngine, inode: int, index: int, rec: ChunkRecord, data: memoryview
) -> None:
    """Replace the file of ``rec``'s committed version with ``data`` (same bytes it should hold)."""
    if len(data) != rec.length or crc.value(data) != rec.crc32c:
        raise ChainfsError(Code.CHECKSUM_MISMATCH, "repair data does not match the record")
    now = engine.get(inode, index)
    if now != rec:
        raise ChainfsError(Code.NOT_COMMITTED, f"chunk ({inode}, {index}) changed during repair")
    path = engine.file_path(inode, index, rec.file_gen)
    tmp = path + ".repair"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = data
        while len(view):
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Repairer:
    def __init__(
        self,
        config: FailureConfig,
        targets: dict[int, LocalTarget],
        routing: Callable[[], Routing | None],
        client: DataClient,
        executor: Executor,
    ) -> None:
        self.config = config
        self.targets = targets
        self._routing = routing
        self.client = client
        self.executor = executor
        self.queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue(config.repair_queue_entries)
        self.queued: set[tuple[int, int, int]] = set()
        self.repaired = 0
        self.failed = 0
        self._task: asyncio.Task[None] | None = None

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

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
            try:
                await self._io(target.engine.read, inode, index, 0, rec.length, True)
                return False  # healthy (or already repaired)
            except ChainfsError as e:
                if e.code != Code.CHECKSUM_MISMATCH:
                    raise
            data = await self._fetch_good_copy(target_id, inode, index, rec)
            await self._io(rewrite_committed, target.engine, inode, index, rec, data)
            log.warning(
                "target %d: chunk (%d, %d) v%d was corrupt; repaired from a replica",
                target_id,
                inode,
                index,
                rec.committed_version,
            )
            return True
        finally:
            target.locks.release(key)

    async def _fetch_good_copy(
        self, target_id: int, inode: int, index: int, rec: ChunkRecord
    ) -> memoryview:
        routing = self._routing()
        if routing is None:
            raise ChainfsError(Code.UNAVAILABLE, "no routing info")
        info = routing.targets.get(target_id)
        if info is None:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {target_id} not in routing")
        chain = routing.chains.get(info.chain_id)
        if chain is None:
            raise ChainfsError(Code.UNKNOWN_CHAIN, f"no chain {info.chain_id}")
        last: ChainfsError | None = None
        for peer in chain.targets:
            t = routing.targets.get(peer)
            if peer == target_id or t is None or t.public_state != mp.SERVING:
                continue
            req = sp.BatchReadReq(
                ios=[
                    sp.ReadIO(
                        chain_id=chain.chain_id,
                        target_id=peer,
                        chunk=sp.ChunkId(inode=inode, index=index),
                        offset=0,
                        length=rec.length,
                    )
                ]
            )
            buf = memoryview(bytearray(rec.length))
            res_box: list[sp.BatchReadRsp] = []

            def sink(
                _t: int, header: bytes, buf: memoryview = buf, box: list = res_box
            ) -> list[memoryview]:
                rsp = sp.BatchReadRsp.FromString(header)
                box.append(rsp)
                if len(rsp.results) == 1 and rsp.results[0].status.code == 0:
                    n = rsp.results[0].length
                    if n > len(buf):
                        raise ChainfsError(Code.BAD_FRAME, "peer sent more than the chunk")
                    return [buf[:n]] if n else []
                return []

            try:
                reply = await self.client.request(
                    data_address(routing.node_of_target(peer)),
                    sp.BATCH_READ,
                    req.SerializeToString(),
                    payload_sink=sink,
                    timeout_s=self.config.repair_timeout_ms / 1000,
                )
            except ChainfsError as e:
                last = e
                continue
            rsp = res_box[0] if res_box else sp.BatchReadRsp.FromString(bytes(reply.header))
            r = rsp.results[0] if rsp.results else None
            if r is None or r.status.code != 0:
                last = ChainfsError(
                    r.status.code if r else Code.EIO, r.status.message if r else "no result"
                )
                continue
            if (
                r.committed_version != rec.committed_version
                or r.chunk_crc32c != rec.crc32c
                or r.length != rec.length
                or crc.value(buf) != rec.crc32c
            ):
                last = ChainfsError(
                    Code.CHECKSUM_MISMATCH,
                    f"replica {peer} holds v{r.committed_version} crc {r.chunk_crc32c:#010x}",
                )
                continue
            return buf
        raise last or ChainfsError(Code.UNAVAILABLE, "no other serving replica to repair from")


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

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

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
            batch = await self._io(self._page, target.engine, begin, page)
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
                    await self._io(target.engine.read, inode, index, 0, rec.length, True)
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
