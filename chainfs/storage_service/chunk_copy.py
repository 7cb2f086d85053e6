"""Copying one chunk between the replicas of a chain: the primitive of resync and repair.

Both directions work on one chunk under a chunk lock and keep versions in step
along the chain (a copy is installed at the committed version it has on the
replica it came from):

* :func:`push_chunk` (resync): the source's committed chunk, read under the
  *source's* chunk lock, goes to a syncing replica as a forwarded full-chunk
  UPDATE at the source's version (:func:`remove_remote` first drops a copy the
  replica holds at that version or later).
* :meth:`ChunkCopier.pull` (scrubber repair of a corrupt replica, and
  ``chainfs fsck --repair``): under the *damaged replica's* chunk lock, ask the
  other SERVING replicas for their chunk metadata, read the chunk from the
  healthy one (its bytes match its CRC32C; the newest committed version wins)
  and install it locally at that version. Holding the damaged replica's lock
  freezes the chunk along the whole chain: no update passes this replica and
  no replica after it commits without its ack, so the copy cannot go stale
  while it travels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from google.protobuf.message import Message

from chainfs.common.dataplane.buffers import BufferPool
from chainfs.common.dataplane.client import DataClient, Reply
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing, data_address
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.chunk_record import ChunkRecord
from chainfs.storage_service.craq import LocalTarget, full_chunk_update

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[int, int]  # (inode, chunk index)


async def run_io(executor: Executor, fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking engine call in the node's I/O threads."""
    return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))


# ---- push (resync) --------------------------------------------------------------


async def remove_remote(
    client: DataClient,
    node: mp.NodeInfo,
    chain: mp.ChainInfo,
    src: int,
    dest: int,
    key: Key,
    timeout_s: float,
) -> None:
    """Forwarded REMOVE_CHUNKS of one chunk on ``dest`` (sent by its predecessor ``src``)."""
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
    await client.request(
        data_address(node), sp.REMOVE_CHUNKS, req.SerializeToString(), timeout_s=timeout_s
    )


async def push_chunk(
    client: DataClient,
    executor: Executor,
    engine: ChunkEngine,
    node: mp.NodeInfo,
    chain: mp.ChainInfo,
    src: int,
    dest: int,
    key: Key,
    rec: ChunkRecord,
    timeout_s: float,
    before_send: Callable[[int], Any] | None = None,
    buffers: BufferPool | None = None,
) -> int:
    """Send ``rec`` (the source's committed chunk; caller holds the source's chunk
    lock) to ``dest`` as a forwarded full-chunk update; returns the bytes sent.

    ``before_send(n)`` is awaited with the byte count first (rate limiting).
    ``buffers``: the chunk is read into one of these (waiting for room), unless
    it is larger than the pool; it goes back once the update is answered.
    """
    buf = None
    if buffers is not None and 0 < rec.length <= buffers.capacity_bytes:
        buf = await buffers.acquire(rec.length)
    try:
        scratch = buf.view if buf is not None else None
        got, data = await run_io(
            executor, engine.read, key[0], key[1], 0, rec.length, True, scratch
        )
        if got is None or got.committed_version != rec.committed_version:
            raise ChainfsError(Code.NOT_COMMITTED, f"chunk {key} changed under the chunk lock")
        if before_send is not None:
            await before_send(len(data))
        req = full_chunk_update(chain, dest, key, rec, pending=False)
        req.from_target = src
        # When request() returns or raises, the transport holds no view of ``data``.
        reply = await client.request(
            data_address(node),
            sp.UPDATE,
            req.SerializeToString(),
            payload=[data] if len(data) else [],
            timeout_s=timeout_s,
        )
        sent = len(data)
    finally:
        if buf is not None:
            buf.release()
    rsp = sp.UpdateRsp.FromString(bytes(reply.header))
    if rsp.committed_version != rec.committed_version or rsp.crc32c != rec.crc32c:
        raise ChainfsError(
            Code.INTERNAL,
            f"target {dest} holds chunk {key} at v{rsp.committed_version} crc "
            f"{rsp.crc32c:#010x} after the copy, expected v{rec.committed_version} crc "
            f"{rec.crc32c:#010x}",
        )
    return sent


