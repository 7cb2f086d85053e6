"""New names: mkdir (and mkdir -p), symlink, hard link."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from chainfs.common.errors import ChainfsError, Code
from chainfs.meta_service import perm
from chainfs.meta_service.config import PATH_MAX
from chainfs.meta_service.ctx import DIRECTORY, SYMLINK, Last, ParsedPath, parse
from chainfs.meta_service.ops.base import NamespaceBase
from chainfs.meta_service.ops.context import OpCtx, Tag, check_mode
from chainfs.proto import meta_pb2 as pb


class CreateOps(NamespaceBase):
    async def mkdir(self, r: pb.MkdirReq) -> pb.MkdirRsp:
        p = parse(r.at, self.cfg)
        # Linux: a new directory takes the permission and sticky bits asked for;
        # setgid comes only from the parent.
        mode = check_mode(r.mode) & 0o1777
        parents_mode = check_mode(r.parents_mode) & 0o1777 if r.parents_mode else mode
        made_in: dict[int, pb.Inode] = {}  # new directory -> its parent as left (this attempt)

        async def make(ctx: OpCtx, parent: pb.Inode, name: bytes, mode: int) -> pb.Inode:
            perm.check(parent, perm.W | perm.X, ctx.caller, "create in directory")
            if parent.nlink >= self.cfg.max_links:
                raise ChainfsError(Code.EMLINK, "too many subdirectories")
            d = self._new_inode(ctx, await ctx.new_ino(), DIRECTORY, mode, parent)
            self._add_dir(ctx, parent, name, d)
            made_in[d.ino] = parent
            return d

        async def body(ctx: OpCtx) -> pb.MkdirRsp:
            made_in.clear()
            if r.parents and not p.self_ref:
                d = await self._mkdir_p(ctx, p, mode, parents_mode, make)
            else:
                t = await ctx.resolve(p, follow_last=False)
                if t.kind is not Last.NORM or t.inode is not None:
                    raise ChainfsError(Code.EEXIST, f"{t.name!r} exists")
                d = await make(ctx, await ctx.inode(t.parent_ino), t.name, mode)
            return pb.MkdirRsp(inode=d, parent=made_in.get(d.ino))

        return await self._mutate(r.req, Tag.MKDIR, pb.MkdirRsp, body, new_ids=True, paths=(p,))

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
            return pb.SymlinkRsp(inode=inode, parent=parent)

        return await self._mutate(r.req, Tag.SYMLINK, pb.SymlinkRsp, body, new_ids=True, paths=(p,))

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
            return pb.LinkRsp(inode=inode, parent=parent)

        return await self._mutate(r.req, Tag.LINK, pb.LinkRsp, body, paths=(src, p))
