"""The transaction runner every namespace operation runs in (read-only, or
mutating with its answer kept for retries and storage steps done before
commit), plus the steps several operations share: new inodes and layouts,
lookups, ending sessions and releasing removed inodes."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import MAX_PREFETCH_KEYS, KVStore, Transaction
from chainfs.kv.base import (
    MAX_CACHED_READS,
    MAX_PREFETCH_RANGE_ROWS,
    MAX_PREFETCH_RANGES,
    PrefetchRange,
)
from chainfs.meta_service import chunks, perm, schema
from chainfs.meta_service.alloc import IdLease, InodeAllocator
from chainfs.meta_service.caps import CapabilitySigner
from chainfs.meta_service.chunks import ChunkStorage
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.ctx import DIRECTORY, FILE, Ctx, Last, ParsedPath, PathHints, Target
from chainfs.meta_service.ops.context import (
    ALLOC_FIRST_ID,
    FORMAT_VERSION,
    MAX_CACHED_POOLS,
    PERMUTATIONS,
    STORAGE_ROUNDS,
    ClusterView,
    M,
    OpCtx,
    StorageFirst,
    check_client,
    decode_answer,
    encode_answer,
    owner_gid,
    strip_sgid,
)
from chainfs.meta_service.perm import S_ISGID, Caller
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb

# Keys an operation reads of the inode its path names (an xattr, its counter
# shard, ...), given that inode's number: read ahead when the hints reach it.
TargetKeys = Callable[[int], list[bytes]]
# Likewise the ranges it scans (an entry list, its sessions, ...).
TargetRanges = Callable[[int], list[PrefetchRange]]


def xattr_of(name: bytes) -> TargetKeys:
    return lambda ino: [schema.xattr_key(ino, name)]


def dir_times_of(ino: int) -> list[bytes]:
    """What a directory's stat reads besides its inode (Ctx.dir_times)."""
    return [schema.dir_times_key(ino)]


def counter_of(ino: int) -> list[bytes]:
    """The inode counter shard dropping ``ino`` updates (schema.count_inodes)."""
    return [schema.inode_count_key(ino)]


def first_of(*prefixes: Callable[[int], bytes]) -> TargetRanges:
    """Whether anything lies under each of ``prefixes(ino)`` (a scan of limit 1)."""
    return lambda ino: [(*schema.range_of(prefix(ino)), 1) for prefix in prefixes]


