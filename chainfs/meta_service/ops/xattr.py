"""Extended attributes: get, list, set, remove (user.*, trusted.*, security.*)."""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import XATTR_CREATE, XATTR_REPLACE
from chainfs.kv.base import PrefetchRange
from chainfs.meta_service import perm, schema
from chainfs.meta_service.ctx import DIRECTORY, FILE, SYMLINK, parse
from chainfs.meta_service.ops.base import NamespaceBase, xattr_of
from chainfs.meta_service.ops.context import XATTR_NAMESPACES, OpCtx, Tag
from chainfs.meta_service.perm import Caller
from chainfs.proto import meta_pb2 as pb


class XattrOps(NamespaceBase):
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

        return await self._read(r.req, body, paths=(p,), of_target=xattr_of(name))

    async def list_xattr(self, r: pb.ListXattrReq) -> pb.ListXattrRsp:
        p = parse(r.at, self.cfg)

        most = self.cfg.max_xattrs_per_inode

        def names_of(ino: int) -> list[PrefetchRange]:
            return [(*schema.range_of(schema.xattr_prefix(ino)), most)]

        async def body(ctx: OpCtx) -> pb.ListXattrRsp:
            inode = await self._lookup_target(ctx, p, r.follow)
            prefix = schema.xattr_prefix(inode.ino)
            rows = await ctx.tx.get_range(*schema.range_of(prefix), limit=most)
            names = [k[len(prefix) :] for k, _ in rows]
            if not ctx.caller.is_root:
                names = [n for n in names if not n.startswith(b"trusted.")]
            return pb.ListXattrRsp(names=names)

        return await self._read(r.req, body, paths=(p,), ranges_of=names_of)

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

        return await self._mutate(
            r.req, Tag.SETXATTR, pb.SetXattrRsp, body, paths=(p,), of_target=xattr_of(name)
        )

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

        return await self._mutate(
            r.req, Tag.REMOVEXATTR, pb.RemoveXattrRsp, body, paths=(p,), of_target=xattr_of(name)
        )
