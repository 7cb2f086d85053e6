"""Close and publish: a writer's close that also gives its file the final name, in
one transaction (3FS-style: write the bytes, then one metadata commit). The KV
cache writes each value to a temp file and publishes it this way.

The close always commits (length, session end); the rename is refused the way
rename(2) refuses it (EEXIST under RENAME_NOREPLACE, ENOENT, EACCES, ...) and
the answer says so, so the caller knows the file is closed under its old name.
"""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import RENAME_NOREPLACE
from chainfs.kv import TxnTooOld
from chainfs.meta_service import perm
from chainfs.meta_service.ctx import DIRECTORY, FILE, Last, ParsedPath, parse
from chainfs.meta_service.ops.context import OpCtx, Tag
from chainfs.meta_service.ops.rename import RenameOps
from chainfs.meta_service.ops.session import SessionOps
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb


class PublishOps(SessionOps, RenameOps):
    async def close(self, r: pb.CloseReq) -> pb.CloseRsp:
        if not (r.HasField("rename_src") or r.HasField("rename_dst")):
            return await super().close(r)
        if not (r.HasField("rename_src") and r.HasField("rename_dst")):
            raise ChainfsError(Code.EINVAL, "a rename at close needs rename_src and rename_dst")
        if not r.session_id:
            raise ChainfsError(Code.EINVAL, "a rename at close needs the file's write session")
        if r.rename_flags & ~RENAME_NOREPLACE:
            raise ChainfsError(Code.EINVAL, f"rename flags at close: {r.rename_flags:#x}")
        src = parse(r.rename_src, self.cfg)
        dst = parse(r.rename_dst, self.cfg)
        noreplace = bool(r.rename_flags & RENAME_NOREPLACE)

        async def body(ctx: OpCtx) -> pb.CloseRsp:
            rsp = pb.CloseRsp(rename=cpb.Status())
            try:
                replaced = await self._publish(ctx, r.ino, src, dst, noreplace)
            except TxnTooOld:
                raise  # the snapshot is gone: the whole transaction re-runs
            except ChainfsError as e:  # refused before anything was written
                rsp.rename.code, rsp.rename.message = e.code, e.message
            else:
                if replaced is not None:
                    rsp.replaced.CopyFrom(replaced)
            exact = r.wrote and not r.length_known
            inode = await self._apply_length(ctx, r.ino, r.length_hint, exact, r.wrote)
            await self.end_session(ctx, r.ino, r.session_id, r.req.client_id)
            if inode is not None:
                rsp.inode.CopyFrom(inode)
            return rsp

        return await self._mutate(r.req, Tag.CLOSE, pb.CloseRsp, body, paths=(src, dst))

    async def _publish(
        self, ctx: OpCtx, ino: int, src: ParsedPath, dst: ParsedPath, noreplace: bool
    ) -> pb.Inode | None:
        """rename(2) of file ``ino`` from ``src`` to ``dst``: every check first (a
        refusal raises with nothing written), then the move. What ``dst`` named
        before, as left, or None."""
        s = await ctx.resolve(src, follow_last=False)
        d = await ctx.resolve(dst, follow_last=False)
        if s.kind is Last.SELF or d.kind is Last.SELF:
            raise ChainfsError(Code.EINVAL, "rename needs names")
        if s.kind is not Last.NORM:
            raise ChainfsError(Code.EBUSY, "cannot rename '.', '..' or '/'")
        if d.kind is not Last.NORM:
            raise ChainfsError(Code.EEXIST if noreplace else Code.EBUSY, "bad target name")
        if s.inode is None or s.inode.ino != ino:
            raise ChainfsError(Code.ENOENT, f"{s.name!r} does not name inode {ino}")
        if s.inode.type != FILE:
            raise ChainfsError(Code.EINVAL, f"inode {ino} is not a file")
        if noreplace and d.inode is not None:
            raise ChainfsError(Code.EEXIST, f"{d.name!r} exists")
        if s.slash or d.slash:
            raise ChainfsError(Code.ENOTDIR, "trailing '/' on a non-directory")
        sparent = await ctx.inode(s.parent_ino)
        dparent = await ctx.inode(d.parent_ino)
        if d.inode is not None and d.inode.ino == ino:
            return None  # both names are this file: POSIX says do nothing
        perm.check(sparent, perm.W | perm.X, ctx.caller, "rename from directory")
        perm.check_sticky(sparent, s.inode, ctx.caller)
        perm.check(dparent, perm.W | perm.X, ctx.caller, "rename into directory")
        if d.inode is not None:
            perm.check_sticky(dparent, d.inode, ctx.caller)
            if d.inode.type == DIRECTORY:
                raise ChainfsError(Code.EISDIR, f"{d.name!r} is a directory")
        replaced = d.inode
        await self._move(ctx, s, d, sparent, dparent)
        return replaced
