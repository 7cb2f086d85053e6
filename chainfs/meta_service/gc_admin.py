"""What `chainfs admin gc-status` and `admin gc` ask of a meta server: the GC
queue of removed files (length, bytes, how long the oldest has waited) and one
GC round run now instead of at the next interval."""

from __future__ import annotations

import time

import grpc.aio

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.grpc_util import rpc_handler
from chainfs.kv import KVStore, Transaction
from chainfs.meta_service import schema
from chainfs.meta_service.background import GarbageCollector
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.ops.trash import TrashOps
from chainfs.proto import meta_pb2 as pb
from chainfs.proto import meta_pb2_grpc as pbg


class GcAdmin:
    def __init__(self, kv: KVStore, cfg: MetaConfig) -> None:
        self.kv = kv
        self.cfg = cfg
        self.collector: GarbageCollector | None = None  # set once the server runs GC

    async def status(self) -> pb.GcStatusRsp:
        """One read of up to ``gc_status_scan_limit`` queue entries and their inodes."""
        limit = self.cfg.gc_status_scan_limit
        now_ms = time.time_ns() // 1_000_000

        async def fn(tx: Transaction) -> pb.GcStatusRsp:
            end = schema.range_of(schema.GCQU)[1]
            rows = await tx.get_range(schema.GCQU, end, limit=limit + 1)
            rsp = pb.GcStatusRsp(counted_all=len(rows) <= limit)
            for key, _ in rows[:limit]:
                due_ms, ino = schema.parse_gc_key(key)
                rsp.queued_files += 1
                rsp.due_files += due_ms <= now_ms
                raw = await tx.get(schema.inode_key(ino))
                if raw is None:
                    continue  # collected meanwhile
                inode = schema.decode_inode(raw)
                rsp.queued_bytes += inode.size
                removed_ms = inode.ctime_ns // 1_000_000  # the unlink set ctime
                if not rsp.oldest_removed_ms or removed_ms < rsp.oldest_removed_ms:
                    rsp.oldest_removed_ms = removed_ms
            return rsp

        rsp = await self.kv.transact(fn, read_only=True)
        if self.collector is not None:
            rsp.collected_files = self.collector.removed_files
            rsp.removed_chunks = self.collector.removed_chunks
        return rsp

    async def run(self) -> pb.RunGcRsp:
        """One GC round (up to ``gc_batch`` due files) now."""
        gc = self.collector
        if gc is None:
            raise ChainfsError(Code.ENOSYS, "this meta server runs no GC (standalone: no storage)")
        files, chunks = gc.removed_files, gc.removed_chunks
        more = await gc.round()
        return pb.RunGcRsp(
            collected_files=gc.removed_files - files,
            removed_chunks=gc.removed_chunks - chunks,
            more_due=more,
        )


class MetaAdminServicer(pbg.MetaAdminServicer):
    """The MetaAdmin gRPC service over a :class:`GcAdmin` and the trash of ``ns``."""

    def __init__(self, gc: GcAdmin, ns: TrashOps) -> None:
        self.gc = gc
        self.ns = ns

    @rpc_handler
    async def GcStatus(
        self, request: pb.GcStatusReq, context: grpc.aio.ServicerContext
    ) -> pb.GcStatusRsp:
        return await self.gc.status()

    @rpc_handler
    async def RunGc(self, request: pb.RunGcReq, context: grpc.aio.ServicerContext) -> pb.RunGcRsp:
        return await self.gc.run()

    @rpc_handler
    async def TrashList(
        self, request: pb.TrashListReq, context: grpc.aio.ServicerContext
    ) -> pb.TrashListRsp:
        return await self.ns.trash_list(request)

    @rpc_handler
    async def TrashRestore(
        self, request: pb.TrashRestoreReq, context: grpc.aio.ServicerContext
    ) -> pb.TrashRestoreRsp:
        return await self.ns.trash_restore(request)

    @rpc_handler
    async def TrashPurge(
        self, request: pb.TrashPurgeReq, context: grpc.aio.ServicerContext
    ) -> pb.TrashPurgeRsp:
        return await self.ns.trash_purge(request)