# ---- pull (repair) --------------------------------------------------------------


def same_content(rec: ChunkRecord | None, meta: sp.ChunkMeta) -> bool:
    """Does the local record describe the committed chunk ``meta`` describes?"""
    if rec is None or rec.committed_version == 0:
        return meta.committed_version == 0
    return (
        rec.committed_version == meta.committed_version
        and rec.length == meta.length
        and rec.crc32c == meta.crc32c
    )


def rewrite_committed(
    engine: ChunkEngine, inode: int, index: int, rec: ChunkRecord, data: memoryview
) -> None:
    """Replace the file of ``rec``'s committed version with ``data`` (the bytes it should
    hold: same length and CRC32C), atomically: temp file, fsync, rename."""
    if len(data) != rec.length or crc.value(data) != rec.crc32c:
        raise ChainfsError(Code.CHECKSUM_MISMATCH, "repair data does not match the record")
    if engine.get(inode, index) != rec:
        raise ChainfsError(Code.NOT_COMMITTED, f"chunk ({inode}, {index}) changed during repair")
    engine.files.replace(inode, index, rec.file_gen, data)


def install_copy(
    engine: ChunkEngine, key: Key, expect: ChunkRecord | None, meta: sp.ChunkMeta, data: memoryview
) -> ChunkRecord:
    """Make the local chunk ``key`` the committed chunk ``meta`` with bytes ``data``.

    Runs in an I/O thread under the chunk lock; ``expect`` is the record the
    caller decided on (anything else: NOT_COMMITTED, nothing changed).
    """
    inode, index = key
    if len(data) != meta.length or crc.value(data) != meta.crc32c:
        raise ChainfsError(Code.CHECKSUM_MISMATCH, f"copy of chunk {key} does not match its CRC32C")
    rec = engine.get(inode, index)
    if rec != expect or (rec is not None and rec.has_pending):
        raise ChainfsError(Code.NOT_COMMITTED, f"chunk {key} changed during the copy")
    if rec is not None and same_content(rec, meta):
        # Same version and checksum, damaged bytes: replace the file in place.
        rewrite_committed(engine, inode, index, rec, data)
        got = engine.get(inode, index)
        assert got is not None
        return got
    if rec is not None and rec.committed_version >= meta.committed_version:
        # Versions only grow: drop the local chunk first (it diverged ahead).
        engine.prepare_remove(inode, index)
        engine.commit(inode, index, rec.committed_version + 1, meta.chain_version)
    engine.prepare_replace(inode, index, data, meta.crc32c, meta.chunk_size, meta.committed_version)
    got = engine.commit(inode, index, meta.committed_version, meta.chain_version)
    assert got is not None and same_content(got, meta), (got, meta)
    return got


@dataclass
class PullResult:
    copied: bool
    from_target: int = 0
    bytes_copied: int = 0
    record: ChunkRecord | None = None
    reason: str = ""


