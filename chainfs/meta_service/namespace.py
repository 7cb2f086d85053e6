"""The POSIX namespace on the transactional KV store.

Every operation is one KV transaction (re-run on conflict), so several meta
servers may serve one store. Operations that must also change storage
(shrinking truncate, exact length) do the storage part first, outside the
transaction, then commit the metadata; the transaction checks the file is
still the one the storage step worked on.

Mutating requests carrying a client id and request id leave their answer under
``IDEM|client|request`` in the same transaction: a retry gets the first answer
instead of running again.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf.message import Message

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
)
from chainfs.kv import KVStore, Transaction
from chainfs.meta_service import chunks, perm, schema
from chainfs.meta_service.alloc import IdLease, InodeAllocator
from chainfs.meta_service.chunks import ChunkStorage
from chainfs.meta_service.config import (
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    NAME_MAX,
    PATH_MAX,
    MetaConfig,
)
from chainfs.meta_service.ctx import DIRECTORY, FILE, SYMLINK, Ctx, Last, ParsedPath, Target, parse
from chainfs.meta_service.perm import S_ISGID, S_ISUID, Caller
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb

M = TypeVar("M", bound=Message)

MAX_ID = 0xFFFFFFFE  # uid/gid: (uint32)-1 means "unchanged" in chown(2)
FORMAT_VERSION = 1
ALLOC_FIRST_ID = 1024  # ids below are reserved (root is 1)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
_PERMUTATIONS = 64  # random orders of a chain pool kept per pool
_MAX_CACHED_POOLS = 256  # chain pools (directory chain lists) with cached orders
_STORAGE_ROUNDS = 4  # storage-then-commit attempts when the file keeps changing


class ClusterView(Protocol):
    """What meta needs from the routing info."""

    def chains(self) -> list[int]:
        """Chain ids new files may be placed on."""
        ...

    def capacity(self) -> tuple[int, int]:
        """(usable capacity, used) in bytes."""
        ...


# Tags of the answers kept for idempotent retries (one per mutating method).
class Tag:
    OPEN = 1
    SYNC = 2
    CLOSE = 3
    MKDIR = 4
    UNLINK = 5
    RMDIR = 6
    RENAME = 7
    LINK = 8
    SYMLINK = 9
    SETATTR = 10
    SETXATTR = 11
    REMOVEXATTR = 12
    SETLAYOUT = 13


class _StorageFirst(Exception):
    """Raised inside a transaction: this storage step must happen before commit."""

    def __init__(self, kind: str, inode: pb.Inode, size: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.inode = pb.Inode()
        self.inode.CopyFrom(inode)
        self.size = size

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.inode.ino, self.size)


class OpCtx(Ctx):
    """Ctx plus what an operation needs from the server: ids, storage steps done."""

    def __init__(
        self,
        tx: Transaction,
        caller: Caller,
        cfg: MetaConfig,
        lease: IdLease | None,
        storage_done: dict[tuple[str, int, int], int],
    ) -> None:
        super().__init__(tx, caller, cfg)
        self.lease = lease
        self.storage_done = storage_done

    async def new_ino(self) -> int:
        assert self.lease is not None, "operation did not ask for inode ids"
        return await self.lease.take()

    def storage_truncated(self, inode: pb.Inode, size: int) -> None:
        """Require that storage dropped the bytes of ``inode`` beyond ``size``."""
        if ("truncate", inode.ino, size) not in self.storage_done:
            raise _StorageFirst("truncate", inode, size)

    def storage_length(self, inode: pb.Inode) -> int:
        """The length storage reported for ``inode`` (queried first if needed)."""
        got = self.storage_done.get(("length", inode.ino, 0))
        if got is None:
            raise _StorageFirst("length", inode, 0)
        return got


def _check_client(req: cpb.RequestInfo) -> None:
    if req.client_id and len(req.client_id) != schema.CLIENT_ID_BYTES:
        raise ChainfsError(
            Code.EINVAL,
            f"client_id must be {schema.CLIENT_ID_BYTES} bytes, not {len(req.client_id)}",
        )


def _check_mode(mode: int) -> int:
    if not 0 <= mode <= 0o7777:
        raise ChainfsError(Code.EINVAL, f"mode {mode:#o} has bits beyond 0o7777")
    return mode


def _owner_gid(parent: pb.Inode, caller: Caller) -> int:
    return parent.gid if parent.mode & S_ISGID else caller.gid


def _strip_sgid(mode: int, gid: int, caller: Caller) -> int:
    if mode & S_ISGID and not caller.is_root and not caller.in_group(gid):
        return mode & ~S_ISGID
    return mode


class Namespace:
    def __init__(
        self,
        kv: KVStore,
        cfg: MetaConfig,
        alloc: InodeAllocator,
        cluster: ClusterView,
        storage: ChunkStorage | None,
    ) -> None:
        self.kv = kv
        self.cfg = cfg
        self.alloc = alloc
        self.cluster = cluster
        self.storage = storage
        self._rng = random.Random()
        self._perms: dict[tuple[int, ...], list[list[int]]] = {}  # chain pool -> permutations

    # -- formatting ---------------------------------------------------------
    @staticmethod
    async def format(kv: KVStore, cfg: MetaConfig) -> pb.FormatRecord:
        """Create the root directory and the format record once; idempotent and
        safe when several servers start at once (the loser's commit conflicts,
        re-runs and finds the store formatted)."""

        async def fn(tx: Transaction) -> pb.FormatRecord:
            raw = await tx.get(schema.FRMT)
            if raw is not None:
                return pb.FormatRecord.FromString(raw)
            fmt = pb.FormatRecord(
                version=FORMAT_VERSION,
                alloc_shards=cfg.alloc_shards,
                alloc_batch=cfg.alloc_batch,
                alloc_first_id=ALLOC_FIRST_ID,
                created_ms=Ctx(tx, perm.ROOT, cfg).now_ms,
            )
            now = fmt.created_ms * 1_000_000
            root = pb.Inode(
                ino=schema.ROOT_INO,
                type=DIRECTORY,
                mode=cfg.root_mode,
                uid=0,
                gid=0,
                nlink=2,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
                layout=pb.Layout(
                    chunk_size=cfg.default_chunk_size_bytes, stripe=cfg.default_stripe
                ),
                parent=schema.ROOT_INO,
            )
            tx.set(schema.inode_key(schema.ROOT_INO), schema.encode_inode(root))
            tx.set(schema.FRMT, fmt.SerializeToString())
            return fmt

        fmt = await kv.transact(fn)
        if fmt.version != FORMAT_VERSION:
            raise ChainfsError(Code.CONFIG_ERROR, f"store has format version {fmt.version}")
        return fmt

    # -- the transaction runner ---------------------------------------------
    async def _read(self, req: cpb.RequestInfo, body: Callable[[OpCtx], Awaitable[M]]) -> M:
        caller = Caller.of(req)

        async def fn(tx: Transaction) -> M:
            return await body(OpCtx(tx, caller, self.cfg, None, {}))

        return await self.kv.transact(fn, read_only=True)

    async def _mutate(
        self,
        req: cpb.RequestInfo,
        tag: int,
        rsp_type: type[M],
        body: Callable[[OpCtx], Awaitable[M]],
        new_ids: bool = False,
    ) -> M:
        """Run ``body`` in a transaction that also records the answer for retries."""
        _check_client(req)
        caller = Caller.of(req)
        idem = bool(req.client_id) and req.request_id != 0
        ikey = schema.idem_key(req.client_id, req.request_id) if idem else b""
        lease = IdLease(self.alloc) if new_ids else None
        storage_done: dict[tuple[str, int, int], int] = {}

        async def fn(tx: Transaction) -> M:
            if lease is not None:
                lease.restart()
            if idem:
                rec = await tx.get(ikey)
                if rec is not None:
                    return _decode_answer(rec, tag, rsp_type)
            ctx = OpCtx(tx, caller, self.cfg, lease, storage_done)
            rsp = await body(ctx)
            if idem:
                tx.set(ikey, bytes([tag]) + rsp.SerializeToString())
                expire = ctx.now_ms + self.cfg.idempotency_ttl_ms
                tx.set(schema.idem_expiry_key(expire, req.client_id, req.request_id), b"")
            return rsp

        for _ in range(_STORAGE_ROUNDS):
            committed = False
            try:
                rsp = await self.kv.transact(fn)
                committed = True
                return rsp
            except _StorageFirst as need:
                storage_done[need.key] = await self._storage_step(need)
            finally:
                if lease is not None:
                    lease.finish(committed)
        raise ChainfsError(Code.EAGAIN, "file kept changing during a storage step; retry")

    async def _storage_step(self, need: _StorageFirst) -> int:
        if self.storage is None:
            raise chunks.no_storage(need.kind)
        if not need.inode.layout.chains:
            return 0
        if need.kind == "truncate":
            await chunks.truncate(self.storage, need.inode, need.size)
            return 0
        assert need.kind == "length", need.kind
        return await chunks.exact_length(self.storage, need.inode)

    # -- layouts ------------------------------------------------------------
    def _file_layout(self, dir_layout: pb.Layout) -> pb.Layout:
        """``stripe`` chains in random order: a random rotation of one of a few
        cached random permutations of the pool (cheaper than a fresh shuffle per
        create, and as even a spread)."""
        pool = tuple(dir_layout.chains) or tuple(self.cluster.chains())
        if not pool:
            raise ChainfsError(Code.ENOSPC, "no storage chains to place a file on (no chain table)")
        stripe = min(dir_layout.stripe or self.cfg.default_stripe, len(pool))
        perms = self._perms.get(pool)
        if perms is None:
            if len(self._perms) >= _MAX_CACHED_POOLS:
                self._perms.clear()
            perms = [self._rng.sample(pool, len(pool)) for _ in range(_PERMUTATIONS)]
            self._perms[pool] = perms
        perm = perms[self._rng.randrange(_PERMUTATIONS)]
        at = self._rng.randrange(len(pool))
        chains = (perm[at:] + perm[:at])[:stripe]
        return pb.Layout(chunk_size=dir_layout.chunk_size, stripe=stripe, chains=chains)

    def _new_inode(self, ctx: Ctx, ino: int, type_: int, mode: int, parent: pb.Inode) -> pb.Inode:
        gid = _owner_gid(parent, ctx.caller)
        if type_ == DIRECTORY and parent.mode & S_ISGID:
            mode |= S_ISGID
        elif type_ == FILE:
            mode = _strip_sgid(mode, gid, ctx.caller)
        now = ctx.now_ns
        return pb.Inode(
            ino=ino,
            type=pb.InodeType.ValueType(type_),
            mode=mode,
            uid=ctx.caller.uid,
            gid=gid,
            nlink=2 if type_ == DIRECTORY else 1,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            parent=parent.ino,
        )

    # -- read operations ----------------------------------------------------
    async def _lookup_target(self, ctx: Ctx, p: ParsedPath, follow: bool) -> pb.Inode:
        t = await ctx.resolve(p, follow_last=follow or p.slash)
        if t.inode is None:
            raise ChainfsError(Code.ENOENT, f"no entry {t.name!r}")
        if t.slash and t.inode.type != DIRECTORY:
            raise ChainfsError(Code.ENOTDIR, f"{t.name!r} is not a directory")
        return await ctx.dir_times(t.inode)

    async def stat(self, r: pb.StatReq) -> pb.StatRsp:
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.StatRsp:
            return pb.StatRsp(inode=await self._lookup_target(ctx, p, r.follow))

        return await self._read(r.req, body)

    async def batch_stat(self, r: pb.BatchStatReq) -> pb.BatchStatRsp:
        if len(r.ats) > self.cfg.max_batch_stat:
            raise ChainfsError(
                Code.E2BIG, f"more than {self.cfg.max_batch_stat} inodes in one call"
            )

        async def body(ctx: OpCtx) -> pb.BatchStatRsp:
            out = pb.BatchStatRsp()
            for at in r.ats:
                try:
                    inode = await self._lookup_target(ctx, parse(at, self.cfg), r.follow)
                    out.results.add(code=0, inode=inode)
                except ChainfsError as e:
                    out.results.add(code=e.code, message=e.message)
            return out

        return await self._read(r.req, body)

    async def readlink(self, r: pb.ReadlinkReq) -> pb.ReadlinkRsp:
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.ReadlinkRsp:
            inode = await self._lookup_target(ctx, p, follow=False)
            if inode.type != SYMLINK:
                raise ChainfsError(Code.EINVAL, "not a symbolic link")
            return pb.ReadlinkRsp(target=inode.symlink_target)

        return await self._read(r.req, body)

    async def readdir(self, r: pb.ReaddirReq) -> pb.ReaddirRsp:
        p = parse(r.at, self.cfg)
        if len(r.after) > NAME_MAX:
            raise ChainfsError(Code.EINVAL, "readdir cursor is not a name")
        limit = r.limit or self.cfg.readdir_page_entries
        limit = min(limit, self.cfg.readdir_max_page_entries)

        async def body(ctx: OpCtx) -> pb.ReaddirRsp:
            d = await self._lookup_target(ctx, p, follow=True)
            if d.type != DIRECTORY:
                raise ChainfsError(Code.ENOTDIR, "not a directory")
            perm.check(d, perm.R, ctx.caller, "read directory")
            prefix = schema.dent_prefix(d.ino)
            begin = prefix + r.after + b"\x00" if r.after else prefix
            rows = await ctx.tx.get_range(begin, schema.range_of(prefix)[1], limit=limit + 1)
            rsp = pb.ReaddirRsp(more=len(rows) > limit, dir_ino=d.ino)
            for key, value in rows[:limit]:
                ino, type_ = schema.decode_dent(value)
                e = rsp.entries.add(
                    name=schema.dent_name(key), ino=ino, type=pb.InodeType.ValueType(type_)
                )
                if r.with_attrs:
                    e.inode.CopyFrom(await ctx.dir_times(await ctx.inode(ino)))
            return rsp

        return await self._read(r.req, body)

    async def get_xattr(self, r: pb.GetXattrReq) -> pb.GetXattrRsp:
        p = parse(r.at, self.cfg)
        name = self._xattr_name(r.name)

        async def body(ctx: OpCtx) -> pb.GetXattrRsp:
            inode = await self._lookup_target(ctx, p, r.follow)
            hidden = name.startswith(b"trusted.") and not ctx.caller.is_root
            if name.startswith(b"user."):
                if inode.type == SYMLINK:
                    raise ChainfsError(Code.ENODATA, "no such attribute")
                perm.check(inode, perm.R, ctx.caller, "read attribute")
            value = None if hidden else await ctx.tx.get(schema.xattr_key(inode.ino, name))
            if value is None:
                raise ChainfsError(Code.ENODATA, f"no attribute {name!r}")
            return pb.GetXattrRsp(value=value)

        return await self._read(r.req, body)

    async def list_xattr(self, r: pb.ListXattrReq) -> pb.ListXattrRsp:
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.ListXattrRsp:
            inode = await self._lookup_target(ctx, p, r.follow)
            prefix = schema.xattr_prefix(inode.ino)
            rows = await ctx.tx.get_range(
                *schema.range_of(prefix), limit=self.cfg.max_xattrs_per_inode
            )
            names = [k[len(prefix) :] for k, _ in rows]
            if not ctx.caller.is_root:
                names = [n for n in names if not n.startswith(b"trusted.")]
            return pb.ListXattrRsp(names=names)

        return await self._read(r.req, body)

    async def statfs(self, r: pb.StatFsReq) -> pb.StatFsRsp:
        capacity, used = self.cluster.capacity()

        async def body(ctx: OpCtx) -> pb.StatFsRsp:
            root = await ctx.inode(schema.ROOT_INO)
            return pb.StatFsRsp(block_size=root.layout.chunk_size)

        rsp = await self._read(r.req, body)
        rsp.capacity_bytes = capacity
        rsp.used_bytes = min(used, capacity)
        rsp.free_bytes = capacity - rsp.used_bytes
        rsp.inodes_allocated = await self.alloc.allocated()
        rsp.chains = len(self.cluster.chains())
        rsp.max_name_bytes = NAME_MAX
        return rsp

    # -- open / sessions ----------------------------------------------------
    async def open(self, r: pb.OpenReq) -> pb.OpenRsp:
        p = parse(r.at, self.cfg)
        mode = _check_mode(r.mode)
        read_session = r.session and not r.write
        mutating = r.write or r.create or r.truncate or read_session
        if (r.write or read_session) and len(r.req.client_id) != schema.CLIENT_ID_BYTES:
            raise ChainfsError(Code.EINVAL, "an open with a session needs a client id")

        async def body(ctx: OpCtx) -> pb.OpenRsp:
            follow = not (r.create and r.exclusive) and not r.nofollow
            t = await ctx.resolve(p, follow_last=follow or p.slash)
            created = False
            if t.inode is None:
                if not r.create:
                    raise ChainfsError(Code.ENOENT, f"no entry {t.name!r}")
                if t.slash:
                    raise ChainfsError(Code.EISDIR, f"{t.name!r}/: cannot create a file")
                parent = await ctx.inode(t.parent_ino)
                perm.check(parent, perm.W | perm.X, ctx.caller, "create in directory")
                inode = self._new_inode(ctx, await ctx.new_ino(), FILE, mode, parent)
                inode.layout.CopyFrom(self._file_layout(parent.layout))
                ctx.put(inode)
                ctx.set_entry(parent.ino, t.name, inode.ino, FILE)
                ctx.touch_dir(parent)
                created = True
            else:
                inode = t.inode
                if r.create and r.exclusive:
                    raise ChainfsError(Code.EEXIST, f"{t.name!r} exists")
                if inode.type == SYMLINK:
                    raise ChainfsError(Code.ELOOP, f"{t.name!r} is a symbolic link (O_NOFOLLOW)")
                if inode.type == DIRECTORY:
                    if r.write or r.truncate or r.create:
                        raise ChainfsError(Code.EISDIR, "is a directory")
                    await ctx.dir_times(inode)
                elif t.slash:
                    raise ChainfsError(Code.ENOTDIR, f"{t.name!r} is not a directory")
                want = (perm.R if r.read else 0) | (perm.W if r.write or r.truncate else 0)
                if want:
                    perm.check(inode, want, ctx.caller, "open")
                wants_session = r.write or read_session
                if wants_session and inode.nlink == 0 and not await ctx.has_sessions(inode.ino):
                    # Removed and queued for GC (an open by inode number): a new session
                    # could not hold chunks GC may already be dropping.
                    raise ChainfsError(Code.ENOENT, f"inode {inode.ino} was removed")
                if r.truncate and inode.type == FILE:
                    if inode.size > 0:
                        ctx.storage_truncated(inode, 0)
                        inode.size = 0
                    inode.mtime_ns = inode.ctime_ns = ctx.now_ns
                    ctx.put(inode)
            rsp = pb.OpenRsp(created=created)
            if r.write or (read_session and inode.type == FILE):
                rsp.session_id = self._open_session(ctx, inode, r.req.client_id, not r.write)
                rsp.session_timeout_ms = self.cfg.session_timeout_ms
            rsp.inode.CopyFrom(inode)
            return rsp

        if not mutating:
            return await self._read(r.req, body)
        return await self._mutate(r.req, Tag.OPEN, pb.OpenRsp, body, new_ids=r.create)

    def _open_session(
        self, ctx: Ctx, inode: pb.Inode, client_id: bytes, read_only: bool = False
    ) -> bytes:
        """A session keeps an unlinked file's chunks until it ends (close, or its
        client silent for session_timeout_ms). Read sessions never touch the length."""
        sid = os.urandom(schema.SESSION_ID_BYTES)
        rec = pb.SessionRecord(
            client_id=client_id,
            created_ms=ctx.now_ms,
            length_hint=0 if read_only else inode.size,
            read_only=read_only,
        )
        ctx.tx.set(schema.session_key(inode.ino, sid), rec.SerializeToString())
        ctx.tx.set(schema.client_session_key(client_id, inode.ino, sid), b"")
        ctx.tx.set(schema.client_key(client_id), schema.encode_ms(ctx.now_ms))
        return sid

    async def keepalive(self, r: pb.KeepAliveReq) -> pb.KeepAliveRsp:
        if len(r.req.client_id) != schema.CLIENT_ID_BYTES:
            raise ChainfsError(Code.EINVAL, "keep-alive needs a client id")

        async def fn(tx: Transaction) -> None:
            now_ms = Ctx(tx, perm.ROOT, self.cfg).now_ms
            tx.set(schema.client_key(r.req.client_id), schema.encode_ms(now_ms))

        await self.kv.transact(fn)
        return pb.KeepAliveRsp(session_timeout_ms=self.cfg.session_timeout_ms)

    async def _apply_length(
        self, ctx: OpCtx, ino: int, hint: int, exact: bool, wrote: bool
    ) -> pb.Inode | None:
        """size = max(size, hint[, storage]); mtime on writes. None if the inode is gone."""
        try:
            inode = await ctx.inode(ino)
        except ChainfsError as e:
            if e.code == Code.ENOENT:
                return None
            raise
        if inode.type != FILE:
            raise ChainfsError(Code.EINVAL, f"inode {ino} is not a file")
        size = max(inode.size, hint)
        if exact and inode.layout.chains:
            size = max(size, ctx.storage_length(inode))
        if size > self.cfg.max_file_size_bytes:
            raise ChainfsError(Code.EFBIG, f"length {size} beyond the file size limit")
        if size != inode.size or wrote:
            inode.size = size
            if wrote:
                inode.mtime_ns = inode.ctime_ns = ctx.now_ns
            ctx.put(inode)
        return inode

    async def sync(self, r: pb.SyncReq) -> pb.SyncRsp:
        async def body(ctx: OpCtx) -> pb.SyncRsp:
            inode = await self._apply_length(ctx, r.ino, r.length_hint, r.exact, r.wrote)
            if inode is None:
                raise ChainfsError(Code.ENOENT, f"no inode {r.ino}")
            if r.session_id:
                key = schema.session_key(r.ino, r.session_id)
                raw = await ctx.tx.get(key)
                if raw is not None:
                    rec = pb.SessionRecord.FromString(raw)
                    if inode.size > rec.length_hint:
                        rec.length_hint = inode.size
                        ctx.tx.set(key, rec.SerializeToString())
            return pb.SyncRsp(inode=inode)

        return await self._mutate(r.req, Tag.SYNC, pb.SyncRsp, body)

    async def close(self, r: pb.CloseReq) -> pb.CloseRsp:
        if not r.session_id:  # read-only open: meta keeps nothing for it

            async def peek(ctx: OpCtx) -> pb.CloseRsp:
                try:
                    return pb.CloseRsp(inode=await ctx.inode(r.ino))
                except ChainfsError as e:
                    if e.code == Code.ENOENT:
                        return pb.CloseRsp()
                    raise

            return await self._read(r.req, peek)

        async def body(ctx: OpCtx) -> pb.CloseRsp:
            # A close of a session that was pruned (client silent too long) still
            # applies its length: the writes it reports were acknowledged.
            if r.length_hint or r.wrote:
                inode = await self._apply_length(ctx, r.ino, r.length_hint, r.wrote, r.wrote)
            else:  # nothing written (a read session): the length stays as it is
                inode = await self._inode_or_none(ctx, r.ino)
            await self.end_session(ctx, r.ino, r.session_id, r.req.client_id)
            return pb.CloseRsp(inode=inode) if inode is not None else pb.CloseRsp()

        return await self._mutate(r.req, Tag.CLOSE, pb.CloseRsp, body)

    @staticmethod
    async def _inode_or_none(ctx: Ctx, ino: int) -> pb.Inode | None:
        try:
            return await ctx.inode(ino)
        except ChainfsError as e:
            if e.code == Code.ENOENT:
                return None
            raise

    async def end_session(self, ctx: Ctx, ino: int, session_id: bytes, client_id: bytes) -> None:
        """Remove a session; a file already unlinked goes to GC with its last one."""
        ctx.tx.clear(schema.session_key(ino, session_id))
        if client_id:
            ctx.tx.clear(schema.client_session_key(client_id, ino, session_id))
        try:
            inode = await ctx.inode(ino)
        except ChainfsError as e:
            if e.code == Code.ENOENT:
                return
            raise
        if inode.nlink == 0 and not await ctx.has_sessions(ino):
            self._enqueue_gc(ctx, inode)

    def _enqueue_gc(self, ctx: Ctx, inode: pb.Inode) -> None:
        assert inode.nlink == 0 and inode.type == FILE, inode
        ctx.tx.set(schema.gc_key(ctx.now_ms + self.cfg.gc_delay_ms, inode.ino), b"")

    async def _release(self, ctx: Ctx, inode: pb.Inode) -> None:
        """The last name of ``inode`` is gone."""
        assert inode.nlink == 0
        if inode.type == FILE:
            ctx.put(inode)  # kept (nlink 0) while open (any session) and until GC drops its chunks
            if not await ctx.has_sessions(inode.ino):
                self._enqueue_gc(ctx, inode)
        else:
            ctx.drop(inode.ino)

    # -- namespace changes --------------------------------------------------
    async def mkdir(self, r: pb.MkdirReq) -> pb.MkdirRsp:
        p = parse(r.at, self.cfg)
        # Linux: a new directory takes the permission and sticky bits asked for;
        # setgid comes only from the parent.
        mode = _check_mode(r.mode) & 0o1777
        parents_mode = _check_mode(r.parents_mode) & 0o1777 if r.parents_mode else mode

        async def make(ctx: OpCtx, parent: pb.Inode, name: bytes, mode: int) -> pb.Inode:
            perm.check(parent, perm.W | perm.X, ctx.caller, "create in directory")
            if parent.nlink >= self.cfg.max_links:
                raise ChainfsError(Code.EMLINK, "too many subdirectories")
            d = self._new_inode(ctx, await ctx.new_ino(), DIRECTORY, mode, parent)
            d.layout.CopyFrom(parent.layout)
            ctx.put(d)
            ctx.set_entry(parent.ino, name, d.ino, DIRECTORY)
            parent.nlink += 1
            ctx.put(parent)
            ctx.touch_dir(parent)
            return d

        async def body(ctx: OpCtx) -> pb.MkdirRsp:
            if r.parents and not p.self_ref:
                return pb.MkdirRsp(inode=await self._mkdir_p(ctx, p, mode, parents_mode, make))
            t = await ctx.resolve(p, follow_last=False)
            if t.kind is not Last.NORM or t.inode is not None:
                raise ChainfsError(Code.EEXIST, f"{t.name!r} exists")
            parent = await ctx.inode(t.parent_ino)
            return pb.MkdirRsp(inode=await make(ctx, parent, t.name, mode))

        return await self._mutate(r.req, Tag.MKDIR, pb.MkdirRsp, body, new_ids=True)

    async def _mkdir_p(
        self,
        ctx: OpCtx,
        p: ParsedPath,
        mode: int,
        parents_mode: int,
        make: Callable[[OpCtx, pb.Inode, bytes, int], Awaitable[pb.Inode]],
    ) -> pb.Inode:
        cur = await ctx.inode(p.start)
        n = len(p.comps)
        if n == 0:
            return cur
        for i, name in enumerate(p.comps):
            last = i == n - 1
            t = await ctx.walk(cur, [name], False, follow_last=True)
            if t.inode is None:
                cur = await make(
                    ctx, await ctx.inode(t.parent_ino), t.name, mode if last else parents_mode
                )
            elif t.inode.type == DIRECTORY:
                cur = t.inode
            else:
                raise ChainfsError(
                    Code.EEXIST if last else Code.ENOTDIR, f"{name!r} exists and is not a directory"
                )
        return cur

    async def symlink(self, r: pb.SymlinkReq) -> pb.SymlinkRsp:
        p = parse(r.at, self.cfg)
        if not r.target:
            raise ChainfsError(Code.ENOENT, "empty symlink target")
        if b"\x00" in r.target:
            raise ChainfsError(Code.EINVAL, "NUL byte in symlink target")
        if len(r.target) >= PATH_MAX:
            raise ChainfsError(
                Code.ENAMETOOLONG, f"symlink target longer than {PATH_MAX - 1} bytes"
            )

        async def body(ctx: OpCtx) -> pb.SymlinkRsp:
            t = await ctx.resolve(p, follow_last=False)
            parent = await self._creation_parent(ctx, t)
            inode = self._new_inode(ctx, await ctx.new_ino(), SYMLINK, 0o777, parent)
            inode.symlink_target = r.target
            inode.size = len(r.target)
            ctx.put(inode)
            ctx.set_entry(parent.ino, t.name, inode.ino, SYMLINK)
            ctx.touch_dir(parent)
            return pb.SymlinkRsp(inode=inode)

        return await self._mutate(r.req, Tag.SYMLINK, pb.SymlinkRsp, body, new_ids=True)

    async def _creation_parent(self, ctx: Ctx, t: Target) -> pb.Inode:
        """Checks of a new name (symlink, link) as Linux's filename_create does."""
        if t.kind is not Last.NORM or t.inode is not None:
            raise ChainfsError(Code.EEXIST, f"{t.name!r} exists")
        if t.slash:
            raise ChainfsError(Code.ENOENT, f"{t.name!r}/: no such directory")
        parent = await ctx.inode(t.parent_ino)
        perm.check(parent, perm.W | perm.X, ctx.caller, "create in directory")
        return parent

    async def link(self, r: pb.LinkReq) -> pb.LinkRsp:
        src = parse(r.target, self.cfg)
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.LinkRsp:
            inode = await self._lookup_target(ctx, src, follow=False)
            t = await ctx.resolve(p, follow_last=False)
            parent = await self._creation_parent(ctx, t)
            if inode.type == DIRECTORY:
                raise ChainfsError(Code.EPERM, "hard links to directories are not allowed")
            if inode.nlink == 0:
                raise ChainfsError(Code.ENOENT, f"inode {inode.ino} was removed")
            if inode.nlink >= self.cfg.max_links:
                raise ChainfsError(Code.EMLINK, f"inode {inode.ino} has {inode.nlink} links")
            inode.nlink += 1
            inode.ctime_ns = ctx.now_ns
            ctx.put(inode)
            ctx.set_entry(parent.ino, t.name, inode.ino, inode.type)
            ctx.touch_dir(parent)
            return pb.LinkRsp(inode=inode)

        return await self._mutate(r.req, Tag.LINK, pb.LinkRsp, body)

    async def unlink(self, r: pb.UnlinkReq) -> pb.UnlinkRsp:
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.UnlinkRsp:
            t = await ctx.resolve(p, follow_last=False)
            if t.kind is Last.SELF:
                raise ChainfsError(Code.EINVAL, "unlink needs a name")
            if t.kind is not Last.NORM:
                raise ChainfsError(Code.EISDIR, "is a directory")
            if t.inode is None:
                raise ChainfsError(Code.ENOENT, f"no entry {t.name!r}")
            inode = t.inode
            if t.slash:
                raise ChainfsError(
                    Code.EISDIR if inode.type == DIRECTORY else Code.ENOTDIR, f"{t.name!r}/"
                )
            parent = await ctx.inode(t.parent_ino)
            perm.check(parent, perm.W | perm.X, ctx.caller, "remove from directory")
            perm.check_sticky(parent, inode, ctx.caller)
            if inode.type == DIRECTORY:
                raise ChainfsError(Code.EISDIR, f"{t.name!r} is a directory")
            ctx.clear_entry(parent.ino, t.name)
            await self._unlink_inode(ctx, inode)
            ctx.touch_dir(parent)
            return pb.UnlinkRsp()

        return await self._mutate(r.req, Tag.UNLINK, pb.UnlinkRsp, body)

    async def _unlink_inode(self, ctx: Ctx, inode: pb.Inode) -> None:
        assert inode.type != DIRECTORY and inode.nlink > 0, inode
        inode.nlink -= 1
        inode.ctime_ns = ctx.now_ns
        if inode.nlink == 0:
            await self._release(ctx, inode)
        else:
            ctx.put(inode)

    async def rmdir(self, r: pb.RmdirReq) -> pb.RmdirRsp:
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.RmdirRsp:
            t = await ctx.resolve(p, follow_last=False)
            if t.kind is Last.DOT or t.kind is Last.SELF:
                raise ChainfsError(Code.EINVAL, "cannot remove '.'")
            if t.kind is Last.DOTDOT:
                raise ChainfsError(Code.ENOTEMPTY, "cannot remove '..'")
            if t.kind is Last.ROOT:
                raise ChainfsError(Code.EBUSY, "cannot remove the root")
            if t.inode is None:
                raise ChainfsError(Code.ENOENT, f"no entry {t.name!r}")
            d = t.inode
            parent = await ctx.inode(t.parent_ino)
            perm.check(parent, perm.W | perm.X, ctx.caller, "remove from directory")
            perm.check_sticky(parent, d, ctx.caller)
            if d.type != DIRECTORY:
                raise ChainfsError(Code.ENOTDIR, f"{t.name!r} is not a directory")
            await self._remove_dir(ctx, parent, t.name, d)
            return pb.RmdirRsp()

        return await self._mutate(r.req, Tag.RMDIR, pb.RmdirRsp, body)

    async def _remove_dir(self, ctx: Ctx, parent: pb.Inode, name: bytes, d: pb.Inode) -> None:
        assert d.ino != schema.ROOT_INO
        if not await ctx.is_empty_dir(d.ino):
            raise ChainfsError(Code.ENOTEMPTY, f"{name!r} is not empty")
        ctx.clear_entry(parent.ino, name)
        ctx.drop(d.ino)
        parent.nlink -= 1
        ctx.put(parent)
        ctx.touch_dir(parent)

    async def rename(self, r: pb.RenameReq) -> pb.RenameRsp:
        if r.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise ChainfsError(Code.EINVAL, f"unknown rename flags {r.flags:#x}")
        if r.flags & RENAME_NOREPLACE and r.flags & RENAME_EXCHANGE:
            raise ChainfsError(Code.EINVAL, "RENAME_NOREPLACE with RENAME_EXCHANGE")
        sp_ = parse(r.src, self.cfg)
        dp = parse(r.dst, self.cfg)
        noreplace = bool(r.flags & RENAME_NOREPLACE)
        exchange = bool(r.flags & RENAME_EXCHANGE)

        async def body(ctx: OpCtx) -> pb.RenameRsp:
            s = await ctx.resolve(sp_, follow_last=False)
            d = await ctx.resolve(dp, follow_last=False)
            if s.kind is Last.SELF or d.kind is Last.SELF:
                raise ChainfsError(Code.EINVAL, "rename needs names")
            if s.kind is not Last.NORM:
                raise ChainfsError(Code.EBUSY, "cannot rename '.', '..' or '/'")
            if d.kind is not Last.NORM:
                raise ChainfsError(Code.EEXIST if noreplace else Code.EBUSY, "bad target name")
            if s.inode is None:
                raise ChainfsError(Code.ENOENT, f"no entry {s.name!r}")
            if noreplace and d.inode is not None:
                raise ChainfsError(Code.EEXIST, f"{d.name!r} exists")
            if exchange and d.inode is None:
                raise ChainfsError(Code.ENOENT, f"no entry {d.name!r}")
            src = s.inode
            dst = d.inode
            src_dir = src.type == DIRECTORY
            dst_dir = dst is not None and dst.type == DIRECTORY
            if not src_dir and (s.slash or (d.slash and not exchange)):
                raise ChainfsError(Code.ENOTDIR, "trailing '/' on a non-directory")
            if exchange and not dst_dir and d.slash:
                raise ChainfsError(Code.ENOTDIR, "trailing '/' on a non-directory")
            sparent = await ctx.inode(s.parent_ino)
            dparent = await ctx.inode(d.parent_ino)
            if sparent.ino != dparent.ino:
                # Linux's lock_rename "trap": source above the target's directory, or
                # the target above the source's directory.
                if src_dir and await ctx.is_ancestor(src.ino, dparent.ino):
                    raise ChainfsError(Code.EINVAL, "cannot move a directory into itself")
                if dst_dir and dst is not None and await ctx.is_ancestor(dst.ino, sparent.ino):
                    raise ChainfsError(
                        Code.EINVAL if exchange else Code.ENOTEMPTY,
                        f"{d.name!r} is an ancestor of the source",
                    )
            if dst is not None and dst.ino == src.ino:
                return pb.RenameRsp(inode=src)  # same file: POSIX says do nothing
            perm.check(sparent, perm.W | perm.X, ctx.caller, "rename from directory")
            perm.check_sticky(sparent, src, ctx.caller)
            perm.check(dparent, perm.W | perm.X, ctx.caller, "rename into directory")
            if dst is not None:
                perm.check_sticky(dparent, dst, ctx.caller)
                if not exchange:
                    if src_dir and not dst_dir:
                        raise ChainfsError(Code.ENOTDIR, f"{d.name!r} is not a directory")
                    if not src_dir and dst_dir:
                        raise ChainfsError(Code.EISDIR, f"{d.name!r} is a directory")
            if sparent.ino != dparent.ino:
                if src_dir:
                    perm.check(src, perm.W, ctx.caller, "move directory")
                if exchange and dst_dir and dst is not None:
                    perm.check(dst, perm.W, ctx.caller, "move directory")
            if exchange:
                assert dst is not None
                self._exchange(ctx, s, d, sparent, dparent, src, dst)
            else:
                await self._move(ctx, s, d, sparent, dparent, src, dst)
            return pb.RenameRsp(inode=src)

        return await self._mutate(r.req, Tag.RENAME, pb.RenameRsp, body)

    async def _move(
        self,
        ctx: Ctx,
        s: Target,
        d: Target,
        sparent: pb.Inode,
        dparent: pb.Inode,
        src: pb.Inode,
        dst: pb.Inode | None,
    ) -> None:
        src_dir = src.type == DIRECTORY
        if dst is not None:
            if dst.type == DIRECTORY:
                await self._remove_dir(ctx, dparent, d.name, dst)
            else:
                await self._unlink_inode(ctx, dst)
        ctx.clear_entry(sparent.ino, s.name)
        ctx.set_entry(dparent.ino, d.name, src.ino, src.type)
        if src_dir and sparent.ino != dparent.ino:
            if dparent.nlink >= self.cfg.max_links:
                raise ChainfsError(Code.EMLINK, "too many subdirectories")
            src.parent = dparent.ino
            sparent.nlink -= 1
            dparent.nlink += 1
            ctx.put(sparent)
            ctx.put(dparent)
        src.ctime_ns = ctx.now_ns
        ctx.put(src)
        ctx.touch_dir(sparent)
        ctx.touch_dir(dparent)

    def _exchange(
        self,
        ctx: Ctx,
        s: Target,
        d: Target,
        sparent: pb.Inode,
        dparent: pb.Inode,
        src: pb.Inode,
        dst: pb.Inode,
    ) -> None:
        ctx.set_entry(sparent.ino, s.name, dst.ino, dst.type)
        ctx.set_entry(dparent.ino, d.name, src.ino, src.type)
        if sparent.ino != dparent.ino:
            if src.type == DIRECTORY:
                src.parent = dparent.ino
                sparent.nlink -= 1
                dparent.nlink += 1
            if dst.type == DIRECTORY:
                dst.parent = sparent.ino
                dparent.nlink -= 1
                sparent.nlink += 1
            if DIRECTORY in (src.type, dst.type):
                ctx.put(sparent)
                ctx.put(dparent)
        src.ctime_ns = dst.ctime_ns = ctx.now_ns
        ctx.put(src)
        ctx.put(dst)
        ctx.touch_dir(sparent)
        ctx.touch_dir(dparent)

    # -- attributes ---------------------------------------------------------
    async def setattr(self, r: pb.SetAttrReq) -> pb.SetAttrRsp:
        p = parse(r.at, self.cfg)
        if r.HasField("mode"):
            _check_mode(r.mode)
        for name in ("uid", "gid"):
            if r.HasField(name) and getattr(r, name) > MAX_ID:
                raise ChainfsError(Code.EINVAL, f"{name} {getattr(r, name)} out of range")
        if r.HasField("size") and r.size > self.cfg.max_file_size_bytes:
            raise ChainfsError(Code.EFBIG, f"size {r.size} beyond the file size limit")
        if (r.HasField("atime_ns") and r.atime_now) or (r.HasField("mtime_ns") and r.mtime_now):
            raise ChainfsError(Code.EINVAL, "a time given both explicitly and as now")

        async def body(ctx: OpCtx) -> pb.SetAttrRsp:
            inode = await self._lookup_target(ctx, p, r.follow)
            caller = ctx.caller
            changed = False
            if r.HasField("mode"):
                if not perm.is_owner(inode, caller):
                    raise ChainfsError(Code.EPERM, "chmod: not the owner")
                if inode.type == SYMLINK:
                    raise ChainfsError(Code.EOPNOTSUPP, "symbolic links have no mode")
                inode.mode = _strip_sgid(r.mode, inode.gid, caller)
                changed = True
            if r.HasField("uid") or r.HasField("gid"):
                self._chown(inode, r, caller)
                changed = True
            if r.HasField("size"):
                if inode.type == DIRECTORY:
                    raise ChainfsError(Code.EISDIR, "is a directory")
                if inode.type != FILE:
                    raise ChainfsError(Code.EINVAL, "not a regular file")
                perm.check(inode, perm.W, caller, "truncate")
                if r.size < inode.size:
                    ctx.storage_truncated(inode, r.size)
                inode.size = r.size
                inode.mtime_ns = ctx.now_ns
                changed = True
            explicit = r.HasField("atime_ns") or r.HasField("mtime_ns")
            if explicit or r.atime_now or r.mtime_now:
                if not perm.is_owner(inode, caller):
                    if explicit:
                        raise ChainfsError(Code.EPERM, "set times: not the owner")
                    perm.check(inode, perm.W, caller, "set times")
                if r.HasField("atime_ns"):
                    inode.atime_ns = r.atime_ns
                elif r.atime_now:
                    inode.atime_ns = ctx.now_ns
                if r.HasField("mtime_ns"):
                    inode.mtime_ns = r.mtime_ns
                elif r.mtime_now:
                    inode.mtime_ns = ctx.now_ns
                if inode.type == DIRECTORY and (r.HasField("mtime_ns") or r.mtime_now):
                    ctx.set_dir_mtime(inode)
                changed = True
            if changed:
                inode.ctime_ns = ctx.now_ns
                ctx.put(inode)
            return pb.SetAttrRsp(inode=inode)

        return await self._mutate(r.req, Tag.SETATTR, pb.SetAttrRsp, body)

    @staticmethod
    def _chown(inode: pb.Inode, r: pb.SetAttrReq, caller: Caller) -> None:
        uid = r.uid if r.HasField("uid") else inode.uid
        gid = r.gid if r.HasField("gid") else inode.gid
        if not caller.is_root:
            if r.HasField("uid") and not (caller.uid == inode.uid and uid == inode.uid):
                raise ChainfsError(Code.EPERM, "chown: only root may change the owner")
            if r.HasField("gid") and not (
                caller.uid == inode.uid and (caller.in_group(gid) or gid == inode.gid)
            ):
                raise ChainfsError(Code.EPERM, "chown: not the owner or not in the group")
        inode.uid, inode.gid = uid, gid
        if inode.type == FILE:
            inode.mode &= ~S_ISUID
            if inode.mode & 0o010:
                inode.mode &= ~S_ISGID

    def _xattr_name(self, name: bytes) -> bytes:
        if not name or len(name) > self.cfg.max_xattr_name_bytes:
            raise ChainfsError(Code.ERANGE, "attribute name empty or too long")
        if b"\x00" in name:
            raise ChainfsError(Code.EINVAL, "NUL byte in attribute name")
        if not name.startswith(XATTR_NAMESPACES):
            raise ChainfsError(Code.EOPNOTSUPP, f"attribute namespace of {name!r} not supported")
        if name.startswith(b"system."):
            raise ChainfsError(Code.EOPNOTSUPP, "system.* attributes (ACLs) are not supported")
        return name

    def _xattr_write_check(self, inode: pb.Inode, name: bytes, caller: Caller) -> None:
        if name.startswith(b"trusted."):
            if not caller.is_root:
                raise ChainfsError(Code.EPERM, "trusted.* attributes need root")
            return
        if name.startswith(b"user.") and inode.type not in (FILE, DIRECTORY):
            raise ChainfsError(Code.EPERM, "user.* attributes only on files and directories")
        perm.check(inode, perm.W, caller, "write attribute")

    async def set_xattr(self, r: pb.SetXattrReq) -> pb.SetXattrRsp:
        p = parse(r.at, self.cfg)
        name = self._xattr_name(r.name)
        if r.flags & ~(XATTR_CREATE | XATTR_REPLACE):
            raise ChainfsError(Code.EINVAL, f"unknown xattr flags {r.flags:#x}")
        if len(r.value) > self.cfg.max_xattr_value_bytes:
            raise ChainfsError(Code.E2BIG, f"value over {self.cfg.max_xattr_value_bytes} bytes")

        async def body(ctx: OpCtx) -> pb.SetXattrRsp:
            inode = await self._lookup_target(ctx, p, r.follow)
            self._xattr_write_check(inode, name, ctx.caller)
            key = schema.xattr_key(inode.ino, name)
            exists = await ctx.tx.get(key) is not None
            if r.flags & XATTR_CREATE and exists:
                raise ChainfsError(Code.EEXIST, f"attribute {name!r} exists")
            if r.flags & XATTR_REPLACE and not exists:
                raise ChainfsError(Code.ENODATA, f"no attribute {name!r}")
            if not exists:
                limit = self.cfg.max_xattrs_per_inode
                rows = await ctx.tx.get_range(
                    *schema.range_of(schema.xattr_prefix(inode.ino)), limit=limit
                )
                if len(rows) >= limit:
                    raise ChainfsError(Code.ENOSPC, f"inode has {limit} attributes")
            ctx.tx.set(key, r.value)
            inode.ctime_ns = ctx.now_ns
            ctx.put(inode)
            return pb.SetXattrRsp()

        return await self._mutate(r.req, Tag.SETXATTR, pb.SetXattrRsp, body)

    async def remove_xattr(self, r: pb.RemoveXattrReq) -> pb.RemoveXattrRsp:
        p = parse(r.at, self.cfg)
        name = self._xattr_name(r.name)

        async def body(ctx: OpCtx) -> pb.RemoveXattrRsp:
            inode = await self._lookup_target(ctx, p, r.follow)
            self._xattr_write_check(inode, name, ctx.caller)
            key = schema.xattr_key(inode.ino, name)
            if await ctx.tx.get(key) is None:
                raise ChainfsError(Code.ENODATA, f"no attribute {name!r}")
            ctx.tx.clear(key)
            inode.ctime_ns = ctx.now_ns
            ctx.put(inode)
            return pb.RemoveXattrRsp()

        return await self._mutate(r.req, Tag.REMOVEXATTR, pb.RemoveXattrRsp, body)

    async def set_layout(self, r: pb.SetLayoutReq) -> pb.SetLayoutRsp:
        p = parse(r.at, self.cfg)
        lay = r.layout
        if lay.chunk_size and not (
            MIN_CHUNK_SIZE <= lay.chunk_size <= MAX_CHUNK_SIZE
            and lay.chunk_size & (lay.chunk_size - 1) == 0
        ):
            raise ChainfsError(
                Code.EINVAL,
                f"chunk size {lay.chunk_size} is not a power of two in "
                f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}",
            )
        if lay.stripe > self.cfg.max_stripe:
            raise ChainfsError(Code.EINVAL, f"stripe {lay.stripe} over {self.cfg.max_stripe}")
        if len(set(lay.chains)) != len(lay.chains):
            raise ChainfsError(Code.EINVAL, "a chain is listed twice")
        known = set(self.cluster.chains())
        unknown = sorted(set(lay.chains) - known)
        if unknown:
            raise ChainfsError(Code.EINVAL, f"unknown chains {unknown}")

        async def body(ctx: OpCtx) -> pb.SetLayoutRsp:
            d = await self._lookup_target(ctx, p, follow=True)
            if d.type != DIRECTORY:
                raise ChainfsError(
                    Code.ENOTDIR, "a layout is set on a directory (files keep theirs)"
                )
            if not perm.is_owner(d, ctx.caller):
                raise ChainfsError(Code.EPERM, "set layout: not the owner")
            if lay.chunk_size:
                d.layout.chunk_size = lay.chunk_size
            if lay.stripe:
                d.layout.stripe = lay.stripe
            if lay.chains:
                del d.layout.chains[:]
                d.layout.chains.extend(lay.chains)
            d.ctime_ns = ctx.now_ns
            ctx.put(d)
            return pb.SetLayoutRsp(inode=d)

        return await self._mutate(r.req, Tag.SETLAYOUT, pb.SetLayoutRsp, body)


def _decode_answer(rec: bytes, tag: int, rsp_type: type[M]) -> M:
    if not rec or rec[0] != tag:
        raise ChainfsError(Code.EINVAL, "request id reused for a different operation")
    rsp = rsp_type()
    rsp.ParseFromString(rec[1:])
    return rsp
