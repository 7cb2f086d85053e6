"""Removing names: unlink and rmdir."""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.meta_service import perm
from chainfs.meta_service.ctx import DIRECTORY, Last, parse
from chainfs.meta_service.ops.base import NamespaceBase
from chainfs.meta_service.ops.context import OpCtx, Tag
from chainfs.proto import meta_pb2 as pb


class RemoveOps(NamespaceBase):
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