class NamespaceBase:
    """State and helpers every operation family shares (the meta server holds one)."""

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
        self.caps = CapabilitySigner.from_config(cfg)  # None: no cluster secret, nothing signed
        self._rng = random.Random()
        self._perms: dict[tuple[int, ...], list[list[int]]] = {}  # chain pool -> permutations
        # Guesses of the keys a path reads, where the store reads them ahead.
        self.hints = PathHints() if kv.prefetches else None

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

    async def _read(
        self,
        req: cpb.RequestInfo,
        body: Callable[[OpCtx], Awaitable[M]],
        paths: tuple[ParsedPath, ...] = (),
        of_target: TargetKeys | None = None,
        ranges_of: TargetRanges | None = None,
    ) -> M:
        """``paths``: what ``body`` resolves, fetched ahead (see _ahead)."""
        return await self._plain(
            req, body, read_only=True, paths=paths, of_target=of_target, ranges_of=ranges_of
        )

    async def _retry_safe(self, req: cpb.RequestInfo, body: Callable[[OpCtx], Awaitable[M]]) -> M:
        """A mutation whose repetition changes nothing more (ending a session):
        no answer is kept for retries, so no IDEM read, write or later delete."""
        check_client(req)
        return await self._plain(req, body, read_only=False)

    async def _plain(
        self,
        req: cpb.RequestInfo,
        body: Callable[[OpCtx], Awaitable[M]],
        read_only: bool,
        paths: tuple[ParsedPath, ...] = (),
        of_target: TargetKeys | None = None,
        ranges_of: TargetRanges | None = None,
    ) -> M:
        caller = Caller.of(req)

        async def fn(tx: Transaction) -> M:
            return await body(OpCtx(tx, caller, self.cfg, None, {}, self.hints))

        ahead, ranges = self._ahead(paths, of_target=of_target, ranges_of=ranges_of)
        return await self.kv.transact(
            fn, read_only=read_only, prefetch=ahead, prefetch_ranges=ranges
        )

    async def _mutate(
        self,
        req: cpb.RequestInfo,
        tag: int,
        rsp_type: type[M],
        body: Callable[[OpCtx], Awaitable[M]],
        new_ids: bool = False,
        paths: tuple[ParsedPath, ...] = (),
        durable: bool = True,
        of_target: TargetKeys | None = None,
        ranges_of: TargetRanges | None = None,
    ) -> M:
        """Run ``body`` in a transaction that also records the answer for retries.
        ``paths``: what ``body`` resolves, fetched ahead (see _ahead).
        ``durable=False``: the change may be lost if meta crashes (see KVStore.transact)."""
        check_client(req)
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
                    return decode_answer(rec, tag, rsp_type)
            ctx = OpCtx(tx, caller, self.cfg, lease, storage_done, self.hints)
            rsp = await body(ctx)
            if idem:
                tx.set(ikey, encode_answer(tag, rsp))
                expire = ctx.now_ms + self.cfg.idempotency_ttl_ms
                tx.set(schema.idem_expiry_key(expire, req.client_id, req.request_id), b"")
            return rsp

        for _ in range(STORAGE_ROUNDS):
            committed = False
            try:
                ahead, ranges = self._ahead(paths, [ikey] if idem else [], of_target, ranges_of)
                if ahead and lease is not None:  # the inode counter a new inode updates
                    lease.restart()
                    ahead.append(schema.inode_count_key(await lease.peek()))
                rsp = await self.kv.transact(
                    fn, prefetch=ahead, durable=durable, prefetch_ranges=ranges
                )
                committed = True
                return rsp
            except StorageFirst as need:
                storage_done[need.key] = await self._storage_step(need)
            finally:
                if lease is not None:
                    lease.finish(committed)
        raise ChainfsError(Code.EAGAIN, "file kept changing during a storage step; retry")

    def _ahead(
        self,
        paths: tuple[ParsedPath, ...],
        first: list[bytes] | None = None,
        of_target: TargetKeys | None = None,
        ranges_of: TargetRanges | None = None,
    ) -> tuple[list[bytes], list[PrefetchRange]]:
        """Keys to read at begin (a store with round trips reads them in one):
        ``first``, then those resolving ``paths`` likely reads, then
        ``of_target(ino)`` of the inode the first path likely names; and the
        ranges ``ranges_of(ino)`` of that inode."""
        if not paths or self.hints is None:
            return [], []
        keys = dict.fromkeys(first or ())  # ordered, each once (paths share prefixes)
        target: int | None = None
        for i, p in enumerate(paths):
            walked, named = self.hints.walk(p)
            keys.update(dict.fromkeys(walked))
            if i == 0:
                target = named
        if of_target is not None and target is not None:
            keys.update(dict.fromkeys(of_target(target)))
        ranges = ranges_of(target) if ranges_of is not None and target is not None else []
        # A hint only: what a store would refuse to read ahead is scanned later.
        ranges = [r for r in ranges if r[2] <= MAX_PREFETCH_RANGE_ROWS][:MAX_PREFETCH_RANGES]
        return list(keys)[: MAX_PREFETCH_KEYS - 1], ranges  # room for the inode counter

    def _hinted_keys(self, paths: tuple[ParsedPath, ...]) -> list[bytes]:
        """Every key the hints say walks of ``paths`` read, each once, up to
        MAX_CACHED_READS (what one transaction keeps of its reads)."""
        if self.hints is None:
            return []
        keys: dict[bytes, None] = {}
        for p in paths:
            keys.update(dict.fromkeys(self.hints.walk(p)[0]))
            if len(keys) >= MAX_CACHED_READS:
                break
        return list(keys)[:MAX_CACHED_READS]

    async def _storage_step(self, need: StorageFirst) -> int:
        if self.storage is None:
            raise chunks.no_storage(need.kind)
        if not need.inode.layout.chains:
            return 0
        if need.kind == "truncate":
            await chunks.truncate(self.storage, need.inode, need.size)
            return 0
        assert need.kind == "length", need.kind
        return await chunks.exact_length(self.storage, need.inode)

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
            if len(self._perms) >= MAX_CACHED_POOLS:
                self._perms.clear()
            perms = [self._rng.sample(pool, len(pool)) for _ in range(PERMUTATIONS)]
            self._perms[pool] = perms
        perm = perms[self._rng.randrange(PERMUTATIONS)]
        at = self._rng.randrange(len(pool))
        chains = (perm[at:] + perm[:at])[:stripe]
        return pb.Layout(chunk_size=dir_layout.chunk_size, stripe=stripe, chains=chains)

    def _new_inode(self, ctx: Ctx, ino: int, type_: int, mode: int, parent: pb.Inode) -> pb.Inode:
        gid = owner_gid(parent, ctx.caller)
        if type_ == DIRECTORY and parent.mode & S_ISGID:
            mode |= S_ISGID
        elif type_ == FILE:
            mode = strip_sgid(mode, gid, ctx.caller)
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

    @staticmethod
    def _add_dir(ctx: Ctx, parent: pb.Inode, name: bytes, d: pb.Inode) -> None:
        """Store new directory ``d`` as ``name`` in ``parent`` (it takes the parent's layout)."""
        d.layout.CopyFrom(parent.layout)
        ctx.put(d)
        ctx.set_entry(parent.ino, name, d.ino, DIRECTORY)
        parent.nlink += 1
        ctx.put(parent)
        ctx.touch_dir(parent)

    async def _lookup_target(self, ctx: Ctx, p: ParsedPath, follow: bool) -> pb.Inode:
        t = await ctx.resolve(p, follow_last=follow or p.slash)
        if t.inode is None:
            raise ChainfsError(Code.ENOENT, f"no entry {t.name!r}")
        if t.slash and t.inode.type != DIRECTORY:
            raise ChainfsError(Code.ENOTDIR, f"{t.name!r} is not a directory")
        return await ctx.dir_times(t.inode)

    async def _creation_parent(self, ctx: Ctx, t: Target) -> pb.Inode:
        """Checks of a new name (symlink, link) as Linux's filename_create does."""
        if t.kind is not Last.NORM or t.inode is not None:
            raise ChainfsError(Code.EEXIST, f"{t.name!r} exists")
        if t.slash:
            raise ChainfsError(Code.ENOENT, f"{t.name!r}/: no such directory")
        parent = await ctx.inode(t.parent_ino)
        perm.check(parent, perm.W | perm.X, ctx.caller, "create in directory")
        return parent

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
            await self._collect(ctx, inode)

    async def _collect(self, ctx: Ctx, inode: pb.Inode) -> None:
        """A file without names and sessions: gone now if it never had chunks,
        else queued for GC to drop its chunks first."""
        assert inode.nlink == 0 and inode.type == FILE, inode
        if inode.never_written:
            await ctx.drop_file(inode.ino)
        else:
            ctx.tx.set(schema.gc_key(ctx.now_ms + self.cfg.gc_delay_ms, inode.ino), b"")

    async def _release(self, ctx: Ctx, inode: pb.Inode) -> None:
        """The last name of ``inode`` is gone."""
        assert inode.nlink == 0
        if inode.type != FILE:
            await ctx.drop(inode.ino)
            return
        open_now = await ctx.has_sessions(inode.ino)
        if open_now or not inode.never_written:
            ctx.put(inode)  # kept (nlink 0) while open (any session) and until GC drops its chunks
        if not open_now:
            await self._collect(ctx, inode)

    async def _unlink_inode(self, ctx: Ctx, inode: pb.Inode) -> None:
        assert inode.type != DIRECTORY and inode.nlink > 0, inode
        inode.nlink -= 1
        inode.ctime_ns = ctx.now_ns
        if inode.nlink == 0:
            await self._release(ctx, inode)
        else:
            ctx.put(inode)

    async def _remove_dir(self, ctx: Ctx, parent: pb.Inode, name: bytes, d: pb.Inode) -> None:
        assert d.ino != schema.ROOT_INO
        if not await ctx.is_empty_dir(d.ino):
            raise ChainfsError(Code.ENOTEMPTY, f"{name!r} is not empty")
        ctx.clear_entry(parent.ino, name)
        await ctx.drop(d.ino)
        parent.nlink -= 1
        ctx.put(parent)
        ctx.touch_dir(parent)
