"""Background work of a meta server, in bounded rounds.

- :class:`GarbageCollector`: files whose last name and last open session (read
  or write) are gone wait in ``GCQU``; a round takes up to ``gc_batch`` due entries, removes
  their chunks from every chain of their layout (``gc_concurrency`` files at
  once), then deletes the inode in a transaction. A failed removal is retried
  after ``gc_retry_delay_ms``.
- :class:`SessionPruner`: clients whose last keep-alive is older than
  ``session_timeout_ms`` have their sessions closed (a write session's file
  length is taken from storage, as on close) and their record removed; an
  unlinked file a dead client held open is then collected.
- :class:`IdempotencyCleaner`: answers older than ``idempotency_ttl_ms`` are
  dropped, oldest first, ``idempotency_clean_batch`` per round.

Every meta server runs them; two servers working on the same entry conflict in
the KV store and one of them re-reads and finds the work done. Storage
removals are idempotent, so doing one twice is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time

from chainfs.common.background import Periodic
from chainfs.common.errors import ChainfsError
from chainfs.kv import KVStore, Transaction
from chainfs.meta_service import chunks, perm, schema
from chainfs.meta_service.chunks import ChunkStorage
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.ctx import FILE, Ctx
from chainfs.meta_service.namespace import Namespace
from chainfs.meta_service.ops.locks import drop_client_locks
from chainfs.proto import meta_pb2 as pb

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class GarbageCollector(Periodic):
    name = "gc"

    def __init__(self, kv: KVStore, cfg: MetaConfig, storage: ChunkStorage) -> None:
        super().__init__(cfg.gc_interval_ms / 1000)
        self.kv = kv
        self.cfg = cfg
        self.storage = storage
        self.removed_files = 0
        self.removed_chunks = 0

    async def due(self, limit: int) -> list[tuple[bytes, int]]:
        now = _now_ms()

        async def fn(tx: Transaction) -> list[tuple[bytes, int]]:
            rows = await tx.get_range(schema.GCQU, schema.gc_due_end(now), limit=limit)
            return [(k, schema.parse_gc_key(k)[1]) for k, _ in rows]

        return await self.kv.transact(fn, read_only=True)

    async def round(self) -> bool:
        batch = await self.due(self.cfg.gc_batch)
        sem = asyncio.Semaphore(self.cfg.gc_concurrency)

        async def one(key: bytes, ino: int) -> None:
            async with sem:
                try:
                    await self.collect(key, ino)
                except ChainfsError as e:
                    log.warning("gc of inode %d failed, retrying later: %s", ino, e)
                    await self._postpone(key, ino)

        await asyncio.gather(*(one(k, i) for k, i in batch))
        return len(batch) == self.cfg.gc_batch

    async def collect(self, key: bytes, ino: int) -> None:
        async def open_now(tx: Transaction) -> bool:
            rows = await tx.get_range(*schema.range_of(schema.session_prefix(ino)), limit=1)
            return bool(rows)

        # Opens of a removed file need a live session, so none can start once the
        # file is queued; a session seen here is a bug: keep the chunks, its end re-queues.
        if await self.kv.transact(open_now, read_only=True):
            log.error("inode %d queued for GC while open; left to its last close", ino)

            async def drop(tx: Transaction) -> None:
                tx.clear(key)

            await self.kv.transact(drop)
            return
        raw = await self.kv.get(schema.inode_key(ino))
        if raw is not None:
            inode = schema.decode_inode(raw)
            assert inode.type == FILE and inode.nlink == 0, inode
            removed = await chunks.remove_all(self.storage, inode)
            self.removed_chunks += removed  # after the await: files are collected concurrently

        async def fn(tx: Transaction) -> bool:
            if await tx.get(key) is None:
                return False  # another server (or an operator's `admin gc`) finished it
            tx.clear(key)
            tx.clear(schema.inode_key(ino))
            await schema.count_inodes(tx, ino, -1)
            tx.clear_range(*schema.range_of(schema.xattr_prefix(ino)))
            return True

        if await self.kv.transact(fn):
            self.removed_files += 1

    async def _postpone(self, key: bytes, ino: int) -> None:
        later = schema.gc_key(_now_ms() + self.cfg.gc_retry_delay_ms, ino)

        async def fn(tx: Transaction) -> None:
            if await tx.get(key) is not None:
                tx.clear(key)
                tx.set(later, b"")

        await self.kv.transact(fn)


class SessionPruner(Periodic):
    name = "session-pruner"

    def __init__(self, kv: KVStore, cfg: MetaConfig, ns: Namespace) -> None:
        super().__init__(cfg.session_prune_interval_ms / 1000)
        self.kv = kv
        self.cfg = cfg
        self.ns = ns
        self.pruned_sessions = 0
        self.dropped_locks = 0
        self._cursor = schema.CLNT  # where the scan of client records continues

    async def round(self) -> bool:
        """Look at up to ``session_prune_batch`` client records; close the sessions
        of silent ones (bounded by the same number)."""
        limit = self.cfg.session_prune_batch
        begin, end = self._cursor, schema.range_of(schema.CLNT)[1]

        async def scan(tx: Transaction) -> list[tuple[bytes, bytes]]:
            return await tx.get_range(begin, end, limit=limit)

        rows = await self.kv.transact(scan, read_only=True)
        self._cursor = rows[-1][0] + b"\x00" if len(rows) == limit else schema.CLNT
        budget = limit
        now = _now_ms()
        for key, value in rows:
            if now - schema.decode_ms(value) <= self.cfg.session_timeout_ms:
                continue
            client = key[len(schema.CLNT) :]
            budget -= await self.prune_client(client, budget)
            if budget <= 0:
                return True
        return len(rows) == limit

    async def prune_client(self, client: bytes, limit: int) -> int:
        """Close up to ``limit`` sessions of a silent client; forget it when none is left."""
        prefix = schema.client_session_prefix(client)

        async def list_sessions(tx: Transaction) -> list[bytes]:
            rows = await tx.get_range(*schema.range_of(prefix), limit=limit)
            return [k for k, _ in rows]

        keys = await self.kv.transact(list_sessions, read_only=True)
        for key in keys:
            _, ino, sid = schema.parse_client_session_key(key)
            await self.close_session(client, ino, sid)
        dropped = await drop_client_locks(self.kv, client, limit)
        self.dropped_locks += dropped
        if len(keys) < limit and dropped < limit:
            await self._forget_client(client)
        return len(keys)

    async def close_session(self, client: bytes, ino: int, sid: bytes) -> None:
        srec = await self.kv.get(schema.session_key(ino, sid))
        read_only = srec is not None and pb.SessionRecord.FromString(srec).read_only
        raw = await self.kv.get(schema.inode_key(ino))
        length = 0
        if raw is not None and self.ns.storage is not None and not read_only:
            inode = schema.decode_inode(raw)
            if inode.type == FILE and inode.layout.chains:
                length = await chunks.exact_length(self.ns.storage, inode)

        async def fn(tx: Transaction) -> None:
            ctx = Ctx(tx, perm.ROOT, self.cfg)
            srec = await tx.get(schema.session_key(ino, sid))
            if srec is None:
                tx.clear(schema.client_session_key(client, ino, sid))
                return  # closed meanwhile
            rec = pb.SessionRecord.FromString(srec)
            raw_inode = await tx.get(schema.inode_key(ino))
            if raw_inode is not None and not rec.read_only:
                hint = rec.length_hint
                inode = await ctx.inode(ino)
                size = max(inode.size, hint, length)
                # The silent writer may have written chunks it never reported.
                if size != inode.size or inode.never_written:
                    inode.size = size
                    inode.never_written = False
                    ctx.put(inode)
            await self.ns.end_session(ctx, ino, sid, client)

        await self.kv.transact(fn)
        self.pruned_sessions += 1
        kind = "read" if read_only else "write"
        log.info("closed %s session of silent client %s on inode %d", kind, client.hex(), ino)

    async def _forget_client(self, client: bytes) -> None:
        timeout = self.cfg.session_timeout_ms

        async def fn(tx: Transaction) -> None:
            raw = await tx.get(schema.client_key(client))
            if raw is None or _now_ms() - schema.decode_ms(raw) <= timeout:
                return  # came back
            rows = await tx.get_range(
                *schema.range_of(schema.client_session_prefix(client)), limit=1
            )
            if not rows:
                tx.clear(schema.client_key(client))

        await self.kv.transact(fn)


class IdempotencyCleaner(Periodic):
    name = "idempotency-cleaner"

    def __init__(self, kv: KVStore, cfg: MetaConfig) -> None:
        super().__init__(cfg.idempotency_clean_interval_ms / 1000)
        self.kv = kv
        self.cfg = cfg
        self.expired = 0

    async def round(self) -> bool:
        limit = self.cfg.idempotency_clean_batch
        end = schema.IDET + schema.encode_ms(_now_ms())

        async def fn(tx: Transaction) -> int:
            rows = await tx.get_range(schema.IDET, end, limit=limit)
            for key, _ in rows:
                _, client, request_id = schema.parse_idem_expiry_key(key)
                tx.clear(key)
                tx.clear(schema.idem_key(client, request_id))
            return len(rows)

        n = await self.kv.transact(fn)
        self.expired += n
        return n == limit
