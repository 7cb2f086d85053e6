"""The storage service's request handlers on both transports.

- :func:`framed_handler`: the data plane (reads, updates, chain forwarding,
  sync reports). ``msg_type`` picks a row of :data:`DATA_PLANE`: the request
  message to parse and the call that answers it.
- :class:`StorageControlServicer`: the gRPC control plane for operators and
  resync (one method per StorageControl RPC).

The node's state (targets, CRAQ, routing, resync, repair) lives in
:class:`chainfs.storage_service.server.StorageNode`; these handlers only parse,
call it and answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc.aio
from google.protobuf.message import DecodeError, Message

from chainfs.common.dataplane.server import EagerHandler, Request, Response
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.grpc_util import rpc_handler
from chainfs.proto import storage_pb2 as sp
from chainfs.proto import storage_pb2_grpc as sg
from chainfs.storage_service import metrics as storage_metrics
from chainfs.storage_service.access import check_predecessor
from chainfs.storage_service.chunk_record import parse_key
from chainfs.storage_service.craq import Craq, record_to_meta

if TYPE_CHECKING:
    from chainfs.storage_service.node import StorageNode

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# ---- data plane -------------------------------------------------------------------

# A data-plane call: (node, its CRAQ, the parsed request, the frame) -> the answer
# message, or a whole Response when it carries payload.
DataCall = Callable[["StorageNode", Craq, Any, Request], Awaitable[Message | Response]]


async def _update(node: StorageNode, craq: Craq, req: sp.UpdateReq, frame: Request) -> Message:
    rsp = await craq.update(req, frame.payload, node.access.sender(frame.identity))
    storage_metrics.count_update(req, rsp)
    return rsp


async def _batch_read(
    node: StorageNode, craq: Craq, req: sp.BatchReadReq, frame: Request
) -> Response:
    return _read_reply(node, req, frame, await craq.batch_read(req))


def _read_reply(
    node: StorageNode,
    req: sp.BatchReadReq,
    frame: Request,
    read: tuple[sp.BatchReadRsp, list[memoryview], Callable[[], None]],
) -> Response:
    out, buffers, release = read
    damaged = storage_metrics.count_reads(req, out)
    if damaged and node.repairer is not None:
        for i in damaged:
            io = req.ios[i]
            node.repairer.request(io.target_id, io.chunk.inode, io.chunk.index)
    return Response(
        frame.msg_type, out.SerializeToString(), payload=buffers, on_done=lambda _sent: release()
    )


def _craq_call(method: str) -> DataCall:
    """A call answered by ``Craq.<method>(request)`` alone."""

    async def call(node: StorageNode, craq: Craq, req: Any, frame: Request) -> Message:
        answer: Message = await getattr(craq, method)(req)
        return answer

    return call


async def _remove(
    node: StorageNode, craq: Craq, req: sp.RemoveChunksReq, frame: Request
) -> Message:
    return await craq.remove(req, node.access.sender(frame.identity))


async def _sync_report(
    node: StorageNode, craq: Craq, req: sp.SyncReportReq, frame: Request
) -> Message:
    sender = node.access.sender(frame.identity)
    if sender is not None:
        # Progress and "done" (which makes the target serve) only from its sync source.
        routing = node.routing.current
        chain = routing.chains.get(req.chain_id) if routing is not None else None
        if routing is None or chain is None:
            raise ChainfsError(Code.STALE_CHAIN_VERSION, f"no chain {req.chain_id} in routing")
        check_predecessor(routing, chain, req.target_id, req.from_target, sender, "sync report")
    return node.sync_receiver.handle_report(req, node.targets)


# msg_type -> (request message, call).
DATA_PLANE: dict[int, tuple[type[Message], DataCall]] = {
    sp.UPDATE: (sp.UpdateReq, _update),
    sp.BATCH_READ: (sp.BatchReadReq, _batch_read),
    sp.REMOVE_CHUNKS: (sp.RemoveChunksReq, _remove),
    sp.QUERY_LAST_CHUNK: (sp.QueryLastChunkReq, _craq_call("query_last_chunk")),
    sp.LIST_CHUNKS: (sp.ListChunksReq, _craq_call("list_chunks")),
    sp.SYNC_REPORT: (sp.SyncReportReq, _sync_report),
}


def framed_handler(node: StorageNode) -> EagerHandler:
    """The data-plane handler: refuse while starting, fenced, or for a user token
    revoked since its HELLO; parse by msg_type, check the caller (access.Access),
    answer (a ChainfsError becomes an error frame). A batch read the page cache
    serves is answered at once, on the loop (Craq.batch_read_now); anything
    that waits runs as a task."""

    def handle(frame: Request) -> Response | Awaitable[Response]:
        who = frame.identity
        if node.secret is not None and who.is_user and not node.users.holds(who):
            raise ChainfsError(Code.UNAUTHENTICATED, "token revoked")
        craq = node.craq
        if craq is None:
            raise ChainfsError(Code.TARGET_NOT_SERVING, "storage node is starting")
        node.fence.check()
        route = DATA_PLANE.get(frame.msg_type)
        if route is None:
            raise ChainfsError(Code.BAD_FRAME, f"unknown storage message type {frame.msg_type}")
        request_type, call = route
        try:
            req = request_type.FromString(frame.header)
        except DecodeError as e:  # garbage is the caller's BAD_FRAME, not our INTERNAL
            raise ChainfsError(Code.BAD_FRAME, f"bad {request_type.__name__} header: {e}") from None
        node.access.admit(frame.msg_type, who, req)
        if frame.msg_type == sp.BATCH_READ:
            start = time.perf_counter()
            try:
                now = craq.batch_read_now(req)  # type: ignore[arg-type]
            except Exception as e:
                storage_metrics.failed("batch_read", e)
                raise
            if now is not None:
                rsp = _read_reply(node, req, frame, now)  # type: ignore[arg-type]
                storage_metrics.served_at_once("batch_read", time.perf_counter() - start)
                return rsp
        return _answer(node, craq, call, req, frame)

    return handle


async def _answer(
    node: StorageNode, craq: Craq, call: DataCall, req: Any, frame: Request
) -> Response:
    with storage_metrics.observe(storage_metrics.op_name(frame.msg_type)):
        rsp = await call(node, craq, req, frame)
    if isinstance(rsp, Response):
        return rsp
    return Response(frame.msg_type, rsp.SerializeToString())


# ---- control plane ----------------------------------------------------------------


class StorageControlServicer(sg.StorageControlServicer):
    def __init__(self, node: StorageNode) -> None:
        self.node = node

    @rpc_handler
    async def QueryChunk(self, request: sp.QueryChunkReq, context: Ctx) -> sp.QueryChunkRsp:
        node = self.node
        rsp = sp.QueryChunkRsp()
        routing = node.routing.current
        for tid, t in node.targets.items():
            chain_id = node.chain_of(tid, routing)
            if request.chain_id and chain_id != request.chain_id:
                continue
            rec = t.engine.get(request.chunk.inode, request.chunk.index)
            if rec is None:
                continue
            rsp.replicas.append(
                sp.TargetChunkMeta(
                    target_id=tid,
                    chain_id=chain_id,
                    meta=record_to_meta(request.chunk.inode, request.chunk.index, rec),
                    lost=node.is_lost(tid, request.chunk.inode, request.chunk.index),
                )
            )
        return rsp

    @rpc_handler
    async def DumpChunkMeta(
        self, request: sp.DumpChunkMetaReq, context: Ctx
    ) -> sp.DumpChunkMetaRsp:
        t = self.node.targets.get(request.target_id)
        if t is None:
            raise ChainfsError(
                Code.UNKNOWN_TARGET, f"target {request.target_id} is not on this node"
            )
        cfg = self.node.config
        limit = min(request.limit or cfg.max_list_chunks, cfg.max_list_chunks)
        begin = request.start_after + b"\0" if request.start_after else b"C"
        rsp = sp.DumpChunkMetaRsp()
        last = b""
        for key, rec in t.engine.iter_records(begin):
            if len(rsp.chunks) >= limit:
                rsp.next = last
                break
            inode, index = parse_key(key)
            rsp.chunks.append(record_to_meta(inode, index, rec))
            last = key
        return rsp

    @rpc_handler
    async def GetTargets(self, request: sp.GetTargetsReq, context: Ctx) -> sp.GetTargetsRsp:
        node = self.node
        routing = node.routing.current
        rsp = sp.GetTargetsRsp(
            node_id=node.node_id, routing_version=routing.version if routing else 0
        )
        for tid, t in list(node.targets.items()):
            used, cap = t.engine.usage()
            chunks, pending = await asyncio.get_running_loop().run_in_executor(
                node.executor, t.engine.counts
            )
            rsp.targets.append(
                sp.LocalTarget(
                    target_id=tid,
                    chain_id=node.chain_of(tid, routing),
                    path=str(t.engine.path),
                    used_bytes=used,
                    capacity_bytes=cap,
                    chunks=chunks,
                    pending_chunks=pending,
                    lost_chunks=node.repairer.lost_chunks(tid) if node.repairer else 0,
                )
            )
        return rsp

    @rpc_handler
    async def RepairChunk(self, request: sp.RepairChunkReq, context: Ctx) -> sp.RepairChunkRsp:
        return await self.node.repair_chunk(request)

    @rpc_handler
    async def VerifyChunks(self, request: sp.VerifyChunksReq, context: Ctx) -> sp.VerifyChunksRsp:
        if self.node.scrubber is None:
            raise ChainfsError(Code.TARGET_NOT_SERVING, "storage node is starting")
        return await self.node.scrubber.verify(request, self.node.config.max_list_chunks)

    @rpc_handler
    async def DropChunks(self, request: sp.DropChunksReq, context: Ctx) -> sp.DropChunksRsp:
        return await self.node.drop_chunks(request)

    @rpc_handler
    async def CreateTargets(
        self, request: sp.CreateTargetsReq, context: Ctx
    ) -> sp.CreateTargetsRsp:
        return await self.node.create_targets(request.count, request.parent_dir)
