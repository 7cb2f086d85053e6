"""Removing names: unlink and rmdir."""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.meta_service import perm, schema
from chainfs.meta_service.ctx import DIRECTORY, FILE, Last, parse
from chainfs.meta_service.ops.base import counter_of, first_of
from chainfs.meta_service.ops.context import OpCtx, Tag
from chainfs.meta_service.ops.trash import TrashOps
from chainfs.proto import meta_pb2 as pb


class RemoveOps(TrashOps):
    async def unlink(self, r: pb.UnlinkReq) -> pb.UnlinkRsp:
        p = parse(r.at, self.cfg)
        retention_ms = self.cfg.trash_retention_ms  # read once: new_ids depends on it

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
            trashed = retention_ms > 0 and inode.type == FILE and inode.nlink == 1
            if trashed and await self._to_trash(ctx, parent, t.name, inode, retention_ms):
                return pb.UnlinkRsp(parent=parent)
            ctx.clear_entry(parent.ino, t.name)
            await self._unlink_inode(ctx, inode)
            ctx.touch_dir(parent)
            return pb.UnlinkRsp(parent=parent)

        return await self._mutate(
            r.req,
            Tag.UNLINK,
            pb.UnlinkRsp,
            body,
            new_ids=retention_ms > 0,
            paths=(p,),
            of_target=counter_of,
            ranges_of=first_of(schema.session_prefix, schema.xattr_prefix),
        )

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
            return pb.RmdirRsp(parent=parent, ino=d.ino)

        return await self._mutate(
            r.req,
            Tag.RMDIR,
            pb.RmdirRsp,
            body,
            paths=(p,),
            of_target=counter_of,
            ranges_of=first_of(schema.dent_prefix),
        )