class ChunkCopier:
    """Pulls one chunk from the healthy replica of its chain onto a local target."""

    def __init__(
        self,
        targets: dict[int, LocalTarget],
        routing: Callable[[], Routing | None],
        client: DataClient,
        executor: Executor,
        timeout_s: float,
        credential: cpb.Credential | None = None,
    ) -> None:
        """``credential``: this node's, for peers' StorageControl."""
        self.credential = credential
        self.targets = targets
        self._routing = routing
        self.client = client
        self.executor = executor
        self.timeout_s = timeout_s
        self.pulled_chunks = 0
        self.pulled_bytes = 0

    def _chain_of(self, target_id: int) -> tuple[Routing, mp.ChainInfo]:
        routing = self._routing()
        if routing is None:
            raise ChainfsError(Code.UNAVAILABLE, "no routing info")
        info = routing.targets.get(target_id)
        if info is None:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {target_id} not in routing")
        chain = routing.chains.get(info.chain_id)
        if chain is None:
            raise ChainfsError(Code.UNKNOWN_CHAIN, f"target {target_id} is in no chain")
        return routing, chain

    def chain_version(self, target_id: int) -> int:
        """The version of ``target_id``'s chain (0 when routing does not place it)."""
        try:
            return int(self._chain_of(target_id)[1].chain_version)
        except ChainfsError:
            return 0

    def serving_peers(self, routing: Routing, chain: mp.ChainInfo, target_id: int) -> list[int]:
        return [
            int(t)
            for t in chain.targets
            if t != target_id
            and (info := routing.targets.get(t)) is not None
            and info.public_state == mp.SERVING
        ]

    async def ask_peers_to_repair(self, target_id: int, key: Key) -> None:
        """Ask every serving peer of ``target_id`` to repair ``key`` from it (its copy just
        became good again after none was): peers that gave up on a lost chunk resume."""
        routing, chain = self._chain_of(target_id)
        for peer in self.serving_peers(routing, chain, target_id):
            address = routing.node_of_target(peer).rpc_address
            try:
                async with StorageControl(address, 2 * self.timeout_s, self.credential) as control:
                    rsp = await control.repair_chunk(peer, key[0], key[1], prefer_target=target_id)
                log.info(
                    "target %d: chunk %s on replica %d: copied=%s", target_id, key, peer, rsp.copied
                )
            except ChainfsError as e:
                log.warning(
                    "target %d: replica %d could not repair chunk %s: %s", target_id, peer, key, e
                )

    async def _ask(self, routing: Routing, peer: int, msg_type: int, req: Message) -> Reply:
        """One data-plane request to the node of target ``peer``."""
        return await self.client.request(
            data_address(routing.node_of_target(peer)),
            msg_type,
            req.SerializeToString(),
            timeout_s=self.timeout_s,
        )

    async def peer_meta(
        self, routing: Routing, chain: mp.ChainInfo, peer: int, key: Key
    ) -> sp.ChunkMeta:
        """The peer's metadata of ``key`` (committed_version 0 when it has none)."""
        req = sp.ListChunksReq(
            chain_id=chain.chain_id, target_id=peer, inode=key[0], begin_index=key[1], limit=1
        )
        reply = await self._ask(routing, peer, sp.LIST_CHUNKS, req)
        rsp = sp.ListChunksRsp.FromString(bytes(reply.header))
        for m in rsp.chunks:
            if (m.chunk.inode, m.chunk.index) == key:
                return m
        return sp.ChunkMeta(chunk=sp.ChunkId(inode=key[0], index=key[1]))

    async def fetch(
        self, routing: Routing, chain: mp.ChainInfo, peer: int, key: Key, meta: sp.ChunkMeta
    ) -> memoryview:
        """The peer's whole committed chunk, checked against ``meta`` and its CRC32C."""
        req = sp.BatchReadReq(
            ios=[
                sp.ReadIO(
                    chain_id=chain.chain_id,
                    target_id=peer,
                    chunk=sp.ChunkId(inode=key[0], index=key[1]),
                    offset=0,
                    length=meta.length,
                )
            ]
        )
        reply = await self._ask(routing, peer, sp.BATCH_READ, req)
        rsp = sp.BatchReadRsp.FromString(bytes(reply.header))
        if rsp.status.code:
            raise ChainfsError(rsp.status.code, rsp.status.message)
        if len(rsp.results) != 1:
            raise ChainfsError(Code.BAD_FRAME, f"{len(rsp.results)} results for one read")
        r = rsp.results[0]
        if r.status.code:
            raise ChainfsError(r.status.code, f"replica {peer}: {r.status.message}")
        data = reply.payload
        if (
            r.committed_version != meta.committed_version
            or r.chunk_crc32c != meta.crc32c
            or r.length != meta.length
            or len(data) != meta.length
            or crc.value(data) != meta.crc32c
        ):
            raise ChainfsError(
                Code.CHECKSUM_MISMATCH,
                f"replica {peer} sent v{r.committed_version} ({len(data)} bytes) not matching "
                f"v{meta.committed_version} crc {meta.crc32c:#010x}",
            )
        return data

    async def pull(
        self, target_id: int, key: Key, exact_version: int = 0, prefer: int = 0
    ) -> PullResult:
        """Copy ``key`` onto local ``target_id`` from the healthy replica of its chain.

        The caller holds ``target_id``'s chunk lock. Healthy = a SERVING replica
        whose bytes match its CRC32C; of those the newest committed version
        (``prefer`` first among equals). ``exact_version``: only a copy at that
        committed version will do (repair of a damaged but current replica).
        Nothing is copied when the local replica is healthy and at least as new.
        """
        target = self.targets[target_id]
        inode, index = key
        routing, chain = self._chain_of(target_id)
        local = target.engine.get(inode, index)
        if local is not None and local.has_pending:
            raise ChainfsError(Code.NOT_COMMITTED, f"chunk {key} has a write in flight")
        peers = self.serving_peers(routing, chain, target_id)
        metas = await asyncio.gather(
            *(self.peer_meta(routing, chain, p, key) for p in peers), return_exceptions=True
        )
        candidates: list[tuple[int, sp.ChunkMeta]] = []
        last: BaseException | None = None
        for p, m in zip(peers, metas, strict=True):
            if isinstance(m, BaseException):
                last = m
            elif m.pending_version:
                last = ChainfsError(Code.NOT_COMMITTED, f"replica {p} has a write in flight")
            elif not exact_version or m.committed_version == exact_version:
                candidates.append((p, m))
        # Newest first; the preferred one first among equals.
        candidates.sort(key=lambda pm: (-pm[1].committed_version, pm[0] != prefer))
        local_ok = await self._local_healthy(target, key, local)
        for p, m in candidates:
            if local_ok:
                if same_content(local, m):
                    return PullResult(False, record=local, reason="already identical")
                have = local.committed_version if local is not None else 0
                if have > m.committed_version:
                    return PullResult(False, record=local, reason="local replica is the newest")
                if have == m.committed_version and p != prefer:
                    continue  # as new as ours, different bytes: only a named truth replaces ours
            if m.committed_version == 0:
                break  # no peer holds the chunk: nothing to copy from
            try:
                data = await self.fetch(routing, chain, p, key, m)
            except ChainfsError as e:
                last = e
                continue
            rec = await run_io(self.executor, install_copy, target.engine, key, local, m, data)
            self.pulled_chunks += 1
            self.pulled_bytes += len(data)
            log.warning(
                "target %d: chunk %s copied from replica %d (v%d, %d bytes; was %s)",
                target_id,
                key,
                p,
                m.committed_version,
                len(data),
                f"v{local.committed_version}" + ("" if local_ok else " corrupt")
                if local is not None
                else "missing",
            )
            return PullResult(True, p, len(data), rec)
        if local_ok:
            return PullResult(False, record=local, reason="no newer healthy replica")
        raise (
            last
            if isinstance(last, ChainfsError)
            else ChainfsError(
                Code.UNAVAILABLE, f"no healthy replica of chunk {key} to copy from: {last}"
            )
        )

    async def _local_healthy(self, target: LocalTarget, key: Key, rec: ChunkRecord | None) -> bool:
        """Do the local bytes match the local record (an absent chunk counts as healthy)?"""
        if rec is None or rec.committed_version == 0 or rec.length == 0:
            return True
        try:
            await run_io(self.executor, target.engine.read, key[0], key[1], 0, rec.length, True)
            return True
        except ChainfsError as e:
            if e.code != Code.CHECKSUM_MISMATCH:
                raise
            return False
