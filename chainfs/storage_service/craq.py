"""CRAQ: the replication rules of the storage service, in one module.

Writes (and truncates) enter a chain at its head with the sender's chain
version. At every replica, under the chunk's lock:

    head      version u = committed + 1, apply as pending u, forward
    middle    apply pending u (u = committed + 1, or a full-chunk replace), forward
    tail      apply pending u and commit; ack
    on ack    commit u; ack the predecessor (the head answers the client)

The head forwards the very buffer it received. A forwarded update a replica
already committed is acknowledged again (a re-drive); one that does not follow
its version answers CHUNK_VERSION_MISMATCH and the predecessor re-sends the
whole chunk. A definite error from the successor (it applied nothing) aborts
the local pending version; an unknown outcome (unreachable successor) leaves it
pending, and the next update of that chunk at the head re-drives it first.

Reads are served by any SERVING replica from the committed version; a chunk
with a pending version answers NOT_COMMITTED (the tail never has one once it
acked). A request whose chain version differs from ours is STALE_CHAIN_VERSION
(after one routing refresh when the sender's is newer).

Which targets accept what is decided by the target's public state in routing
(the table below), so failover (mgmtd moving targets between states) changes
routing, not these rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeAlias, TypeVar

from chainfs.common.auth.identity import Identity
from chainfs.common.dataplane.buffers import BufferPool, PooledBuffer, size_class
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import common_pb2 as cp
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service import crc
from chainfs.storage_service.access import check_predecessor
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.chunk_record import (
    ChunkRecord,
    Origin,
    check_chunk_size,
    client_id16,
)
from chainfs.storage_service.config import MAX_CHUNK_SIZE, StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a target serves, by its public state (3FS): (reads, writes).
SERVES: dict[int, tuple[bool, bool]] = {
    mp.SERVING: (True, True),
    mp.SYNCING: (False, True),
    mp.WAITING: (False, False),
    mp.LASTSRV: (False, False),
    mp.OFFLINE: (False, False),
}
# Scratch of an io sized as empty: a read that finds data after all is NOT_COMMITTED.
_NO_BUFFER = memoryview(b"")
WRITE_STATES = tuple(s for s, (_, w) in SERVES.items() if w)
# Requests a chain peer forwards (their sender is checked: access.check_predecessor).
Forwarded = sp.UpdateReq | sp.RemoveChunksReq

# Errors after which the successor applied nothing: abort our pending version.
_DEFINITE = frozenset(
    {
        Code.EINVAL,
        Code.ENOSPC,
        Code.CHECKSUM_MISMATCH,
        Code.BAD_FRAME,
        Code.UNKNOWN_CHAIN,
        Code.UNKNOWN_TARGET,
        Code.EIO,
    }
)


class Forwarder(Protocol):
    """Sends to the successor over the data plane (the server wires a DataClient in)."""

    async def update(
        self, node: mp.NodeInfo, req: sp.UpdateReq, payload: Sequence[memoryview], timeout_s: float
    ) -> sp.UpdateRsp: ...

    async def remove(
        self, node: mp.NodeInfo, req: sp.RemoveChunksReq, timeout_s: float
    ) -> sp.RemoveChunksRsp: ...


class ChunkLocks:
    """One asyncio lock per chunk in use; entries vanish when nobody holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[tuple[int, int], tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    async def acquire(self, key: tuple[int, int]) -> None:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._drop(key)
            raise

    def release(self, key: tuple[int, int]) -> None:
        lock, _ = self._locks[key]
        lock.release()
        self._drop(key)

    @contextlib.asynccontextmanager
    async def held(self, key: tuple[int, int]) -> AsyncIterator[None]:
        """``async with locks.held(key):`` the chunk is ours until the block ends."""
        await self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def _drop(self, key: tuple[int, int]) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


@dataclass
class LocalTarget:
    target_id: int
    engine: ChunkEngine
    locks: ChunkLocks = field(default_factory=ChunkLocks)
    # (client id, request id) -> answer of a completed update, bounded LRU.
    done: OrderedDict[tuple[bytes, int], bytes] = field(default_factory=OrderedDict)

    def remember(self, key: tuple[bytes, int], rsp: bytes, bound: int) -> None:
        self.done[key] = rsp
        self.done.move_to_end(key)
        while len(self.done) > bound:
            self.done.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Hop:
    """Where an update is: the local target it reached and the chain it travels."""

    target: LocalTarget
    routing: Routing
    chain: mp.ChainInfo


def full_chunk_update(
    chain: mp.ChainInfo, target_id: int, key: tuple[int, int], rec: ChunkRecord, pending: bool
) -> sp.UpdateReq:
    """A forwarded whole-chunk UPDATE that installs ``rec``'s pending (or committed)
    version on ``target_id`` as it is: same version, CRC32C and originating request."""
    if pending:
        assert rec.has_pending and not rec.pending_remove, rec
        client, request = rec.pending_client, rec.pending_request
        version, crc32c = rec.pending_version, rec.pending_crc32c
    else:
        client, request = rec.committed_client, rec.committed_request
        version, crc32c = rec.committed_version, rec.crc32c
    length = rec.pending_length if pending else rec.length
    return sp.UpdateReq(
        req=cp.RequestInfo(client_id=client, request_id=request),
        chain_id=chain.chain_id,
        chain_version=chain.chain_version,
        target_id=target_id,
        chunk=sp.ChunkId(inode=key[0], index=key[1]),
        type=sp.WRITE,
        offset=0,
        length=length,
        crc32c=crc32c,
        chunk_size=rec.chunk_size,
        update_version=version,
        full_chunk=True,
    )


def record_to_meta(inode: int, index: int, rec: ChunkRecord) -> sp.ChunkMeta:
    return sp.ChunkMeta(
        chunk=sp.ChunkId(inode=inode, index=index),
        committed_version=rec.committed_version,
        pending_version=rec.pending_version,
        length=rec.length,
        crc32c=rec.crc32c,
        chain_version=rec.chain_version,
        pending_length=rec.pending_length,
        pending_crc32c=rec.pending_crc32c,
        pending_remove=rec.pending_remove,
        chunk_size=rec.chunk_size,
    )


def _state_name(state: int) -> str:
    return mp.PublicTargetState.Name(state)  # type: ignore[arg-type]


def _ok() -> cp.Status:
    return cp.Status(code=0)


def _releaser(scratch: list[PooledBuffer | None]) -> Callable[[], None]:
    """A call that returns the read buffers in ``scratch`` to their pool (once)."""

    def release() -> None:
        for k, b in enumerate(scratch):
            if b is not None:
                b.release()
                scratch[k] = None

    return release


# One io's outcome while a batch is read: (length, committed_version, chunk_length,
# chunk_crc32c) of a served read, or the Status of a refused one. The reply's
# ReadResults are made from them in place, once every io has one (a ReadResult
# built per io and then copied into the reply cost twice as much).
IoOutcome: TypeAlias = tuple[int, int, int, int] | cp.Status

_MISSING: IoOutcome = (0, 0, 0, 0)  # a chunk never written reads as empty: all zeros
_OK_STATUS = cp.Status(code=0)  # copied into each result, never changed


def _refused(code: int, message: str) -> cp.Status:
    return cp.Status(code=code, message=message)


def _reply(
    results: list[IoOutcome | None], buffers: list[memoryview | None]
) -> tuple[sp.BatchReadRsp, list[memoryview]]:
    """The BatchReadRsp of a batch and its payload: the non-empty buffers, in order."""
    out = sp.BatchReadRsp(status=_OK_STATUS)
    add = out.results.add
    for r in results:
        if type(r) is tuple:
            length, version, chunk_length, chunk_crc = r
            add(
                status=_OK_STATUS,
                length=length,
                committed_version=version,
                chunk_length=chunk_length,
                chunk_crc32c=chunk_crc,
            )
        else:
            assert r is not None, "every io has its outcome by now"
            add(status=r)
    payload = [b for b in buffers if b is not None and len(b)]
    return out, payload


class Craq:
    """CRAQ for all local targets of one storage node."""

    def __init__(
        self,
        config: StorageConfig,
        targets: dict[int, LocalTarget],
        routing: Callable[[], Routing | None],
        refresh_routing: Callable[[int], Awaitable[Routing | None]],
        forwarder: Forwarder,
        executor: Executor,
    ) -> None:
        self.config = config
        self.targets = targets
        self._routing = routing
        self._refresh = refresh_routing
        self.forwarder = forwarder
        self.executor = executor
        self._acquire_lock = asyncio.Lock()
        self.read_pool = BufferPool(config.max_read_bytes_in_flight, config.read_buffer_cache_bytes)
        # Small reads are served on the event loop from the page cache (RWF_NOWAIT),
        # without a thread hop; off when the file system refuses RWF_NOWAIT.
        self._inline_reads = config.inline_read_bytes > 0

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def _update_io(
        self, target: LocalTarget, nbytes: int, fn: Callable[..., T], *args: Any
    ) -> T:
        """Apply or commit an update of ``nbytes``: on the loop when small and the
        target does not sync (a page-cache write and a record put cost less than
        the two thread switches), else in an I/O thread."""
        if nbytes <= self.config.inline_update_bytes and not target.engine.options.durable:
            return fn(*args)
        return await self._io(fn, *args)

    # ---- routing checks ------------------------------------------------------

    def _local(self, target_id: int) -> LocalTarget:
        t = self.targets.get(target_id)
        if t is None:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {target_id} is not on this node")
        return t

    def _routing_now(self) -> Routing:
        r = self._routing()
        if r is None:
            raise ChainfsError(Code.TARGET_NOT_SERVING, "storage node has no routing info yet")
        return r

    def _chain(self, routing: Routing, chain_id: int, target_id: int) -> mp.ChainInfo:
        chain = routing.chains.get(chain_id)
        if chain is None:
            raise ChainfsError(Code.UNKNOWN_CHAIN, f"no chain {chain_id}")
        if target_id not in chain.targets:
            raise ChainfsError(
                Code.STALE_CHAIN_VERSION,
                f"target {target_id} is not in chain {chain_id} v{chain.chain_version}",
            )
        return chain

    async def _routing_naming(self, pairs: Iterable[tuple[int, int]]) -> Routing:
        """Our routing, fetched once more from mgmtd if it lacks one of the
        (chain, target) pairs: a chain created (or changed) since our last
        routing update, which the sender already knows."""
        routing = self._routing_now()
        chains = routing.chains
        if any(c not in chains or t not in chains[c].targets for c, t in pairs):
            fresh = await self._refresh(0)
            if fresh is not None:
                routing = fresh
        return routing

    async def _check_version(
        self, chain_id: int, chain_version: int, target_id: int
    ) -> tuple[Routing, mp.ChainInfo]:
        routing = await self._routing_naming([(chain_id, target_id)])
        chain = self._chain(routing, chain_id, target_id)
        if chain_version > chain.chain_version:
            # The sender knows a newer chain than we do: catch up once.
            fresh = await self._refresh(routing.version + 1)
            if fresh is not None:
                routing = fresh
                chain = self._chain(routing, chain_id, target_id)
        if chain_version != chain.chain_version:
            raise ChainfsError(
                Code.STALE_CHAIN_VERSION,
                f"chain {chain_id}: request has version {chain_version}, "
                f"this node has {chain.chain_version}",
            )
        return routing, chain

    @staticmethod
    def _state(routing: Routing, target_id: int) -> int:
        t = routing.targets.get(target_id)
        return t.public_state if t is not None else mp.OFFLINE

    def _successor(
        self, routing: Routing, chain: mp.ChainInfo, target_id: int
    ) -> tuple[int, mp.NodeInfo] | None:
        ids = list(chain.targets)
        for tid in ids[ids.index(target_id) + 1 :]:
            if self._state(routing, tid) in WRITE_STATES:
                info = routing.targets[tid]
                node = routing.nodes.get(info.node_id)
                if node is None:
                    raise ChainfsError(Code.UNAVAILABLE, f"successor {tid} has no known node")
                return tid, node
        return None

    def _head(self, routing: Routing, chain: mp.ChainInfo) -> int | None:
        for tid in chain.targets:
            if self._state(routing, tid) in WRITE_STATES:
                return int(tid)
        return None

    async def _check_sender(
        self, hop: tuple[Routing, mp.ChainInfo], req: Forwarded, sender: Identity | None
    ) -> tuple[Routing, mp.ChainInfo]:
        """A forward must come from the predecessor's node (access.check_predecessor);
        on a mismatch, fetch routing once in case ours is the old one."""
        routing, chain = hop
        what = f"forwarded {type(req).__name__}"
        try:
            check_predecessor(routing, chain, req.target_id, req.from_target, sender, what)
            return routing, chain
        except ChainfsError as e:
            if e.code != Code.STALE_CHAIN_VERSION:
                raise
        fresh = await self._refresh(0)
        if fresh is None:
            raise ChainfsError(Code.STALE_CHAIN_VERSION, f"{what}: no routing to check the sender")
        chain = self._chain(fresh, chain.chain_id, req.target_id)
        check_predecessor(fresh, chain, req.target_id, req.from_target, sender, what)
        return fresh, chain

    # ---- updates (write, truncate) -----------------------------------------

    async def update(
        self, req: sp.UpdateReq, payload: memoryview, sender: Identity | None = None
    ) -> sp.UpdateRsp:
        """Apply an update at the head (``from_target`` 0) or along the chain.
        ``sender``: who sent it, checked for forwards (None: not checked)."""
        target = self._local(req.target_id)
        self._validate_update(req, payload)
        routing, chain = await self._check_version(req.chain_id, req.chain_version, req.target_id)
        if req.from_target:
            routing, chain = await self._check_sender((routing, chain), req, sender)
        state = self._state(routing, req.target_id)
        if not SERVES.get(state, (False, False))[1]:
            raise ChainfsError(
                Code.TARGET_NOT_SERVING,
                f"target {req.target_id} is {_state_name(state)}: no writes",
            )
        key = (req.chunk.inode, req.chunk.index)
        if req.from_target == 0:
            if self._head(routing, chain) != req.target_id:
                raise ChainfsError(
                    Code.STALE_CHAIN_VERSION,
                    f"target {req.target_id} is not the head of chain {req.chain_id}",
                )
            done_key = (req.req.client_id, req.req.request_id)
            cached = target.done.get(done_key) if req.req.client_id else None
            if cached is not None:
                return sp.UpdateRsp.FromString(cached)
            async with target.locks.held(key):
                rsp = await self._head_update(_Hop(target, routing, chain), req, payload)
            if req.req.client_id:
                target.remember(
                    done_key, rsp.SerializeToString(), self.config.request_cache_entries
                )
            return rsp
        async with target.locks.held(key):
            return await self._replica_update(_Hop(target, routing, chain), req, payload)

    def _validate_update(self, req: sp.UpdateReq, payload: memoryview) -> None:
        if not req.HasField("chunk"):
            raise ChainfsError(Code.EINVAL, "update without a chunk id")
        check_chunk_size(req.chunk_size)
        if req.type == sp.WRITE:
            if len(payload) != req.length:
                raise ChainfsError(
                    Code.BAD_FRAME,
                    f"header says {req.length} payload bytes, frame carries {len(payload)}",
                )
            if req.offset + req.length > req.chunk_size:
                raise ChainfsError(
                    Code.EINVAL,
                    f"write [{req.offset}, {req.offset + req.length}) outside the chunk "
                    f"of {req.chunk_size} bytes",
                )
            if req.full_chunk and req.offset != 0:
                raise ChainfsError(Code.EINVAL, "a full-chunk replace starts at offset 0")
            got = crc.value(payload)
            if got != req.crc32c:
                raise ChainfsError(
                    Code.CHECKSUM_MISMATCH,
                    f"payload CRC32C {got:#010x} != header {req.crc32c:#010x}",
                )
        elif req.type == sp.TRUNCATE:
            if len(payload):
                raise ChainfsError(Code.BAD_FRAME, "truncate carries no payload")
            if req.length > req.chunk_size:
                raise ChainfsError(
                    Code.EINVAL, f"truncate to {req.length} beyond chunk size {req.chunk_size}"
                )
        else:
            raise ChainfsError(Code.EINVAL, f"unknown update type {req.type}")

    def _apply(
        self,
        target: LocalTarget,
        req: sp.UpdateReq,
        payload: memoryview,
        version: int,
        commit_at: int | None = None,
    ) -> ChunkRecord:
        """Apply ``req`` locally as pending ``version`` (runs in an I/O thread); with
        ``commit_at`` (a chain version) as committed ``version`` at once."""
        try:
            return self._apply_unchecked(target, req, payload, version, commit_at)
        except OSError as e:
            if e.errno == errno.ENOSPC:  # the file system filled under the usage limit
                raise ChainfsError(Code.ENOSPC, f"target {target.target_id}: {e}") from None
            raise

    def _apply_unchecked(
        self,
        target: LocalTarget,
        req: sp.UpdateReq,
        payload: memoryview,
        version: int,
        commit_at: int | None,
    ) -> ChunkRecord:
        eng = target.engine
        ino, idx = req.chunk.inode, req.chunk.index
        origin = Origin.of(req.req.client_id, req.req.request_id)
        if req.full_chunk:
            return eng.prepare_replace(
                ino, idx, payload, req.crc32c, req.chunk_size, version, origin, commit_at
            )
        if req.type == sp.WRITE:
            return eng.prepare_write(
                ino,
                idx,
                req.offset,
                payload,
                req.crc32c,
                req.chunk_size,
                version,
                origin,
                commit_at,
            )
        return eng.prepare_truncate(
            ino, idx, req.length, req.chunk_size, version, origin, commit_at
        )

    @staticmethod
    def _made_by(rec: ChunkRecord | None, req: sp.UpdateReq) -> bool:
        """Is ``rec``'s committed version the result of request ``req`` (a retry)?"""
        if rec is None or not req.req.client_id:
            return False
        client = client_id16(req.req.client_id)
        return rec.committed_client == client and rec.committed_request == req.req.request_id

    @staticmethod
    def _rsp(rec: ChunkRecord | None) -> sp.UpdateRsp:
        if rec is None:
            return sp.UpdateRsp(status=_ok())
        return sp.UpdateRsp(
            status=_ok(),
            committed_version=rec.committed_version,
            length=rec.length,
            crc32c=rec.crc32c,
        )

    async def _head_update(self, hop: _Hop, req: sp.UpdateReq, payload: memoryview) -> sp.UpdateRsp:
        target = hop.target
        eng = target.engine
        ino, idx = req.chunk.inode, req.chunk.index
        rec = eng.get(ino, idx)
        if self._made_by(rec, req):
            return self._rsp(rec)  # a retry of the update that made the committed version
        if rec is not None and rec.has_pending:
            # A previous update's outcome downstream is unknown: finish it first.
            rec = await self._redrive(hop, req, rec)
            if self._made_by(rec, req):
                return self._rsp(rec)
        version = (rec.committed_version if rec is not None else 0) + 1
        return await self._apply_and_pass_on(hop, req, payload, version)

    async def _redrive(self, hop: _Hop, req: sp.UpdateReq, rec: ChunkRecord) -> ChunkRecord | None:
        """Push the head's pending version down the chain (whole chunk) and commit it."""
        target = hop.target
        ino, idx = req.chunk.inode, req.chunk.index
        log.info(
            "target %d: re-driving pending v%d of chunk (%d, %d)",
            target.target_id,
            rec.pending_version,
            ino,
            idx,
        )
        if rec.pending_remove:
            rm = sp.RemoveChunksReq(
                req=req.req,
                chain_id=req.chain_id,
                chain_version=req.chain_version,
                target_id=req.target_id,
                inode=ino,
                begin_index=idx,
                end_index=idx + 1,
            )
            succ = self._successor(hop.routing, hop.chain, target.target_id)
            if succ is not None:
                await self._forward_remove(rm, succ, [idx])
            await self._io(target.engine.commit, ino, idx, rec.pending_version, req.chain_version)
            return None
        data = await self._io(self._pending_bytes, target, ino, idx, rec)
        fwd = full_chunk_update(hop.chain, target.target_id, (ino, idx), rec, pending=True)
        await self._forward_and_commit(hop, fwd, data, rec)
        return target.engine.get(ino, idx)

    @staticmethod
    def _pending_bytes(target: LocalTarget, ino: int, idx: int, rec: ChunkRecord) -> memoryview:
        return target.engine.read_pending(ino, idx, rec)

    async def _replica_update(
        self, hop: _Hop, req: sp.UpdateReq, payload: memoryview
    ) -> sp.UpdateRsp:
        target = hop.target
        eng = target.engine
        ino, idx = req.chunk.inode, req.chunk.index
        u = req.update_version
        if u == 0:
            raise ChainfsError(Code.EINVAL, "forwarded update without an update version")
        rec = eng.get(ino, idx)
        committed = rec.committed_version if rec is not None else 0
        if committed >= u:
            return self._rsp(rec)  # already applied and acknowledged downstream
        if not req.full_chunk and committed != u - 1:
            raise ChainfsError(
                Code.CHUNK_VERSION_MISMATCH,
                f"target {target.target_id} chunk ({ino}, {idx}) is at v{committed}, "
                f"update is v{u}: send the whole chunk",
            )
        return await self._apply_and_pass_on(hop, req, payload, u)

    async def _apply_and_pass_on(
        self, hop: _Hop, req: sp.UpdateReq, payload: memoryview, version: int
    ) -> sp.UpdateRsp:
        """Apply ``req`` here as ``version``, forward it and commit on the ack.

        The last replica taking writes waits for no successor: it applies and
        commits in one step (one I/O-thread hop and one record write instead of
        two of each; ChunkEngine._commit_now). Its ack means what a commit after
        a pending version meant: the new version is committed here (durable
        first on a durable target). A crash before the record write leaves the
        old version, and the predecessor's pending one is re-driven as before; a
        retry of the same update finds its version committed (``committed >= u``
        or ``_made_by``) and is answered without applying it again."""
        target = hop.target
        if self._successor(hop.routing, hop.chain, target.target_id) is None:
            rec = await self._update_io(
                target, len(payload), self._apply, target, req, payload, version, req.chain_version
            )
            return self._rsp(rec)
        pending = await self._update_io(
            target, len(payload), self._apply, target, req, payload, version
        )
        if req.update_version != version:  # from the head: the version travels with it
            fwd = sp.UpdateReq()
            fwd.CopyFrom(req)
            fwd.update_version = version
            req = fwd
        return await self._forward_and_commit(hop, req, payload, pending)

    async def _forward_and_commit(
        self, hop: _Hop, req: sp.UpdateReq, data: memoryview, pending: ChunkRecord
    ) -> sp.UpdateRsp:
        """Forward ``req`` with its bytes ``data`` (pending locally at req.update_version)
        and commit on the ack."""
        target = hop.target
        ino, idx = req.chunk.inode, req.chunk.index
        version = req.update_version
        payload = [data] if len(data) else []
        succ = self._successor(hop.routing, hop.chain, target.target_id)
        if succ is not None:
            fwd = sp.UpdateReq()
            fwd.CopyFrom(req)
            fwd.from_target = target.target_id
            fwd.target_id = succ[0]
            try:
                try:
                    rsp = await self._send_update(succ[1], fwd, payload)
                except ChainfsError as e:
                    if e.code != Code.CHUNK_VERSION_MISMATCH or fwd.full_chunk:
                        raise
                    # The successor missed a version: send our whole pending chunk.
                    whole = await self._io(self._pending_bytes, target, ino, idx, pending)
                    fwd.full_chunk = True
                    fwd.type = sp.WRITE
                    fwd.offset = 0
                    fwd.length = len(whole)
                    fwd.crc32c = pending.pending_crc32c
                    rsp = await self._send_update(succ[1], fwd, [whole])
            except ChainfsError as e:
                if e.code in _DEFINITE:
                    await self._io(target.engine.abort, ino, idx)
                raise
            if rsp.committed_version != version or rsp.crc32c != pending.pending_crc32c:
                # The successor holds something else at this version: never commit over it.
                raise ChainfsError(
                    Code.INTERNAL,
                    f"successor {succ[0]} acked chunk ({ino}, {idx}) v{rsp.committed_version} "
                    f"crc {rsp.crc32c:#010x}, expected v{version} crc "
                    f"{pending.pending_crc32c:#010x}",
                )
        rec = await self._update_io(
            target, len(data), target.engine.commit, ino, idx, version, req.chain_version
        )
        return self._rsp(rec)

    def _takes_writes(self, target_id: int) -> bool:
        """Whether the routing held now still has ``target_id`` taking writes."""
        routing = self._routing()
        return routing is None or self._state(routing, target_id) in WRITE_STATES

    async def _send_update(
        self, node: mp.NodeInfo, req: sp.UpdateReq, payload: list[memoryview]
    ) -> sp.UpdateRsp:
        """Forward with bounded retries of transport failures (the outcome is idempotent)."""
        delay = self.config.forward_retry_backoff_ms / 1000
        timeout_s = self.config.forward_timeout_ms / 1000
        for attempt in range(self.config.forward_retries):
            try:
                return await self.forwarder.update(node, req, payload, timeout_s)
            except ChainfsError as e:
                if (
                    e.code not in (Code.UNAVAILABLE, Code.ETIMEDOUT)
                    or attempt + 1 == self.config.forward_retries
                    or not self._takes_writes(req.target_id)
                ):
                    # Routing dropped the successor meanwhile (partitioned: it answers
                    # nothing and each try waits the whole timeout): stop now, the
                    # pending update is re-driven along the new chain.
                    raise
                log.warning("forward to node %d failed (%s); retrying", node.node_id, e)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # ---- remove ------------------------------------------------------------

    async def remove(
        self, req: sp.RemoveChunksReq, sender: Identity | None = None
    ) -> sp.RemoveChunksRsp:
        target = self._local(req.target_id)
        routing, chain = await self._check_version(req.chain_id, req.chain_version, req.target_id)
        if req.from_target:
            routing, chain = await self._check_sender((routing, chain), req, sender)
        if not SERVES.get(self._state(routing, req.target_id), (False, False))[1]:
            raise ChainfsError(Code.TARGET_NOT_SERVING, f"target {req.target_id} takes no writes")
        if req.end_index > (1 << 32) or req.begin_index > req.end_index:
            raise ChainfsError(
                Code.EINVAL, f"bad chunk index range [{req.begin_index}, {req.end_index})"
            )
        eng = target.engine
        if req.from_target == 0:
            if self._head(routing, chain) != req.target_id:
                raise ChainfsError(
                    Code.STALE_CHAIN_VERSION, f"target {req.target_id} is not the head"
                )
            limit = min(
                req.max_chunks or self.config.max_remove_chunks, self.config.max_remove_chunks
            )
            found = await self._io(
                eng.list_chunks, req.inode, req.begin_index, req.end_index, limit + 1
            )
            more = len(found) > limit
            indexes = [i for i, _ in found[:limit]]
        else:
            indexes = list(req.indexes)
            more = False
        keys = [(req.inode, i) for i in sorted(indexes)]
        for k in keys:  # index order: two removes never wait on each other in a cycle
            await target.locks.acquire(k)
        try:
            marked = await self._io(self._mark_removed, target, req, indexes)
            succ = self._successor(routing, chain, req.target_id)
            if succ is not None:
                await self._forward_remove(req, succ, indexes, target.target_id)
            removed = await self._io(
                self._commit_removed, target, req.inode, marked, req.chain_version
            )
        finally:
            for k in keys:
                target.locks.release(k)
        return sp.RemoveChunksRsp(status=_ok(), removed=removed, more=more)

    @staticmethod
    def _mark_removed(
        target: LocalTarget, req: sp.RemoveChunksReq, indexes: list[int]
    ) -> list[tuple[int, int]]:
        out = []
        for i in indexes:
            origin = Origin.of(req.req.client_id, req.req.request_id)
            rec = target.engine.prepare_remove(req.inode, i, origin)
            if rec is not None:
                out.append((i, rec.pending_version))
        return out

    @staticmethod
    def _commit_removed(
        target: LocalTarget, inode: int, marked: list[tuple[int, int]], chain_version: int
    ) -> int:
        for i, version in marked:
            target.engine.commit(inode, i, version, chain_version)
        return len(marked)

    async def _forward_remove(
        self,
        req: sp.RemoveChunksReq,
        succ: tuple[int, mp.NodeInfo],
        indexes: list[int],
        from_target: int = 0,
    ) -> None:
        fwd = sp.RemoveChunksReq()
        fwd.CopyFrom(req)
        fwd.target_id = succ[0]
        fwd.from_target = from_target or req.target_id
        del fwd.indexes[:]
        fwd.indexes.extend(indexes)
        timeout_s = self.config.forward_timeout_ms / 1000
        await self.forwarder.remove(succ[1], fwd, timeout_s)

    # ---- reads and queries -------------------------------------------------

    def _readable(self, routing: Routing, chain_id: int, target_id: int) -> LocalTarget:
        target = self._local(target_id)
        chain = routing.chains.get(chain_id)
        if chain is None:
            raise ChainfsError(Code.UNKNOWN_CHAIN, f"no chain {chain_id}")
        if target_id not in chain.targets:
            raise ChainfsError(
                Code.STALE_CHAIN_VERSION, f"target {target_id} is not in chain {chain_id}"
            )
        state = self._state(routing, target_id)
        if not SERVES.get(state, (False, False))[0]:
            raise ChainfsError(
                Code.TARGET_NOT_SERVING,
                f"target {target_id} is {_state_name(state)}: no reads",
            )
        return target

    def batch_read_now(
        self, req: sp.BatchReadReq
    ) -> tuple[sp.BatchReadRsp, list[memoryview], Callable[[], None]] | None:
        """:meth:`batch_read` without waiting, on the event loop: the answer when every
        io can be served on the spot (its chain in our routing, read buffers free
        with no batch queued for them, every range in the page cache), else None,
        holding nothing (then call :meth:`batch_read`)."""
        self._check_batch_size(req)
        if not self._inline_reads or self._acquire_lock.locked() or self.read_pool.waiting:
            return None
        routing = self._routing()
        if routing is None:
            return None
        chains = routing.chains
        for io in req.ios:
            chain = chains.get(io.chain_id)
            if chain is None or io.target_id not in chain.targets:
                return None  # batch_read fetches routing once more
        results, jobs = self._admit_ios(req, routing)
        inline: list[int] = []
        threaded: list[int] = []
        needs = self._size_batch(req, jobs, inline, threaded)
        if threaded:
            return None
        scratch: list[PooledBuffer | None] = [None] * len(req.ios)
        release = _releaser(scratch)
        for i, need in needs:
            scratch[i] = self.read_pool.try_acquire(need)
            if scratch[i] is None:
                release()
                return None
        buffers: list[memoryview | None] = [None] * len(req.ios)
        try:
            deferred = self._read_group(req, inline, results, buffers, scratch, nowait=True)
        except BaseException:
            release()
            raise
        if deferred:  # some range needs the disk: the I/O threads read the batch
            release()
            return None
        out, payload = _reply(results, buffers)
        return out, payload, release

    async def batch_read(
        self, req: sp.BatchReadReq
    ) -> tuple[sp.BatchReadRsp, list[memoryview], Callable[[], None]]:
        """Read every io; per-io status. Buffers of OK ios, in order, form the payload.

        The caller calls the returned ``release()`` once the buffers are sent:
        until then they count against ``max_read_bytes_in_flight``.
        """
        self._check_batch_size(req)
        routing = await self._routing_naming({(io.chain_id, io.target_id) for io in req.ios})
        n = len(req.ios)
        results, jobs = self._admit_ios(req, routing)
        buffers: list[memoryview | None] = [None] * n
        # Pooled, reused buffers (no allocation or zero-fill per read), sized from
        # the chunk's metadata: the range (the whole chunk when verifying one
        # without per-block CRCs). The pool's capacity bounds the bytes held at once.
        scratch: list[PooledBuffer | None] = [None] * n
        inline: list[int] = []
        threaded: list[int] = []
        release = _releaser(scratch)
        try:
            # One batch acquires at a time, so batches holding part of their
            # buffers never wait on each other; a batch is sized (and refused
            # if too big) before any byte is read or any buffer taken.
            async with self._acquire_lock:
                needs = self._size_batch(req, jobs, inline, threaded)
                for i, need in needs:
                    scratch[i] = await self.read_pool.acquire(need)
            # Small reads right here from the page cache; what needs the disk
            # (BlockingIOError under RWF_NOWAIT) goes to the I/O threads.
            if inline:
                threaded += self._read_group(req, inline, results, buffers, scratch, nowait=True)
            threads = min(self.config.io_threads, len(threaded))
            groups = [threaded[g::threads] for g in range(threads)]
            await asyncio.gather(
                *(self._io(self._read_group, req, g, results, buffers, scratch) for g in groups)
            )
        except BaseException:
            release()
            raise
        out, payload = _reply(results, buffers)
        return out, payload, release

    def _check_batch_size(self, req: sp.BatchReadReq) -> None:
        n = len(req.ios)
        if n > self.config.max_batch_read_ios:
            raise ChainfsError(
                Code.E2BIG, f"{n} ios in one batch; the bound is {self.config.max_batch_read_ios}"
            )

    def _admit_ios(
        self, req: sp.BatchReadReq, routing: Routing
    ) -> tuple[list[IoOutcome | None], list[int]]:
        """(outcomes with the refused ios' errors filled in, indexes of the ios to read)."""
        results: list[IoOutcome | None] = [None] * len(req.ios)
        jobs: list[int] = []
        # A batch names few (chain, target) pairs: each is checked once.
        readable: set[tuple[int, int]] = set()
        for i, io in enumerate(req.ios):
            try:
                where = (io.chain_id, io.target_id)
                if where not in readable:
                    self._readable(routing, *where)
                    readable.add(where)
                if io.offset + io.length > MAX_CHUNK_SIZE:
                    raise ChainfsError(
                        Code.EINVAL, f"read [{io.offset}, +{io.length}) outside any chunk"
                    )
                jobs.append(i)
            except ChainfsError as e:
                results[i] = _refused(e.code, e.message)
        return results, jobs

    def _size_batch(
        self, req: sp.BatchReadReq, jobs: list[int], inline: list[int], threaded: list[int]
    ) -> list[tuple[int, int]]:
        """Sort ``jobs`` into inline and threaded reads and return (io, buffer bytes)
        for those that read data. E2BIG when the reply (lengths clamped to each
        chunk's length) would exceed the frame bound or the buffers the read pool."""
        verify = self.config.verify_reads
        inline_max = self.config.inline_read_bytes if self._inline_reads else -1
        needs: list[tuple[int, int]] = []
        reply_bytes = buffer_bytes = 0
        ios = req.ios
        targets = self.targets
        for i in jobs:
            io = ios[i]
            eng = targets[io.target_id].engine
            chunk = io.chunk
            rec = eng.get(chunk.inode, chunk.index)
            if rec is None or rec.has_pending:
                inline.append(i)  # answered from metadata alone
                continue
            offset, length = io.offset, io.length
            lo, hi, need = eng.read_plan(rec, offset, length, verify)
            (inline if hi - lo <= inline_max else threaded).append(i)
            reply_bytes += max(0, min(offset + length, rec.length) - offset)
            if need:
                needs.append((i, need))
                buffer_bytes += size_class(need)
        frame_max = self.config.dataplane.max_payload_bytes
        if reply_bytes > frame_max:
            raise ChainfsError(
                Code.E2BIG,
                f"batch read reply of {reply_bytes} bytes over the {frame_max} frame bound",
            )
        if buffer_bytes > self.read_pool.capacity_bytes:
            raise ChainfsError(
                Code.E2BIG,
                f"batch read needs {buffer_bytes} bytes of buffers; "
                f"max_read_bytes_in_flight is {self.read_pool.capacity_bytes}",
            )
        return needs

    def _read_group(
        self,
        req: sp.BatchReadReq,
        group: list[int],
        results: list[IoOutcome | None],
        buffers: list[memoryview | None],
        scratch: list[PooledBuffer | None],
        nowait: bool = False,
    ) -> list[int]:
        """Read the ios of ``group``; with ``nowait`` (page cache only) return those
        that would need the disk, unread."""
        verify = self.config.verify_reads
        deferred: list[int] = []
        for i in group:
            io = req.ios[i]
            target = self.targets[io.target_id]
            pooled = scratch[i]
            try:
                rec, data = target.engine.read(
                    io.chunk.inode,
                    io.chunk.index,
                    io.offset,
                    io.length,
                    verify,
                    pooled.view if pooled is not None else _NO_BUFFER,
                    nowait,
                )
            except ChainfsError as e:
                results[i] = _refused(e.code, e.message)
                continue
            except BlockingIOError:
                assert nowait
                deferred.append(i)
                continue
            except OSError as e:
                if nowait and e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    log.info("RWF_NOWAIT refused (%s): all reads go to the I/O threads", e)
                    self._inline_reads = False
                    deferred.append(i)
                    continue
                results[i] = _refused(Code.EIO, str(e))
                continue
            buffers[i] = data
            if rec is None:
                results[i] = _MISSING
            else:
                results[i] = (len(data), rec.committed_version, rec.length, rec.crc32c)
        return deferred

    async def query_last_chunk(self, req: sp.QueryLastChunkReq) -> sp.QueryLastChunkRsp:
        routing = await self._routing_naming([(req.chain_id, req.target_id)])
        target = self._readable(routing, req.chain_id, req.target_id)
        found = await self._io(target.engine.last_chunk, req.inode)
        if found is None:
            return sp.QueryLastChunkRsp(status=_ok(), found=False)
        index, rec = found
        return sp.QueryLastChunkRsp(
            status=_ok(),
            found=True,
            index=index,
            length=rec.length,
            committed_version=rec.committed_version,
        )

    async def list_chunks(self, req: sp.ListChunksReq) -> sp.ListChunksRsp:
        routing = await self._routing_naming([(req.chain_id, req.target_id)])
        target = self._readable(routing, req.chain_id, req.target_id)
        limit = min(req.limit or self.config.max_list_chunks, self.config.max_list_chunks)
        found = await self._io(
            target.engine.list_chunks, req.inode, req.begin_index, 1 << 32, limit + 1
        )
        rsp = sp.ListChunksRsp(status=_ok(), more=len(found) > limit)
        for index, rec in found[:limit]:
            rsp.chunks.append(record_to_meta(req.inode, index, rec))
        return rsp
