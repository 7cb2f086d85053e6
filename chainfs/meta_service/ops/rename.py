"""rename(2) / renameat2: atomic move, replace, RENAME_NOREPLACE and RENAME_EXCHANGE."""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import RENAME_EXCHANGE, RENAME_NOREPLACE
from chainfs.meta_service import perm
from chainfs.meta_service.ctx import DIRECTORY, Ctx, Last, Target, parse
from chainfs.meta_service.ops.base import NamespaceBase
from chainfs.meta_service.ops.context import OpCtx, Tag
from chainfs.proto import meta_pb2 as pb


class RenameOps(NamespaceBase):
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
                _exchange(ctx, s, d, sparent, dparent)
            else:
                await self._move(ctx, s, d, sparent, dparent)
            rsp = pb.RenameRsp(inode=src, src_parent=sparent, dst_parent=dparent)
            if dst is not None and not exchange:
                rsp.replaced.CopyFrom(dst)
            return rsp

        return await self._mutate(r.req, Tag.RENAME, pb.RenameRsp, body, paths=(sp_, dp))

    async def _move(
        self, ctx: Ctx, s: Target, d: Target, sparent: pb.Inode, dparent: pb.Inode
    ) -> None:
        """``s`` takes the name ``d``; what ``d`` named goes (the checks passed)."""
        src, dst = s.inode, d.inode
        assert src is not None
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
            _reparent(src, sparent, dparent)
            ctx.put(sparent)
            ctx.put(dparent)
        _changed(ctx, sparent, dparent, src)


def _exchange(ctx: Ctx, s: Target, d: Target, sparent: pb.Inode, dparent: pb.Inode) -> None:
    """``s`` and ``d`` swap names (RENAME_EXCHANGE; the checks passed)."""
    src, dst = s.inode, d.inode
    assert src is not None and dst is not None
    ctx.set_entry(sparent.ino, s.name, dst.ino, dst.type)
    ctx.set_entry(dparent.ino, d.name, src.ino, src.type)
    if sparent.ino != dparent.ino:
        if src.type == DIRECTORY:
            _reparent(src, sparent, dparent)
        if dst.type == DIRECTORY:
            _reparent(dst, dparent, sparent)
        if DIRECTORY in (src.type, dst.type):
            ctx.put(sparent)
            ctx.put(dparent)
    _changed(ctx, sparent, dparent, src, dst)


def _reparent(d: pb.Inode, old_parent: pb.Inode, new_parent: pb.Inode) -> None:
    """Directory ``d`` moves: its ``..`` link counts in the new parent now."""
    d.parent = new_parent.ino
    old_parent.nlink -= 1
    new_parent.nlink += 1


def _changed(ctx: Ctx, sparent: pb.Inode, dparent: pb.Inode, *moved: pb.Inode) -> None:
    """The moved inodes' ctime and both directories' times."""
    for inode in moved:
        inode.ctime_ns = ctx.now_ns
        ctx.put(inode)
    ctx.touch_dir(sparent)
    ctx.touch_dir(dparent)
