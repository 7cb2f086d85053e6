"""Read-only operations: stat, batch stat, readlink, readdir, statfs."""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import TxnTooOld
from chainfs.kv.base import PrefetchRange
from chainfs.meta_service import perm, schema
from chainfs.meta_service.config import INODES_TOTAL, NAME_MAX
from chainfs.meta_service.ctx import DIRECTORY, SYMLINK, ParsedPath, parse
from chainfs.meta_service.ops.base import NamespaceBase, dir_times_of
from chainfs.meta_service.ops.context import OpCtx
from chainfs.proto import meta_pb2 as pb

# Errors of the store or of this server (etcd unreachable past its op timeout,
# ...) that a client retries a Stat on, or fails over: they fail a BatchStat as
# a whole, as they fail a Stat, rather than become one path's answer.
_CALL_RETRIED = frozenset(
    {Code.UNAVAILABLE, Code.NOT_PRIMARY_META, Code.ETIMEDOUT, Code.TXN_CONFLICT, Code.EAGAIN}
)


class LookupOps(NamespaceBase):
    async def stat(self, r: pb.StatReq) -> pb.StatRsp:
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.StatRsp:
            rsp = pb.StatRsp(inode=await self._lookup_target(ctx, p, r.follow))
            self._grant(ctx, rsp.inode, r.want_capability, r.req.client_id, rsp)
            return rsp

        return await self._read(r.req, body, paths=(p,))

    async def batch_stat(self, r: pb.BatchStatReq) -> pb.BatchStatRsp:
        if len(r.ats) > self.cfg.max_batch_stat:
            raise ChainfsError(
                Code.E2BIG, f"more than {self.cfg.max_batch_stat} inodes in one call"
            )

        # Parsed once (a path that does not parse is its own result), for the
        # read-ahead and for every attempt of the transaction.
        parsed = [self._parsed_or_error(at) for at in r.ats]

        paths = tuple(p for p in parsed if not isinstance(p, ChainfsError))
        # The keys the walks likely read past the few read at begin: together.
        hinted = self._hinted_keys(paths) if len(paths) > 1 else []

        async def body(ctx: OpCtx) -> pb.BatchStatRsp:
            if hinted:
                await ctx.tx.get_many(hinted)
            out = pb.BatchStatRsp()
            for p in parsed:
                try:
                    if isinstance(p, ChainfsError):
                        raise p
                    inode = await self._lookup_target(ctx, p, r.follow)
                    res = out.results.add(code=0, inode=inode)
                    self._grant(ctx, inode, r.want_capability, r.req.client_id, res)
                except TxnTooOld:
                    raise  # the snapshot is gone: the whole transaction re-runs
                except ChainfsError as e:
                    if e.code in _CALL_RETRIED:
                        raise  # not the path's answer: the client retries the call
                    out.results.add(code=e.code, message=e.message)
            return out

        return await self._read(r.req, body, paths=paths)

    def _parsed_or_error(self, at: pb.PathAt) -> ParsedPath | ChainfsError:
        try:
            return parse(at, self.cfg)
        except ChainfsError as e:
            return e

    def _grant(
        self,
        ctx: OpCtx,
        inode: pb.Inode,
        rights: int,
        client_id: bytes,
        into: pb.StatRsp | pb.StatResult,
    ) -> None:
        """Add the capability a stat asked for, when meta signs them and the caller
        may access the file so (else none: the stat itself still succeeds)."""
        if rights and self.caps is not None:
            cap = self.caps.grant(inode, rights, ctx.caller, client_id)
            if cap is not None:
                into.capability.CopyFrom(cap)

    async def readlink(self, r: pb.ReadlinkReq) -> pb.ReadlinkRsp:
        p = parse(r.at, self.cfg)

        async def body(ctx: OpCtx) -> pb.ReadlinkRsp:
            inode = await self._lookup_target(ctx, p, follow=False)
            if inode.type != SYMLINK:
                raise ChainfsError(Code.EINVAL, "not a symbolic link")
            return pb.ReadlinkRsp(target=inode.symlink_target)

        return await self._read(r.req, body, paths=(p,))

    async def readdir(self, r: pb.ReaddirReq) -> pb.ReaddirRsp:
        p = parse(r.at, self.cfg)
        if len(r.after) > NAME_MAX:
            raise ChainfsError(Code.EINVAL, "readdir cursor is not a name")
        limit = r.limit or self.cfg.readdir_page_entries
        limit = min(limit, self.cfg.readdir_max_page_entries)

        def page_of(ino: int) -> list[PrefetchRange]:
            prefix = schema.dent_prefix(ino)
            begin = prefix + r.after + b"\x00" if r.after else prefix
            return [(begin, schema.range_of(prefix)[1], limit + 1)]

        async def body(ctx: OpCtx) -> pb.ReaddirRsp:
            d = await self._lookup_target(ctx, p, follow=True)
            if d.type != DIRECTORY:
                raise ChainfsError(Code.ENOTDIR, "not a directory")
            perm.check(d, perm.R, ctx.caller, "read directory")
            ((begin, end, _),) = page_of(d.ino)
            rows = await ctx.tx.get_range(begin, end, limit=limit + 1)
            rsp = pb.ReaddirRsp(more=len(rows) > limit, dir_ino=d.ino)
            ents = [schema.decode_dent(value) for _, value in rows[:limit]]
            if r.with_attrs:
                dirs = (ino for ino, type_ in ents if type_ == DIRECTORY)
                await ctx.read_inodes((ino for ino, _ in ents), dirs)
            for (key, _), (ino, type_) in zip(rows, ents, strict=False):
                e = rsp.entries.add(
                    name=schema.dent_name(key), ino=ino, type=pb.InodeType.ValueType(type_)
                )
                if r.with_attrs:
                    e.inode.CopyFrom(await ctx.dir_times(await ctx.inode(ino)))
            return rsp

        return await self._read(r.req, body, paths=(p,), of_target=dir_times_of, ranges_of=page_of)

    async def statfs(self, r: pb.StatFsReq) -> pb.StatFsRsp:
        capacity, used = self.cluster.capacity()

        async def body(ctx: OpCtx) -> pb.StatFsRsp:
            root = await ctx.inode(schema.ROOT_INO)
            used = await schema.inodes_used(ctx.tx)
            return pb.StatFsRsp(
                block_size=root.layout.chunk_size, inodes_total=INODES_TOTAL, inodes_used=used
            )

        rsp = await self._read(r.req, body)
        rsp.capacity_bytes = capacity
        rsp.used_bytes = min(used, capacity)
        rsp.free_bytes = capacity - rsp.used_bytes
        rsp.inodes_allocated = await self.alloc.allocated()
        rsp.chains = len(self.cluster.chains())
        rsp.max_name_bytes = NAME_MAX
        return rsp
