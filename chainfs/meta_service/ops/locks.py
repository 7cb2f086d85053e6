"""Advisory locks: flock (whole file) and POSIX byte ranges (fcntl), kept in
the KV store so that they exclude across clients and mounts.

A lock belongs to an owner: (client id, owner number the client chose: a
FUSE lock owner or a file handle, one per open file in the Python API).
``LOCK|ino|kind|client|owner`` holds that owner's ranges of one kind; flock
and POSIX locks never conflict with each other (as on Linux). A request is
one transaction: it reads every owner's record of the inode, answers the
first lock in the way, or rewrites the caller's ranges: the requested range
replaces whatever the owner held there (so a lock can be split by an unlock
or a type change in its middle), and adjacent or overlapping ranges of one
type merge (POSIX). Waiting for a lock is the client's business (it polls
with backoff); meta never blocks.

Locks live as long as their client: ``LKCL|client|...`` indexes them, a lock
refreshes the client's keep-alive record like an open does, and the session
pruner drops every lock of a client silent for ``session_timeout_ms``.
"""

from __future__ import annotations

from collections.abc import Iterable

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import LOCK_EOF
from chainfs.kv import KVStore, Transaction
from chainfs.meta_service import schema
from chainfs.meta_service.ops.base import NamespaceBase
from chainfs.meta_service.ops.context import OpCtx, Tag
from chainfs.proto import meta_pb2 as pb

_KINDS = frozenset({pb.FLOCK, pb.POSIX})
_TYPES = frozenset({pb.READ, pb.WRITE, pb.UNLOCK})


def _overlap(a: pb.LockRange, b: pb.LockRange) -> bool:
    return a.start < b.end and b.start < a.end


def conflicts(held: pb.LockRange, want: pb.LockRange) -> bool:
    """Whether another owner's ``held`` range keeps ``want`` from being granted."""
    return _overlap(held, want) and pb.WRITE in (held.type, want.type)


def apply_range(ranges: Iterable[pb.LockRange], new: pb.LockRange) -> list[pb.LockRange]:
    """An owner's ranges after ``new`` (a lock of a type, or an unlock): ``new``
    replaces what the owner held in its span; same-type neighbours merge."""
    out: list[pb.LockRange] = []
    for r in ranges:
        if not _overlap(r, new):
            out.append(r)
            continue
        if r.start < new.start:
            out.append(pb.LockRange(type=r.type, start=r.start, end=new.start))
        if r.end > new.end:
            out.append(pb.LockRange(type=r.type, start=new.end, end=r.end))
    if new.type != pb.UNLOCK:
        out.append(pb.LockRange(type=new.type, start=new.start, end=new.end))
    out.sort(key=lambda r: r.start)
    merged: list[pb.LockRange] = []
    for r in out:
        last = merged[-1] if merged else None
        if last is not None and last.type == r.type and r.start <= last.end:
            last.end = max(last.end, r.end)
        else:
            merged.append(r)
    return merged


def check_lock_request(r: pb.LockReq) -> pb.LockRange:
    """The range a request asks for (flock: the whole file); bad input -> EINVAL."""
    if len(r.req.client_id) != schema.CLIENT_ID_BYTES:
        raise ChainfsError(Code.EINVAL, "a lock needs a client id")
    if r.kind not in _KINDS:
        raise ChainfsError(Code.EINVAL, f"unknown lock kind {r.kind}")
    if r.range.type not in _TYPES:
        raise ChainfsError(Code.EINVAL, f"unknown lock type {r.range.type}")
    if r.test and r.range.type == pb.UNLOCK:
        raise ChainfsError(Code.EINVAL, "testing for an unlock")
    if r.kind == pb.FLOCK:
        return pb.LockRange(type=r.range.type, start=0, end=LOCK_EOF)
    if r.range.start >= r.range.end:
        raise ChainfsError(Code.EINVAL, f"empty lock range [{r.range.start}, {r.range.end})")
    return r.range


class LockOps(NamespaceBase):
    async def lock(self, r: pb.LockReq) -> pb.LockRsp:
        want = check_lock_request(r)
        client = r.req.client_id
        me = schema.lock_key(r.ino, r.kind, client, r.owner)

        async def holders(ctx: OpCtx) -> list[tuple[bytes, pb.LockRecord]]:
            await ctx.inode(r.ino)  # ENOENT for a removed file
            limit = self.cfg.max_lock_owners_per_inode
            rows = await ctx.tx.get_range(
                *schema.range_of(schema.lock_prefix(r.ino, r.kind)), limit=limit + 1
            )
            return [(k, pb.LockRecord.FromString(v)) for k, v in rows]

        def in_the_way(rows: list[tuple[bytes, pb.LockRecord]]) -> pb.LockRsp | None:
            if want.type == pb.UNLOCK:
                return None
            for key, rec in rows:
                if key == me:
                    continue
                for held in rec.ranges:
                    if conflicts(held, want):
                        holder_client, owner = schema.parse_lock_key(key)
                        conflict = pb.LockHolder(
                            range=held, pid=rec.pid, client_id=holder_client, owner=owner
                        )
                        return pb.LockRsp(granted=False, conflict=conflict)
            return None

        async def test(ctx: OpCtx) -> pb.LockRsp:
            return in_the_way(await holders(ctx)) or pb.LockRsp(granted=True)

        async def body(ctx: OpCtx) -> pb.LockRsp:
            rows = await holders(ctx)
            denied = in_the_way(rows)
            if denied is not None:
                return denied
            mine = next((rec for key, rec in rows if key == me), pb.LockRecord())
            ranges = apply_range(mine.ranges, want)
            self._store(ctx, r, me, rows, ranges)
            return pb.LockRsp(
                granted=True, held=bool(ranges), session_timeout_ms=self.cfg.session_timeout_ms
            )

        if r.test:
            return await self._read(r.req, test)
        return await self._mutate(r.req, Tag.LOCK, pb.LockRsp, body)

    def _store(
        self,
        ctx: OpCtx,
        r: pb.LockReq,
        me: bytes,
        rows: list[tuple[bytes, pb.LockRecord]],
        ranges: list[pb.LockRange],
    ) -> None:
        client = r.req.client_id
        index = schema.client_lock_key(client, r.ino, r.kind, r.owner)
        if not ranges:
            ctx.tx.clear(me)
            ctx.tx.clear(index)
            return
        if len(ranges) > self.cfg.max_lock_ranges_per_owner:
            raise ChainfsError(Code.ENOLCK, f"more than {len(ranges) - 1} ranges of one owner")
        if all(key != me for key, _ in rows) and len(rows) >= self.cfg.max_lock_owners_per_inode:
            raise ChainfsError(Code.ENOLCK, f"inode {r.ino} has too many lock holders")
        ctx.tx.set(me, pb.LockRecord(ranges=ranges, pid=r.pid).SerializeToString())
        ctx.tx.set(index, b"")
        ctx.tx.set(schema.client_key(client), schema.encode_ms(ctx.now_ms))


async def drop_client_locks(kv: KVStore, client_id: bytes, limit: int) -> int:
    """Drop up to ``limit`` locks of a client (its lease ended); returns how many."""

    async def fn(tx: Transaction) -> int:
        rows = await tx.get_range(
            *schema.range_of(schema.client_lock_prefix(client_id)), limit=limit
        )
        for key, _ in rows:
            tx.clear(schema.lock_key_of_index(key))
            tx.clear(key)
        return len(rows)

    return await kv.transact(fn)
