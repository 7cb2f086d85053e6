"""What every RPC and every storage frame type needs of its caller.

One table, keyed by "<proto service>/<method>" (the same for gRPC and for the
framed transport of meta and mgmtd, whose msg_types are derived from the
service definitions) and by "storage.MsgType/<name>" for storage frames.
Anything absent is refused: a new RPC fails closed until someone decides
here who may call it (tests/security checks the table covers the protos).
"""

from __future__ import annotations

from chainfs.common.auth.identity import Identity, Need, require
from chainfs.common.errors import ChainfsError, Code

A, N, U, NA, CAP = Need.AUTHENTICATED, Need.NODE, Need.USER, Need.NODE_OR_ADMIN, Need.CAPABILITY
ADMIN = Need.ADMIN

POLICY: dict[str, Need] = {
    # meta: users act as themselves (uid/gid from the token); nodes never need it.
    **{
        f"chainfs.meta.Meta/{m}": U
        for m in [
            "Stat",
            "BatchStat",
            "Open",
            "Sync",
            "Close",
            "KeepAlive",
            "Mkdir",
            "Unlink",
            "Rmdir",
            "Rename",
            "Link",
            "Symlink",
            "Readlink",
            "SetAttr",
            "Readdir",
            "GetXattr",
            "SetXattr",
            "ListXattr",
            "RemoveXattr",
            "StatFs",
            "SetLayout",
            "Mknod",
            "Fallocate",
            "Lock",
            "EndSessions",
        ]
    },
    **{
        f"chainfs.meta.MetaAdmin/{m}": ADMIN
        for m in ("GcStatus", "RunGc", "TrashList", "TrashRestore", "TrashPurge")
    },
    # mgmtd: nodes report themselves; anyone known reads routing and status;
    # admins change the cluster.
    "chainfs.mgmt.Mgmt/RegisterNode": N,
    "chainfs.mgmt.Mgmt/Heartbeat": N,
    "chainfs.mgmt.Mgmt/AddTargets": NA,
    "chainfs.mgmt.Mgmt/GetRoutingInfo": A,
    "chainfs.mgmt.Mgmt/WatchRoutingInfo": A,
    "chainfs.mgmt.Mgmt/GetStatus": A,
    "chainfs.mgmt.Mgmt/GetConfig": A,
    "chainfs.mgmt.Mgmt/CreateChains": ADMIN,
    "chainfs.mgmt.Mgmt/UpdateTarget": NA,
    "chainfs.mgmt.Mgmt/UpdateChain": ADMIN,
    "chainfs.mgmt.Mgmt/SetConfig": ADMIN,
    "chainfs.mgmt.Mgmt/Rebalance": ADMIN,
    "chainfs.mgmt.Mgmt/GetRebalanceStatus": ADMIN,
    # users and tokens: admins manage them; nodes fetch the token directory
    # (hashes only) to authenticate users themselves.
    "chainfs.mgmt.Mgmt/UserAdd": ADMIN,
    "chainfs.mgmt.Mgmt/UserList": ADMIN,
    "chainfs.mgmt.Mgmt/UserRemove": ADMIN,
    "chainfs.mgmt.Mgmt/TokenRotate": ADMIN,
    "chainfs.mgmt.Mgmt/GetUserDirectory": N,
    # storage control: operators and peers only (DumpChunkMeta lists every inode).
    **{
        f"chainfs.storage.StorageControl/{m}": NA
        for m in (
            "QueryChunk",
            "DumpChunkMeta",
            "GetTargets",
            "CreateTargets",
            "RepairChunk",
            "VerifyChunks",
            # mgmtd's rebalancer (as node MGMTD_NODE_ID) or an operator; the
            # node refuses a target that is still in a chain.
            "DropChunks",
        )
    },
    # storage frames: clients with a capability; chain peers and meta as nodes
    # (the handler checks the capability, or the predecessor for a forward).
    "storage.MsgType/UPDATE": CAP,
    "storage.MsgType/BATCH_READ": CAP,
    "storage.MsgType/QUERY_LAST_CHUNK": CAP,
    "storage.MsgType/REMOVE_CHUNKS": CAP,
    "storage.MsgType/LIST_CHUNKS": N,
    "storage.MsgType/SYNC_REPORT": N,
}


def need_of(key: str) -> Need | None:
    return POLICY.get(key)


def authorize(key: str, who: Identity) -> Need:
    """Raise unless ``who`` may call ``key``; returns what the key needs (a
    CAPABILITY method still needs its handler's check). Unknown keys: EPERM."""
    need = POLICY.get(key)
    if need is None:
        raise ChainfsError(Code.EPERM, f"{key} is not classified in the access policy: refused")
    require(need, who, key)
    return need
