"""Attributes: setattr (chmod, chown, truncate, utimes) and directory layouts."""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.meta_service import perm
from chainfs.meta_service.config import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from chainfs.meta_service.ctx import DIRECTORY, FILE, SYMLINK, parse
from chainfs.meta_service.ops.base import NamespaceBase, dir_times_of
from chainfs.meta_service.ops.context import MAX_ID, OpCtx, Tag, check_mode, strip_sgid
from chainfs.meta_service.ops.special import is_priv_drop, kill_priv
from chainfs.meta_service.perm import S_ISGID, S_ISUID, Caller
from chainfs.proto import meta_pb2 as pb


class AttrOps(NamespaceBase):
    async def setattr(self, r: pb.SetAttrReq) -> pb.SetAttrRsp:
        p = parse(r.at, self.cfg)
        if r.HasField("mode"):
            check_mode(r.mode)
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
                privilege_drop = r.kill_priv and is_priv_drop(inode, r.mode)
                if not perm.is_owner(inode, caller) and not privilege_drop:
                    raise ChainfsError(Code.EPERM, "chmod: not the owner")
                if inode.type == SYMLINK:
                    raise ChainfsError(Code.EOPNOTSUPP, "symbolic links have no mode")
                inode.mode = strip_sgid(r.mode, inode.gid, caller)
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
                kill_priv(inode, caller)
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

        return await self._mutate(r.req, Tag.SETATTR, pb.SetAttrRsp, body, paths=(p,))

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

        return await self._mutate(
            r.req, Tag.SETLAYOUT, pb.SetLayoutRsp, body, paths=(p,), of_target=dir_times_of
        )
