"""Thin client of the storage service's data plane (used by the client library and meta).

Writes and truncates go to the chain head; retries after STALE_CHAIN_VERSION,
TARGET_NOT_SERVING or UNAVAILABLE refresh routing and reuse the SAME request id,
so the storage side applies them once. Reads go to any SERVING replica, chosen
at random for load balance; a replica answering NOT_COMMITTED, CHECKSUM_MISMATCH
or UNAVAILABLE is skipped for another (the tail last, as it is always committed).
A node that crashes or resets the connection, even in the middle of a reply,
is UNAVAILABLE (the data plane drops that connection); a malformed reply
(BAD_FRAME) from a live node is skipped the same way. Either is bounded by
``attempts`` per read, and a read fails only once no replica served it.
Many reads to one storage node travel as one batched frame, and the bytes land
straight in the caller's buffers.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError

from chainfs.common.auth.capability import READ, WRITE
from chainfs.common.checksum import crc32c, crc32c_extend
from chainfs.common.dataplane.client import DataClient
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.dataplane.sync_client import SyncDataClient, SyncRequest
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing, data_address
from chainfs.common.rpc.mgmt_client import RoutingCache
from chainfs.common.rpc.read_coalescer import IOResult, ReadCoalescer, ReadIO
from chainfs.proto import common_pb2 as cp
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp

log = logging.getLogger(__name__)

# Worth another attempt after refreshing routing (and a short pause).
_RETRY_WRITE = frozenset(
    {
        Code.STALE_CHAIN_VERSION,
        Code.TARGET_NOT_SERVING,
        Code.UNAVAILABLE,
        Code.ETIMEDOUT,
        Code.NOT_COMMITTED,
        Code.CHUNK_VERSION_MISMATCH,
        Code.FENCED,
    }
)
# Worth asking another replica.
_RETRY_READ = frozenset(
    {
        Code.NOT_COMMITTED,
        Code.CHECKSUM_MISMATCH,
        Code.UNAVAILABLE,
        Code.ETIMEDOUT,
        Code.TARGET_NOT_SERVING,
        Code.STALE_CHAIN_VERSION,
        Code.UNKNOWN_TARGET,
        Code.FENCED,
        Code.EIO,
        Code.BAD_FRAME,  # a malformed reply from one replica: another may answer well
    }
)


MAX_CHUNK_INDEX = 2**32  # end of the chunk index space (remove_chunks' bound)


@dataclass
class StorageClientConfig:
    attempts: int = 10  # tries of one operation (each after a routing refresh) before failing
    retry_backoff_ms: int = 20  # first pause between attempts, doubled each time
    retry_backoff_max_ms: int = 1_000  # bound on that pause
    # Writes, truncates and removes keep retrying (same request id) past `attempts`
    # until this much time has passed since the first try: a chain change after
    # a node dies takes up to mgmtd's heartbeat timeout (10 s by default) plus a
    # resync-free reshuffle, so the default rides out one failover. 0 = `attempts` only.
    retry_total_ms: int = 30_000
    timeout_ms: int = 30_000  # one data-plane request
    max_parallel_nodes: int = 32  # batched read frames in flight at once
    max_ios_per_batch: int = 1024  # ios in one batched read frame
    # Frames of small reads in flight per storage node before further small
    # reads to it wait and go together in one batched frame (read_coalescer);
    # 0 = off, every read_batch call sends its own frames.
    coalesce_frames_per_node: int = 1
    # A read_batch call's reads to one node of at most this many bytes coalesce;
    # a shared frame asks for at most 16 times this (and max_ios_per_batch ios).
    coalesce_read_max_bytes: int = 64 * 1024
    max_remove_rounds: int = 1 << 20  # bound on remove_chunks' paging loop
    prefer_unix_socket: bool = True  # same-host storage nodes through their unix socket
    # Check a whole-chunk read against the CRC32C the server stored (one more pass
    # over the bytes, in the client). Off: the server verifies reads by default.
    verify_checksums: bool = False
    dataplane: DataPlaneConfig = field(default_factory=DataPlaneConfig)

    def validate(self) -> None:
        for name in (
            "attempts",
            "timeout_ms",
            "max_parallel_nodes",
            "max_ios_per_batch",
            "coalesce_read_max_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.coalesce_frames_per_node < 0:
            raise ValueError("coalesce_frames_per_node must be >= 0")


@dataclass
class ReadReq:
    chain_id: int
    inode: int
    chunk_index: int
    offset: int
    length: int
    out: memoryview | None = None  # receive here (at least `length` bytes) instead of a new buffer


def _as_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def batch_read_request(
    ios: Sequence[tuple[ReadReq, int]], caps: dict[int, cp.Capability]
) -> sp.BatchReadReq:
    """One batched read frame's header: each (read, target replica), with the
    capability of each distinct inode found in ``caps``."""
    batch = sp.BatchReadReq()
    inodes: set[int] = set()
    for r, target in ios:
        # add() fills the repeated field in place (no temporary ReadIO/ChunkId to copy).
        io = batch.ios.add(chain_id=r.chain_id, target_id=target, offset=r.offset, length=r.length)
        io.chunk.inode = r.inode
        io.chunk.index = r.chunk_index
        inodes.add(r.inode)
    batch.capabilities.extend(caps[ino] for ino in inodes if ino in caps)
    return batch


def parse_batch_read_reply(header: bytes, ios: int) -> sp.BatchReadRsp:
    """A batched read's reply header; BAD_FRAME unless it holds one result per io."""
    try:
        rsp = sp.BatchReadRsp.FromString(header)
    except DecodeError as e:
        raise ChainfsError(Code.BAD_FRAME, f"bad batch read reply: {e}") from None
    if len(rsp.results) != ios:
        raise ChainfsError(
            Code.BAD_FRAME, f"batch read reply has {len(rsp.results)} results for {ios} ios"
        )
    return rsp


