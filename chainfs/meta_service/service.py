"""The Meta service on both transports: the gRPC servicer (one method per
RPC) and the framed data-plane handler (same messages, msg_type names the RPC);
each call is one call into Namespace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc.aio

from chainfs.common.auth.identity import Identity
from chainfs.common.dataplane.server import Handler, message_handler
from chainfs.common.metrics import RequestMetrics
from chainfs.common.rpc.grpc_util import rpc_handler
from chainfs.common.rpc.meta_wire import WIRE_BY_MSG_TYPE
from chainfs.meta_service.namespace import Namespace
from chainfs.proto import meta_pb2 as pb
from chainfs.proto import meta_pb2_grpc as pbg

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class MetaServicer(pbg.MetaServicer):
    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    @rpc_handler
    async def Stat(self, request: pb.StatReq, context: Ctx) -> pb.StatRsp:
        return await self.ns.stat(request)

    @rpc_handler
    async def BatchStat(self, request: pb.BatchStatReq, context: Ctx) -> pb.BatchStatRsp:
        return await self.ns.batch_stat(request)

    @rpc_handler
    async def Open(self, request: pb.OpenReq, context: Ctx) -> pb.OpenRsp:
        return await self.ns.open(request)

    @rpc_handler
    async def Sync(self, request: pb.SyncReq, context: Ctx) -> pb.SyncRsp:
        return await self.ns.sync(request)

    @rpc_handler
    async def Close(self, request: pb.CloseReq, context: Ctx) -> pb.CloseRsp:
        return await self.ns.close(request)

    @rpc_handler
    async def KeepAlive(self, request: pb.KeepAliveReq, context: Ctx) -> pb.KeepAliveRsp:
        return await self.ns.keepalive(request)

    @rpc_handler
    async def Mkdir(self, request: pb.MkdirReq, context: Ctx) -> pb.MkdirRsp:
        return await self.ns.mkdir(request)

    @rpc_handler
    async def Unlink(self, request: pb.UnlinkReq, context: Ctx) -> pb.UnlinkRsp:
        return await self.ns.unlink(request)

    @rpc_handler
    async def Rmdir(self, request: pb.RmdirReq, context: Ctx) -> pb.RmdirRsp:
        return await self.ns.rmdir(request)

    @rpc_handler
    async def Rename(self, request: pb.RenameReq, context: Ctx) -> pb.RenameRsp:
        return await self.ns.rename(request)

    @rpc_handler
    async def Link(self, request: pb.LinkReq, context: Ctx) -> pb.LinkRsp:
        return await self.ns.link(request)

    @rpc_handler
    async def Symlink(self, request: pb.SymlinkReq, context: Ctx) -> pb.SymlinkRsp:
        return await self.ns.symlink(request)

    @rpc_handler
    async def Readlink(self, request: pb.ReadlinkReq, context: Ctx) -> pb.ReadlinkRsp:
        return await self.ns.readlink(request)

    @rpc_handler
    async def SetAttr(self, request: pb.SetAttrReq, context: Ctx) -> pb.SetAttrRsp:
        return await self.ns.setattr(request)

    @rpc_handler
    async def Readdir(self, request: pb.ReaddirReq, context: Ctx) -> pb.ReaddirRsp:
        return await self.ns.readdir(request)

    @rpc_handler
    async def GetXattr(self, request: pb.GetXattrReq, context: Ctx) -> pb.GetXattrRsp:
        return await self.ns.get_xattr(request)

    @rpc_handler
    async def SetXattr(self, request: pb.SetXattrReq, context: Ctx) -> pb.SetXattrRsp:
        return await self.ns.set_xattr(request)

    @rpc_handler
    async def ListXattr(self, request: pb.ListXattrReq, context: Ctx) -> pb.ListXattrRsp:
        return await self.ns.list_xattr(request)

    @rpc_handler
    async def RemoveXattr(self, request: pb.RemoveXattrReq, context: Ctx) -> pb.RemoveXattrRsp:
        return await self.ns.remove_xattr(request)

    @rpc_handler
    async def StatFs(self, request: pb.StatFsReq, context: Ctx) -> pb.StatFsRsp:
        return await self.ns.statfs(request)

    @rpc_handler
    async def SetLayout(self, request: pb.SetLayoutReq, context: Ctx) -> pb.SetLayoutRsp:
        return await self.ns.set_layout(request)

    @rpc_handler
    async def Mknod(self, request: pb.MknodReq, context: Ctx) -> pb.MknodRsp:
        return await self.ns.mknod(request)

    @rpc_handler
    async def Fallocate(self, request: pb.FallocateReq, context: Ctx) -> pb.FallocateRsp:
        return await self.ns.fallocate(request)

    @rpc_handler
    async def Lock(self, request: pb.LockReq, context: Ctx) -> pb.LockRsp:
        return await self.ns.lock(request)

    @rpc_handler
    async def EndSessions(self, request: pb.EndSessionsReq, context: Ctx) -> pb.EndSessionsRsp:
        return await self.ns.end_sessions(request)


# RPC name -> Namespace method name.
NAMESPACE_METHODS = {
    "Stat": "stat",
    "BatchStat": "batch_stat",
    "Open": "open",
    "Sync": "sync",
    "Close": "close",
    "KeepAlive": "keepalive",
    "Mkdir": "mkdir",
    "Unlink": "unlink",
    "Rmdir": "rmdir",
    "Rename": "rename",
    "Link": "link",
    "Symlink": "symlink",
    "Readlink": "readlink",
    "SetAttr": "setattr",
    "Readdir": "readdir",
    "GetXattr": "get_xattr",
    "SetXattr": "set_xattr",
    "ListXattr": "list_xattr",
    "RemoveXattr": "remove_xattr",
    "StatFs": "statfs",
    "SetLayout": "set_layout",
    "Mknod": "mknod",
    "Fallocate": "fallocate",
    "Lock": "lock",
    "EndSessions": "end_sessions",
}
assert set(NAMESPACE_METHODS) == {w.name for w in WIRE_BY_MSG_TYPE.values()}


# The policy key of each framed msg_type (authorized like its gRPC twin).
POLICY_KEYS = {t: f"chainfs.meta.Meta/{w.name}" for t, w in WIRE_BY_MSG_TYPE.items()}
# The metrics op of each framed msg_type (the RPC name, as on gRPC).
OP_NAMES = {t: w.name for t, w in WIRE_BY_MSG_TYPE.items()}


def framed_handler(
    ns: Namespace,
    authenticated: bool = False,
    *,
    admit: Callable[[Identity], None] | None = None,
    metrics: RequestMetrics | None = None,
) -> Handler:
    """The data-plane handler: each framed Meta request calls its Namespace method
    (``authenticated``: after the access policy admitted the connection's identity;
    ``admit``: refuses revoked identities first; ``metrics``: times each op).

    The methods are taken from the class, so the per-instance timing wrappers
    of meta_service.metrics.instrument (for gRPC) are not stacked under the
    handler's own timing."""
    calls = {
        t: (w.request, getattr(type(ns), NAMESPACE_METHODS[w.name]).__get__(ns))
        for t, w in WIRE_BY_MSG_TYPE.items()
    }
    return message_handler(
        "meta",
        calls,
        POLICY_KEYS if authenticated else None,
        admit=admit,
        metrics=metrics,
        op_names=OP_NAMES,
    )
