"""Resync: fill a returning (SYNCING) target from its predecessor, as 3FS does.

A target that comes back after a crash or a missed-heartbeat timeout reports
local state ONLINE; mgmtd moves it offline -> waiting -> syncing. While it is
syncing, CRAQ already forwards every new write to it (a chunk it misses or
holds at an older version answers CHUNK_VERSION_MISMATCH and gets the whole
chunk). What it missed while away is filled here, by the node holding its
*predecessor*: the last SERVING target before it in the chain.

One sync pass (:meth:`Resyncer._sync_pass`):

1. list the syncing target's chunk metadata (StorageControl.DumpChunkMeta,
   paged), *then* the source's (a chunk created in between is on both);
2. for every chunk id in either list, under the source's chunk lock (no write
   of that chunk is in flight meanwhile):
   - only on the source, or a different committed version / CRC / length, or a
     newer chain version on the source: send the whole committed chunk as a
     forwarded full-chunk UPDATE at the source's committed version (removing
     the target's copy first when it is at that version or later);
   - only on the target: forwarded REMOVE_CHUNKS of that chunk;
3. report done (data-plane message :data:`SYNC_REPORT`); the syncing node then
   reports UPTODATE in its heartbeats and mgmtd makes it SERVING.

Progress (bytes left, rate) goes to the syncing node with the same message
during the pass; it puts them in its heartbeats, so `chainfs admin targets`
shows them. The bytes sent by all passes of a node are rate-limited by
``FailureConfig.resync_rate_bytes_per_s``.

The sync report reuses ``mgmt.TargetHeartbeat`` as its header (target id,
local state UPTODATE = done, bytes left, rate) on a data-plane message type
outside storage.proto's MsgType.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc.aio

from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc import grpc_util
from chainfs.common.rpc.mgmt_client import local_state_for
from chainfs.common.rpc.storage_client import data_address
from chainfs.proto import common_pb2 as cp
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.proto import storage_pb2_grpc as sg
from chainfs.storage_service.chunk_engine import ChunkRecord, parse_key
from chainfs.storage_service.craq import LocalTarget
from chainfs.storage_service.failure_config import FailureConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

SYNC_REPORT = 100  # data-plane message type: header mgmt.TargetHeartbeat -> same (echo)
_FORWARD_TIMEOUT_S = 30.0  # one whole-chunk send (64 MiB at worst)


class RateLimiter:
    """Token bucket in bytes/s shared by all passes of a node (0 = unlimited)."""

    def __init__(self, rate_bytes_per_s: int) -> None:
        self.rate = rate_bytes_per_s
        self._next = time.monotonic()

    async def consume(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


def predecessor(routing: Routing, chain: mp.ChainInfo, target_id: int) -> int | None:
    """The last SERVING target before ``target_id`` in the chain (its sync source)."""
    ids = list(chain.targets)
    if target_id not in ids:
        return None
    for tid in reversed(ids[: ids.index(target_id)]):
        t = routing.targets.get(tid)
        if t is not None and t.public_state == mp.SERVING:
            return int(tid)
    return None


@dataclass
class _Progress:
    bytes_left: int = 0
    rate_bytes_per_s: int = 0


class SyncReceiver:
    """The syncing side: remembers reports, answers local states for heartbeats."""

    def __init__(self, routing: Callable[[], Routing | None]) -> None:
        self._routing = routing
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

    def handle_report(self, header: bytes, local_targets: dict[int, LocalTarget]) -> bytes:
        rep = mp.TargetHeartbeat.FromString(header)
        if rep.target_id not in local_targets:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {rep.target_id} is not on this node")
        state = self.public_state(rep.target_id)
        if state != mp.SYNCING:
            raise ChainfsError(
                Code.STALE_CHAIN_VERSION,
                f"target {rep.target_id} is {mp.PublicTargetState.Name(state)} here, "  # type: ignore[arg-type]
                "not syncing",
            )
        self.progress[rep.target_id] = _Progress(rep.sync_bytes_left, rep.sync_rate_bytes_per_s)
        if rep.local_state == mp.UPTODATE:
            if rep.target_id not in self.done:
                log.info("target %d: resync done", rep.target_id)
            self.done.add(rep.target_id)
            self.progress[rep.target_id] = _Progress(0, rep.sync_rate_bytes_per_s)
        return rep.SerializeToString()


class Resyncer:
    """The source side: one task per (local serving target, syncing successor)."""

    def __init__(
        self,
        config: FailureConfig,
        targets: dict[int, LocalTarget],
        routing: Callable[[], Routing | None],
        client: DataClient,
        executor: Executor,
        fenced: Callable[[], bool],
    ) -> None:
        self.config = config
        self.targets = targets
        self._routing = routing
        self.client = client
        self.executor = executor
        self.fenced = fenced
        self.limiter = RateLimiter(config.resync_rate_bytes_per_s)
        self.tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.finished: dict[tuple[int, int], int] = {}  # (source, dest) -> chain version done
        self.bytes_sent = 0
        self._loop_task: asyncio.Task[None] | None = None

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    # ---- scheduling ----------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self.tasks.values()) if t is not None]
        self._loop_task = None
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

    async def _run(self) -> None:
        interval = self.config.resync_scan_interval_ms / 1000
        while True:
            try:
                self._schedule()
            except Exception:
                log.exception("resync scheduling failed")
            await asyncio.sleep(interval)

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
        for key, chain_id in want.items():
            if key in self.tasks:
                continue
            version = routing.chains[chain_id].chain_version if routing is not None else 0
            if self.finished.get(key) == version:
                continue  # done for this chain version; the target reports UPTODATE
            self.tasks[key] = asyncio.get_running_loop().create_task(
                self._drive(key[0], key[1], chain_id)
            )

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

    def _dest_node(self, routing: Routing, dest: int) -> mp.NodeInfo:
        return routing.node_of_target(dest)

    async def _dump_dest(self, node: mp.NodeInfo, dest: int) -> dict[tuple[int, int], sp.ChunkMeta]:
        out: dict[tuple[int, int], sp.ChunkMeta] = {}
        ch = grpc_util.channel(node.rpc_address)
        try:
            stub = sg.StorageControlStub(ch)
            after = b""
            while True:
                rsp: sp.DumpChunkMetaRsp = await grpc_util.call(
                    stub.DumpChunkMeta,
                    sp.DumpChunkMetaReq(
                        target_id=dest, start_after=after, limit=self.config.resync_dump_page
                    ),
                    timeout_s=_FORWARD_TIMEOUT_S,
                    target=node.rpc_address,
                )
                for m in rsp.chunks:
                    out[(m.chunk.inode, m.chunk.index)] = m
                if not rsp.next:
                    return out
                after = rsp.next
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError, RuntimeError):
                await ch.close()

    @staticmethod
    def _list_source(target: LocalTarget) -> dict[tuple[int, int], ChunkRecord]:
        return {parse_key(k): rec for k, rec in target.engine.iter_records()}

    @staticmethod
    def _needs_send(rec: ChunkRecord, meta: sp.ChunkMeta | None) -> bool:
        if rec.committed_version == 0:
            return False  # nothing committed (a pending-only chunk): writes will carry it
        if meta is None:
            return True
        return (
            meta.committed_version != rec.committed_version
            or meta.crc32c != rec.crc32c
            or meta.length != rec.length
            or rec.chain_version > meta.chain_version
        )

    async def _sync_pass(self, src: int, dest: int, chain_id: int) -> int:
        routing, chain = self._current(src, dest, chain_id)
        node = self._dest_node(routing, dest)
        target = self.targets[src]
        started = time.monotonic()
        log.info("resync %d -> %d (chain %d): listing", src, dest, chain_id)
        dest_metas = await self._dump_dest(node, dest)
        source = await self._io(self._list_source, target)
        keys = sorted(set(dest_metas) | set(source))
        left = sum(r.length for k, r in source.items() if self._needs_send(r, dest_metas.get(k)))
        sent = sent_chunks = removed = 0
        last_report = 0.0
        report_every = self.config.resync_report_interval_ms / 1000

        async def report(done: bool) -> None:
            elapsed = max(time.monotonic() - started, 1e-3)
            r, _ = self._current(src, dest, chain_id)
            msg = mp.TargetHeartbeat(
                target_id=dest,
                local_state=mp.UPTODATE if done else mp.ONLINE,
                sync_bytes_left=max(left - sent, 0) if not done else 0,
                sync_rate_bytes_per_s=int(sent / elapsed),
            )
            await self.client.request(
                data_address(self._dest_node(r, dest)),
                SYNC_REPORT,
                msg.SerializeToString(),
                timeout_s=_FORWARD_TIMEOUT_S,
            )

        await report(False)
        sem = asyncio.Semaphore(self.config.resync_parallel_chunks)

        async def one(key: tuple[int, int]) -> None:
            nonlocal sent, sent_chunks, removed, last_report
            async with sem:
                await target.locks.acquire(key)
                try:
                    routing, chain = self._current(src, dest, chain_id)
                    node = self._dest_node(routing, dest)
                    rec = target.engine.get(*key)
                    meta = dest_metas.get(key)
                    if rec is None or (rec.committed_version == 0 and not rec.has_pending):
                        if meta is not None:
                            await self._remove(node, chain, src, dest, key)
                            removed += 1
                    elif self._needs_send(rec, meta):
                        if meta is not None and meta.committed_version >= rec.committed_version:
                            await self._remove(node, chain, src, dest, key)
                        n = await self._send(target, node, chain, src, dest, key, rec)
                        sent += n
                        sent_chunks += 1
                        self.bytes_sent += n
                finally:
                    target.locks.release(key)
                if sent and time.monotonic() - last_report > report_every:
                    last_report = time.monotonic()
                    await report(False)

        window = 64 * self.config.resync_parallel_chunks  # bounds the tasks alive at once
        for i in range(0, len(keys), window):
            try:
                async with asyncio.TaskGroup() as tg:  # the first failure cancels the rest
                    for k in keys[i : i + window]:
                        tg.create_task(one(k))
            except BaseExceptionGroup as eg:
                raise eg.exceptions[0] from None
        await report(True)
        log.info(
            "resync %d -> %d (chain %d) done: %d chunks (%d bytes) sent, %d removed, %.2fs",
            src,
            dest,
            chain_id,
            sent_chunks,
            sent,
            removed,
            time.monotonic() - started,
        )
        return int(chain.chain_version)

    async def _remove(
        self, node: mp.NodeInfo, chain: mp.ChainInfo, src: int, dest: int, key: tuple[int, int]
    ) -> None:
        req = sp.RemoveChunksReq(
            chain_id=chain.chain_id,
            chain_version=chain.chain_version,
            target_id=dest,
            from_target=src,
            inode=key[0],
            begin_index=key[1],
            end_index=key[1] + 1,
            indexes=[key[1]],
        )
        await self.client.request(
            data_address(node),
            sp.REMOVE_CHUNKS,
            req.SerializeToString(),
            timeout_s=_FORWARD_TIMEOUT_S,
        )

    async def _send(
        self,
        target: LocalTarget,
        node: mp.NodeInfo,
        chain: mp.ChainInfo,
        src: int,
        dest: int,
        key: tuple[int, int],
        rec: ChunkRecord,
    ) -> int:
        """The whole committed chunk, as a forwarded full-chunk update at its version."""
        got, data = await self._io(target.engine.read, key[0], key[1], 0, rec.length, True)
        if got is None or got.committed_version != rec.committed_version:
            raise ChainfsError(Code.NOT_COMMITTED, f"chunk {key} changed under the chunk lock")
        await self.limiter.consume(len(data))
        req = sp.UpdateReq(
            req=cp.RequestInfo(client_id=rec.committed_client, request_id=rec.committed_request),
            chain_id=chain.chain_id,
            chain_version=chain.chain_version,
            target_id=dest,
            from_target=src,
            chunk=sp.ChunkId(inode=key[0], index=key[1]),
            type=sp.WRITE,
            offset=0,
            length=len(data),
            crc32c=rec.crc32c,
            chunk_size=rec.chunk_size,
            update_version=rec.committed_version,
            full_chunk=True,
        )
        reply = await self.client.request(
            data_address(node),
            sp.UPDATE,
            req.SerializeToString(),
            payload=[data] if len(data) else [],
            timeout_s=_FORWARD_TIMEOUT_S,
        )
        rsp = sp.UpdateRsp.FromString(bytes(reply.header))
        if rsp.committed_version != rec.committed_version or rsp.crc32c != rec.crc32c:
            raise ChainfsError(
                Code.INTERNAL,
                f"target {dest} holds chunk {key} at v{rsp.committed_version} crc "
                f"{rsp.crc32c:#010x} after sync, expected v{rec.committed_version} crc "
                f"{rec.crc32c:#010x}",
            )
        return len(data)
