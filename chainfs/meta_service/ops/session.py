"""Open, sync, close and keep-alive: file sessions and the length of files being written."""

from __future__ import annotations

import os

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.meta_service import perm, schema
from chainfs.meta_service.caps import open_rights
from chainfs.meta_service.ctx import DIRECTORY, FILE, SYMLINK, Ctx, parse
from chainfs.meta_service.ops.base import NamespaceBase
from chainfs.meta_service.ops.context import OpCtx, Tag, check_mode
from chainfs.meta_service.ops.special import check_openable, kill_priv
from chainfs.proto import meta_pb2 as pb

# Session records a close reads to learn whether another writer has the file open.
OTHER_WRITERS_SCAN = 64


class SessionOps(NamespaceBase):
    async def open(self, r: pb.OpenReq) -> pb.OpenRsp:
        p = parse(r.at, self.cfg)
        mode = check_mode(r.mode)
        read_session = r.session and not r.write
        mutating = r.write or r.create or r.truncate or read_session
        if (r.write or read_session) and len(r.req.client_id) != schema.CLIENT_ID_BYTES:
            raise ChainfsError(Code.EINVAL, "an open with a session needs a client id")

        async def body(ctx: OpCtx) -> pb.OpenRsp:
            follow = not (r.create and r.exclusive) and not r.nofollow
            t = await ctx.resolve(p, follow_last=follow or p.slash)
            created = False
            if r.create and t.slash:  # as Linux: whatever the name holds, O_EXCL or not
                raise ChainfsError(Code.EISDIR, f"{t.name!r}/: cannot create a file")
            if t.inode is None:
                if not r.create:
                    raise ChainfsError(Code.ENOENT, f"no entry {t.name!r}")
                parent = await ctx.inode(t.parent_ino)
                perm.check(parent, perm.W | perm.X, ctx.caller, "create in directory")
                inode = self._new_inode(ctx, await ctx.new_ino(), FILE, mode, parent)
                inode.layout.CopyFrom(self._file_layout(parent.layout))
                inode.never_written = True
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
                check_openable(inode)
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
            if created:
                rsp.parent.CopyFrom(parent)
            if r.write or (read_session and inode.type == FILE):
                rsp.session_id = self._open_session(ctx, inode, r.req.client_id, not r.write)
                rsp.session_timeout_ms = self.cfg.session_timeout_ms
            rsp.inode.CopyFrom(inode)
            rights = open_rights(r.read, r.write)
            if self.caps is not None and inode.type == FILE and rights:
                # Access was checked above (a file this open created needs none).
                rsp.capability.CopyFrom(self.caps.sign(inode.ino, rights, r.req.client_id))
            return rsp

        if not mutating:
            return await self._read(r.req, body, paths=(p,))
        # A read session only guards an open file's chunks against a removal
        # meanwhile: it need not wait for the disk. If meta crashes before a
        # later commit syncs it, the reader keeps reading unless the file is
        # removed and collected meanwhile (docs/consistency.md).
        durable = r.write or r.create or r.truncate
        return await self._mutate(
            r.req, Tag.OPEN, pb.OpenRsp, body, new_ids=r.create, paths=(p,), durable=durable
        )

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
        # Any report of a length or a write may come with chunks: GC must see them.
        written = wrote or hint > 0 or exact
        if size != inode.size or wrote or (written and inode.never_written):
            inode.size = size
            if written:
                inode.never_written = False
            if wrote:
                inode.mtime_ns = inode.ctime_ns = ctx.now_ns
                kill_priv(inode, ctx.caller)  # a write by anyone but root drops setuid
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
        if r.session_id and not r.wrote and not r.length_hint:
            return await self._end_unchanged(r)
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
            # The writer's length is exact for its own writes; only another open
            # writer can have put bytes past it. Ask storage only then.
            exact = (
                r.wrote
                and not r.length_known
                and await self._other_writers(ctx, r.ino, r.session_id)
            )
            inode = await self._apply_length(ctx, r.ino, r.length_hint, exact, r.wrote)
            await self.end_session(ctx, r.ino, r.session_id, r.req.client_id)
            return pb.CloseRsp(inode=inode) if inode is not None else pb.CloseRsp()

        return await self._mutate(r.req, Tag.CLOSE, pb.CloseRsp, body)

    async def _other_writers(self, ctx: OpCtx, ino: int, session_id: bytes) -> bool:
        """Whether a write session other than ``session_id`` is open on ``ino``.

        Writers that closed reported their lengths, and the session pruner asked
        storage for those of writers that went silent, so only an open one can
        have written past this writer's length. Past OTHER_WRITERS_SCAN
        sessions, assume one of them writes."""
        own = schema.session_key(ino, session_id)
        rows = await ctx.tx.get_range(
            *schema.range_of(schema.session_prefix(ino)), limit=OTHER_WRITERS_SCAN
        )
        for key, raw in rows:
            if key != own and not pb.SessionRecord.FromString(raw).read_only:
                return True
        return len(rows) >= OTHER_WRITERS_SCAN

    async def _end_unchanged(self, r: pb.CloseReq) -> pb.CloseRsp:
        """A close that reports nothing (a read session, a writer that wrote
        nothing): it only ends the session, which a retry can do again with the
        same outcome, so no answer is recorded for retries (no IDEM write, no
        IDEM read, no tombstones for the cleaner later)."""

        async def body(ctx: OpCtx) -> pb.CloseRsp:
            inode = await self._inode_or_none(ctx, r.ino)
            await self.end_session(ctx, r.ino, r.session_id, r.req.client_id)
            return pb.CloseRsp(inode=inode) if inode is not None else pb.CloseRsp()

        return await self._retry_safe(r.req, body)

    async def end_sessions(self, r: pb.EndSessionsReq) -> pb.EndSessionsRsp:
        """Many closes that report nothing, in one transaction."""
        if len(r.sessions) > self.cfg.max_session_ends_per_call:
            raise ChainfsError(
                Code.E2BIG,
                f"{len(r.sessions)} sessions in one call "
                f"(limit {self.cfg.max_session_ends_per_call})",
            )

        async def body(ctx: OpCtx) -> pb.EndSessionsRsp:
            await ctx.read_inodes(s.ino for s in r.sessions)
            for s in r.sessions:
                await self.end_session(ctx, s.ino, s.session_id, r.req.client_id)
            return pb.EndSessionsRsp()

        return await self._retry_safe(r.req, body)