class CapabilitySource(Protocol):
    """Where a client's storage requests find their capabilities (chainfs.client.caps)."""

    async def get(
        self, inodes: Collection[int], right: int, fetch: bool = False
    ) -> dict[int, cp.Capability]: ...

    async def any_of(self, inode: int, fetch: bool = False) -> cp.Capability | None: ...

    def forget(self, inodes: Iterable[int]) -> None: ...

    def peek(self, inode: int, right: int) -> cp.Capability | None:
        """A fresh capability held now, or None; no fetch, safe from any thread."""
        ...

    @property
    def signed(self) -> bool:
        """Whether this cluster's meta signs capabilities (one was ever received)."""
        ...


class StorageClient:
    """Reads and updates chunks through the storage nodes' data plane.

    A client's requests carry capabilities from ``caps`` (WRITE for updates and
    removes, READ for reads, either for length queries); one storage refuses
    (BAD_CAPABILITY) is fetched again once, then the refusal stands (EACCES).
    A node (meta) has no ``caps`` and presents its ``credential`` instead.
    """

    def __init__(
        self,
        routing: RoutingCache,
        client_id: bytes,
        config: StorageClientConfig | None = None,
        caps: CapabilitySource | None = None,
        credential: cp.Credential | None = None,
    ) -> None:
        if not client_id:
            raise ChainfsError(Code.EINVAL, "a storage client needs a client id")
        self.routing = routing
        self.client_id = bytes(client_id)
        self.config = config or StorageClientConfig()
        self.caps = caps
        self.dp = DataClient(self.config.dataplane, credential)
        # Request ids increase per client; time-seeded so a restarted process
        # reusing a client id does not collide with its predecessor's ids.
        self._ids = itertools.count(time.time_ns() // 1000)
        self._rng = random.Random()
        self._sync_rng = random.Random()  # read_now's, used from callers' threads
        cfg = self.config
        self.coalescer = (
            ReadCoalescer(
                self._fetch_reads,
                cfg.coalesce_frames_per_node,
                cfg.max_ios_per_batch,
                16 * cfg.coalesce_read_max_bytes,
            )
            if cfg.coalesce_frames_per_node
            else None
        )

    def next_request_id(self) -> int:
        return next(self._ids)

    async def close(self) -> None:
        await self.dp.close()

    async def set_credential(self, credential: cp.Credential) -> None:
        """Present ``credential`` from now on (meta learns its node id after
        making its storage client); connections made before are closed."""
        old, self.dp = self.dp, DataClient(self.config.dataplane, credential)
        await old.close()

    async def __aenter__(self) -> StorageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- routing -----------------------------------------------------------

    @property
    def timeout_s(self) -> float:
        return self.config.timeout_ms / 1000

    async def _chain(self, chain_id: int) -> tuple[Routing, mp.ChainInfo]:
        routing = await self.routing.get()
        chain = routing.chains.get(chain_id)
        if chain is None:
            routing = await self.routing.refresh()
            chain = routing.chains.get(chain_id)
            if chain is None:
                raise ChainfsError(Code.UNKNOWN_CHAIN, f"no chain {chain_id}")
        return routing, chain

    def _address(self, routing: Routing, target_id: int) -> str:
        node = routing.node_of_target(target_id)
        address = data_address(node, self.config.prefer_unix_socket)
        if node.data_address and address != node.data_address:
            # Another user's (or a stale) unix socket: the data plane uses TCP.
            self.dp.unix_fallbacks[address] = node.data_address
        return address

    async def _pause(self, attempt: int) -> None:
        delay = min(self.config.retry_backoff_ms * (2**attempt), self.config.retry_backoff_max_ms)
        await asyncio.sleep(delay / 1000 * (0.5 + self._rng.random() / 2))

    async def _refresh(self) -> None:
        try:
            await self.routing.refresh()
        except ChainfsError as e:
            log.debug("routing refresh failed: %s", e)

    def _refetch_capability(self, e: ChainfsError, inodes: Iterable[int], refetched: bool) -> bool:
        """After BAD_CAPABILITY: drop the refused capabilities and say whether to try
        once more with fresh ones from meta (expired, or never fetched)."""
        if e.code != Code.BAD_CAPABILITY or refetched or self.caps is None:
            return False
        self.caps.forget(inodes)
        return True

    # ---- updates -----------------------------------------------------------

    async def _to_head(
        self,
        msg_type: int,
        build: type[sp.UpdateReq] | type[sp.RemoveChunksReq],
        fill: dict,
        chain_id: int,
        payload: list[memoryview],
        inode: int,
    ) -> bytes:
        """Send a request about ``inode`` to the chain head; retry (same request id)
        per the rules above."""
        request_id = self.next_request_id()
        last: ChainfsError | None = None
        deadline = time.monotonic() + self.config.retry_total_ms / 1000
        attempt = -1
        refetched = False
        while True:
            attempt += 1
            more = attempt + 1 < self.config.attempts or time.monotonic() < deadline
            routing, chain = await self._chain(chain_id)
            head = routing.head(chain_id)
            if head is None:
                last = ChainfsError(
                    Code.TARGET_NOT_SERVING, f"chain {chain_id} has no serving target"
                )
            else:
                req = build(
                    req=cp.RequestInfo(client_id=self.client_id, request_id=request_id),
                    chain_id=chain_id,
                    chain_version=chain.chain_version,
                    target_id=head.target_id,
                    **fill,
                )
                if self.caps is not None:
                    got = await self.caps.get([inode], WRITE, fetch=refetched)
                    if inode in got:
                        req.capability.CopyFrom(got[inode])
                try:
                    reply = await self.dp.request(
                        self._address(routing, head.target_id),
                        msg_type,
                        req.SerializeToString(),
                        payload=payload,
                        timeout_s=self.timeout_s,
                    )
                    return bytes(reply.header)
                except ChainfsError as e:
                    if self._refetch_capability(e, [inode], refetched):
                        refetched = True
                        continue
                    if e.code not in _RETRY_WRITE:
                        raise
                    last = e
            if not more:
                break
            await self._pause(min(attempt, 16))
            await self._refresh()
        assert last is not None
        raise ChainfsError(
            last.code,
            f"{last.message} (gave up after {attempt + 1} attempts, "
            f"retry_total_ms={self.config.retry_total_ms})",
        )

    async def write(
        self,
        chain_id: int,
        inode: int,
        chunk_index: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        chunk_size: int,
    ) -> None:
        """Write ``data`` at ``offset`` of one chunk (replicated on the whole chain)."""
        await self.write_parts(chain_id, inode, chunk_index, offset, [_as_view(data)], chunk_size)

    async def write_parts(
        self,
        chain_id: int,
        inode: int,
        chunk_index: int,
        offset: int,
        parts: Sequence[memoryview],
        chunk_size: int,
    ) -> None:
        """Write ``parts``, one after the other, at ``offset`` of one chunk: sent
        as they are (scatter-gather, no joining copy), one update on the chain."""
        views = [v for v in (_as_view(p) for p in parts) if len(v)]
        length = sum(len(v) for v in views)
        if offset < 0 or offset + length > chunk_size:
            raise ChainfsError(
                Code.EINVAL,
                f"write [{offset}, {offset + length}) outside a chunk of {chunk_size} bytes",
            )
        crc = 0
        for v in views:
            crc = crc32c_extend(crc, v)
        fill = dict(
            chunk=sp.ChunkId(inode=inode, index=chunk_index),
            type=sp.WRITE,
            offset=offset,
            length=length,
            crc32c=crc,
            chunk_size=chunk_size,
        )
        await self._to_head(sp.UPDATE, sp.UpdateReq, fill, chain_id, views, inode)

    async def truncate(
        self, chain_id: int, inode: int, chunk_index: int, length: int, chunk_size: int
    ) -> None:
        """Make one chunk ``length`` bytes long (cut, or zero-extended)."""
        if not 0 <= length <= chunk_size:
            raise ChainfsError(Code.EINVAL, f"truncate to {length} outside [0, {chunk_size}]")
        fill = dict(
            chunk=sp.ChunkId(inode=inode, index=chunk_index),
            type=sp.TRUNCATE,
            length=length,
            chunk_size=chunk_size,
        )
        await self._to_head(sp.UPDATE, sp.UpdateReq, fill, chain_id, [], inode)

    async def remove_chunks(
        self, chain_id: int, inode: int, begin_index: int = 0, end_index: int = MAX_CHUNK_INDEX
    ) -> int:
        """Remove chunks [begin_index, end_index) of ``inode`` on one chain; returns how many."""
        if not 0 <= begin_index <= end_index <= MAX_CHUNK_INDEX:
            raise ChainfsError(Code.EINVAL, f"bad chunk range [{begin_index}, {end_index})")
        total = 0
        for _ in range(self.config.max_remove_rounds):
            fill = dict(inode=inode, begin_index=begin_index, end_index=end_index)
            raw = await self._to_head(
                sp.REMOVE_CHUNKS, sp.RemoveChunksReq, fill, chain_id, [], inode
            )
            rsp = sp.RemoveChunksRsp.FromString(raw)
            total += rsp.removed
            if not rsp.more:
                return total
        raise ChainfsError(Code.E2BIG, f"inode {inode}: too many chunks to remove")

    # ---- reads -------------------------------------------------------------

    async def read(
        self,
        chain_id: int,
        inode: int,
        chunk_index: int,
        offset: int,
        length: int,
        out: memoryview | None = None,
    ) -> memoryview:
        """Committed bytes of one chunk (shorter at its end; empty for a missing chunk)."""
        got = await self.read_batch([ReadReq(chain_id, inode, chunk_index, offset, length, out)])
        return got[0]

    async def read_batch(self, reqs: Sequence[ReadReq]) -> list[memoryview]:
        """Many chunk reads: one batched frame per storage node, all nodes in parallel."""
        if self.caps is None:
            return await self._read_batch(reqs, {})
        inodes = {r.inode for r in reqs}
        caps = await self.caps.get(inodes, READ)
        try:
            return await self._read_batch(reqs, caps)
        except ChainfsError as e:
            if not self._refetch_capability(e, inodes, False):
                raise
        return await self._read_batch(reqs, await self.caps.get(inodes, READ, fetch=True))

    async def _read_batch(
        self, reqs: Sequence[ReadReq], caps: dict[int, cp.Capability]
    ) -> list[memoryview]:
        for r in reqs:
            if r.offset < 0 or r.length < 0:
                raise ChainfsError(Code.EINVAL, f"bad read range [{r.offset}, +{r.length})")
            if r.out is not None and len(r.out) < r.length:
                raise ChainfsError(
                    Code.EINVAL, f"out buffer of {len(r.out)} bytes for a {r.length}-byte read"
                )
        results: list[memoryview | None] = [None] * len(reqs)
        tried: list[set[int]] = [set() for _ in reqs]
        prefer_tail: list[bool] = [False] * len(reqs)
        todo = [i for i, r in enumerate(reqs) if r.length > 0]
        for i, r in enumerate(reqs):
            if r.length == 0:
                results[i] = memoryview(b"")
        last: dict[int, ChainfsError] = {}
        sem = asyncio.Semaphore(self.config.max_parallel_nodes)
        for attempt in range(self.config.attempts):
            if not todo:
                break
            routing = await self.routing.get()
            groups: dict[int, list[tuple[int, int]]] = {}  # node id -> [(req index, target)]
            # Serving targets per chain, computed once per attempt (not per io).
            serving_of: dict[int, list[int]] = {}
            for i in todo:
                r = reqs[i]
                serving = serving_of.get(r.chain_id)
                if serving is None:
                    chain = routing.chains.get(r.chain_id)
                    if chain is None:
                        routing = await self.routing.refresh()
                        serving_of.clear()
                        chain = routing.chains.get(r.chain_id)
                        if chain is None:
                            raise ChainfsError(Code.UNKNOWN_CHAIN, f"no chain {r.chain_id}")
                    serving = [
                        t.target_id for t in routing.chain_targets(r.chain_id, (mp.SERVING,))
                    ]
                    serving_of[r.chain_id] = serving
                if not serving:
                    last[i] = ChainfsError(
                        Code.TARGET_NOT_SERVING, f"chain {r.chain_id} has no serving target"
                    )
                    continue
                fresh = [t for t in serving if t not in tried[i]] if tried[i] else serving
                if not fresh:
                    tried[i].clear()
                    fresh = serving
                if prefer_tail[i] and serving[-1] in fresh:
                    target = serving[-1]
                else:
                    target = self._rng.choice(fresh)
                node_id = routing.targets[target].node_id
                groups.setdefault(node_id, []).append((i, target))

            async def one_node(items: list[tuple[int, int]], routing: Routing = routing) -> None:
                async with sem:
                    await self._read_node(routing, reqs, items, results, last, prefer_tail, caps)

            per_node = self.config.max_ios_per_batch
            if len(groups) == 1 and len(items := next(iter(groups.values()))) <= per_node:
                # One frame to one node (a lone small read): no task, no gather.
                await self._read_node(routing, reqs, items, results, last, prefer_tail, caps)
            else:
                jobs = []
                for items in groups.values():
                    for k in range(0, len(items), per_node):
                        jobs.append(one_node(items[k : k + per_node]))
                await asyncio.gather(*jobs)
            for i, target in itertools.chain.from_iterable(groups.values()):
                if results[i] is None:
                    tried[i].add(target)
            todo = [i for i in todo if results[i] is None]
            if todo and attempt + 1 < self.config.attempts:
                # Another replica right away; pause only once every replica was tried.
                exhausted = any(
                    len(tried[i]) >= len(routing.chains[reqs[i].chain_id].targets) for i in todo
                )
                if exhausted or attempt >= 2:
                    await self._pause(attempt)
                    await self._refresh()
        if todo:
            i = todo[0]
            err = last.get(i) or ChainfsError(Code.EIO, "read failed")
            raise ChainfsError(
                err.code,
                f"read of chunk ({reqs[i].inode}, {reqs[i].chunk_index}) on chain "
                f"{reqs[i].chain_id}: {err.message} (after {self.config.attempts} attempts)",
            )
        return [r if r is not None else memoryview(b"") for r in results]

    async def _fetch_reads(
        self, address: str, ios: Sequence[ReadIO], caps: dict[int, cp.Capability]
    ) -> list[IOResult]:
        """One batched read frame to ``address``: each io's result and where its
        bytes landed (its ``out``, or a new buffer). ChainfsError when the frame
        failed as a whole."""
        batch = batch_read_request(ios, caps)
        got: list[memoryview | None] = [None] * len(ios)
        parsed: list[sp.BatchReadRsp] = []

        def parse(rsp_header: bytes) -> sp.BatchReadRsp:
            rsp = parse_batch_read_reply(rsp_header, len(ios))
            parsed.append(rsp)
            return rsp

        def sink(rsp_type: int, rsp_header: bytes) -> list[memoryview]:
            """Called once the reply header is in: where each io's bytes go."""
            rsp = parse(rsp_header)
            dests: list[memoryview] = []
            for k, res in enumerate(rsp.results):
                if res.status.code != 0:
                    continue
                n = res.length
                r = ios[k][0]
                if n > r.length:
                    raise ChainfsError(
                        Code.BAD_FRAME, f"server returned {n} bytes for a {r.length}-byte read"
                    )
                dest = r.out[:n] if r.out is not None else memoryview(bytearray(n))
                got[k] = dest
                if n:
                    dests.append(dest)
            return dests

        reply = await self.dp.request(
            address,
            sp.BATCH_READ,
            batch.SerializeToString(),
            payload_sink=sink,
            timeout_s=self.timeout_s,
        )
        rsp = parsed[0] if parsed else parse(reply.header)  # no payload: sink not called
        return list(zip(rsp.results, got, strict=True))

    async def _read_node(
        self,
        routing: Routing,
        reqs: Sequence[ReadReq],
        items: list[tuple[int, int]],
        results: list[memoryview | None],
        last: dict[int, ChainfsError],
        prefer_tail: list[bool],
        caps: dict[int, cp.Capability],
    ) -> None:
        ios = [(reqs[i], target) for i, target in items]
        address = self._address(routing, items[0][1])
        try:
            nbytes = sum(r.length for r, _ in ios)
            if self.coalescer is not None and nbytes <= self.config.coalesce_read_max_bytes:
                got = await self.coalescer.read(address, ios, caps, nbytes)
            else:
                got = await self._fetch_reads(address, ios, caps)
        except ChainfsError as e:
            if e.code not in _RETRY_READ:
                raise
            for i, _ in items:
                last[i] = e
            return
        for k, (res, got_k) in enumerate(got):
            i = items[k][0]
            data = got_k if got_k is not None else memoryview(b"")
            if res.status.code == 0 and not self._whole_chunk_corrupt(reqs[i], res, data):
                results[i] = data
                continue
            if res.status.code == 0:
                err = ChainfsError(
                    Code.CHECKSUM_MISMATCH,
                    f"chunk ({reqs[i].inode}, {reqs[i].chunk_index}) from target "
                    f"{items[k][1]} does not match its stored CRC32C",
                )
            else:
                err = ChainfsError(res.status.code, res.status.message)
            if err.code not in _RETRY_READ:
                raise err
            if err.code == Code.NOT_COMMITTED:
                prefer_tail[i] = True
            last[i] = err

    def read_now(self, sync: SyncDataClient, req: ReadReq) -> memoryview | None:
        """One chunk read served from the calling thread (any thread, no event
        loop) through ``sync``: a serving replica of the chain as the routing
        held now says (picked at random, like ``read_batch``), the capability
        held now. The bytes (into ``req.out``) only for a clean answer: the
        replica answered OK with exactly ``req.length`` bytes (and, with
        ``verify_checksums``, a whole chunk matching its stored CRC32C). None
        for anything else (no routing yet, no serving replica, no capability
        held in a cluster that signs them, an error answer, a short read, a
        timeout, connection trouble): the caller then reads through
        ``read_batch``, which retries, fails over and refreshes what it must."""
        out = req.out
        assert out is not None and len(out) >= req.length > 0, (req.length, out)
        routing = self.routing.current
        if routing is None or req.chain_id not in routing.chains:
            return None
        serving = routing.chain_targets(req.chain_id, (mp.SERVING,))
        if not serving:
            return None
        target = self._sync_rng.choice(serving).target_id
        caps: dict[int, cp.Capability] = {}
        if self.caps is not None:
            cap = self.caps.peek(req.inode, READ)
            if cap is not None:
                caps[req.inode] = cap
            elif self.caps.signed:
                return None  # fetching one is the async path's job
        header = batch_read_request([(req, target)], caps).SerializeToString()
        results: list[sp.ReadResult] = []

        def sink(msg_type: int, rsp_header: bytes) -> list[memoryview]:
            res = parse_batch_read_reply(rsp_header, 1).results[0]
            results.append(res)
            return [out[: res.length]] if res.status.code == 0 and res.length <= req.length else []

        address = f"target {target}"
        try:
            node = routing.node_of_target(target)
            address = data_address(node, self.config.prefer_unix_socket)
            fallback = node.data_address if node.data_address != address else None
            _, rsp_header = sync.request(address, sp.BATCH_READ, header, sink, fallback)
            if not results:  # no payload: the sink was not called
                results.append(parse_batch_read_reply(rsp_header, 1).results[0])
        except (ChainfsError, KeyError) as e:
            log.debug("sync read of chunk (%d, %d) from %s: %s", req.inode, req.chunk_index,
                      address, e)  # fmt: skip
            return None
        res = results[0]
        data = out[: req.length]
        if res.status.code != 0 or res.length != req.length:
            return None
        if self._whole_chunk_corrupt(req, res, data):
            return None
        return data

    def read_now_many(
        self, sync: SyncDataClient, reqs: Sequence[ReadReq]
    ) -> list[memoryview | None]:
        """Many chunk reads as :meth:`read_now` serves one: each from a serving
        replica picked at random, one batched frame per storage node (at most
        ``max_ios_per_batch`` ios each), every frame sent before any reply is
        read. Per read its bytes, or None where ``read_now`` would answer None."""
        results: list[memoryview | None] = [None] * len(reqs)
        routing = self.routing.current
        if routing is None:
            return results
        serving_of: dict[int, list[mp.TargetInfo]] = {}
        caps: dict[int, cp.Capability] = {}
        frames: dict[int, list[tuple[int, int]]] = {}  # node id -> [(read index, target)]
        for i, req in enumerate(reqs):
            assert req.out is not None and len(req.out) >= req.length > 0, (req.length, req.out)
            serving = serving_of.get(req.chain_id)
            if serving is None:
                known = req.chain_id in routing.chains
                serving = routing.chain_targets(req.chain_id, (mp.SERVING,)) if known else []
                serving_of[req.chain_id] = serving
            if not serving:
                continue
            if self.caps is not None and req.inode not in caps:
                cap = self.caps.peek(req.inode, READ)
                if cap is not None:
                    caps[req.inode] = cap
                elif self.caps.signed:
                    continue  # fetching one is the async path's job
            target = self._sync_rng.choice(serving)
            frames.setdefault(target.node_id, []).append((i, target.target_id))
        requests: list[SyncRequest] = []
        # Per frame: its (read index, target) ios and its reply once parsed.
        ios_of: list[tuple[list[tuple[int, int]], list[sp.BatchReadRsp]]] = []
        per_frame = self.config.max_ios_per_batch
        for node_id, items in frames.items():
            node = routing.nodes.get(node_id)
            try:
                if node is None:
                    raise ChainfsError(Code.UNKNOWN_TARGET, f"no node {node_id} in the routing")
                address = data_address(node, self.config.prefer_unix_socket)
            except ChainfsError as e:
                log.debug("sync read of %d chunks: %s", len(items), e)
                continue
            fallback = node.data_address if node.data_address != address else None
            for k in range(0, len(items), per_frame):
                ios = items[k : k + per_frame] if len(items) > per_frame else items
                header = batch_read_request([(reqs[i], t) for i, t in ios], caps)
                parsed: list[sp.BatchReadRsp] = []
                sink = functools.partial(self._sink_now, reqs, ios, results, parsed)
                requests.append(
                    SyncRequest(address, sp.BATCH_READ, header.SerializeToString(), sink, fallback)
                )
                ios_of.append((ios, parsed))
        replies = sync.request_many(requests)
        for (ios, parsed), request, reply in zip(ios_of, requests, replies, strict=True):
            if isinstance(reply, ChainfsError):
                log.debug("sync read of %d chunks from %s: %s", len(ios), request.address, reply)
                for i, _ in ios:
                    results[i] = None
                continue
            try:
                rsp = parsed[0] if parsed else parse_batch_read_reply(reply[1], len(ios))
            except ChainfsError as e:  # no payload came: the sink did not parse it
                log.debug("sync read from %s: %s", request.address, e)
                rsp = None
            for k, (i, _) in enumerate(ios):
                req, data = reqs[i], results[i]
                res = rsp.results[k] if rsp is not None else None
                if (
                    data is None
                    or res is None
                    or res.status.code != 0
                    or res.length != req.length
                    or self._whole_chunk_corrupt(req, res, data)
                ):
                    results[i] = None
        return results

    @staticmethod
    def _sink_now(
        reqs: Sequence[ReadReq],
        ios: list[tuple[int, int]],
        results: list[memoryview | None],
        parsed: list[sp.BatchReadRsp],
        msg_type: int,
        rsp_header: bytes,
    ) -> list[memoryview]:
        """Where a sync batched read's payload goes: each OK io's bytes into its
        read's ``out`` (noted in ``results``; the reply kept in ``parsed``);
        BAD_FRAME for an io longer than its read."""
        rsp = parse_batch_read_reply(rsp_header, len(ios))
        parsed.append(rsp)
        dests: list[memoryview] = []
        for (i, _), res in zip(ios, rsp.results, strict=True):
            if res.status.code != 0 or not res.length:
                continue
            req = reqs[i]
            if res.length > req.length:
                raise ChainfsError(
                    Code.BAD_FRAME,
                    f"server returned {res.length} bytes for a {req.length}-byte read",
                )
            assert req.out is not None
            results[i] = dest = req.out[: res.length]
            dests.append(dest)
        return dests

    def _whole_chunk_corrupt(self, req: ReadReq, res: sp.ReadResult, data: memoryview) -> bool:
        """End-to-end check (config ``verify_checksums``) of a read that got a whole chunk."""
        if not self.config.verify_checksums or req.offset != 0:
            return False
        if res.length != res.chunk_length or res.committed_version == 0:
            return False
        return crc32c(data) != res.chunk_crc32c

    # ---- queries -----------------------------------------------------------

    async def _to_tail(self, chain_id: int, msg_type: int, req_fields: dict) -> bytes:
        """A query answered by the chain's tail (always committed), else another replica."""
        last: ChainfsError | None = None
        refetched = False
        for attempt in range(self.config.attempts):
            routing, _ = await self._chain(chain_id)
            serving = [t.target_id for t in routing.chain_targets(chain_id, (mp.SERVING,))]
            if not serving:
                last = ChainfsError(
                    Code.TARGET_NOT_SERVING, f"chain {chain_id} has no serving target"
                )
            else:
                target = serving[-1] if attempt % 2 == 0 else self._rng.choice(serving)
                msg_cls = (
                    sp.QueryLastChunkReq if msg_type == sp.QUERY_LAST_CHUNK else sp.ListChunksReq
                )
                req = msg_cls(chain_id=chain_id, target_id=target, **req_fields)
                if self.caps is not None and isinstance(req, sp.QueryLastChunkReq):
                    cap = await self.caps.any_of(req.inode, fetch=refetched)
                    if cap is not None:
                        req.capability.CopyFrom(cap)
                try:
                    reply = await self.dp.request(
                        self._address(routing, target),
                        msg_type,
                        req.SerializeToString(),
                        timeout_s=self.timeout_s,
                    )
                    return bytes(reply.header)
                except ChainfsError as e:
                    if self._refetch_capability(e, [req_fields["inode"]], refetched):
                        refetched = True
                        continue
                    if e.code not in _RETRY_READ:
                        raise
                    last = e
            if attempt + 1 < self.config.attempts:
                await self._pause(attempt)
                await self._refresh()
        assert last is not None
        raise last

    async def query_last_chunk(self, chain_id: int, inode: int) -> tuple[int, int] | None:
        """(chunk index, length) of the highest chunk of ``inode`` on this chain, or None."""
        raw = await self._to_tail(chain_id, sp.QUERY_LAST_CHUNK, {"inode": inode})
        rsp = sp.QueryLastChunkRsp.FromString(raw)
        if not rsp.found:
            return None
        return rsp.index, rsp.length

    async def list_chunks(self, chain_id: int, inode: int) -> list[sp.ChunkMeta]:
        """Metadata of every chunk of ``inode`` on this chain, in index order."""
        out: list[sp.ChunkMeta] = []
        begin = 0
        while True:
            raw = await self._to_tail(
                chain_id, sp.LIST_CHUNKS, {"inode": inode, "begin_index": begin}
            )
            rsp = sp.ListChunksRsp.FromString(raw)
            out.extend(rsp.chunks)
            if not rsp.more or not rsp.chunks:
                return out
            begin = rsp.chunks[-1].chunk.index + 1


class ChunkStorage(Protocol):
    """The chunk calls of StorageClient that meta and cut_chunks use (fakes implement them)."""

    async def query_last_chunk(self, chain_id: int, inode: int) -> tuple[int, int] | None: ...

    async def remove_chunks(
        self, chain_id: int, inode: int, begin_index: int = 0, end_index: int = MAX_CHUNK_INDEX
    ) -> int: ...

    async def truncate(
        self, chain_id: int, inode: int, chunk_index: int, length: int, chunk_size: int
    ) -> None: ...


async def cut_chunks(
    storage: ChunkStorage,
    chains: Sequence[int],
    inode: int,
    chunk_size: int,
    size: int,
    max_parallel_chains: int,
) -> None:
    """Drop every byte of a file at or beyond ``size`` from storage, on every chain of
    its layout (``max_parallel_chains`` calls at once)."""
    assert chunk_size > 0 and chains and size >= 0, (chunk_size, chains, size)
    keep = -(-size // chunk_size)  # chunks [0, keep) hold bytes below size
    sem = asyncio.Semaphore(max_parallel_chains)

    async def remove(chain: int) -> int:
        async with sem:
            return await storage.remove_chunks(chain, inode, keep, MAX_CHUNK_INDEX)

    await asyncio.gather(*(remove(c) for c in chains))
    tail = size - (keep - 1) * chunk_size if keep else 0
    if keep and tail < chunk_size:
        # The last kept chunk is partial: cut it if it exists and is longer.
        chain = chains[(keep - 1) % len(chains)]
        last = await storage.query_last_chunk(chain, inode)
        if last is not None and last[0] == keep - 1 and last[1] > tail:
            await storage.truncate(chain, inode, keep - 1, tail, chunk_size)
