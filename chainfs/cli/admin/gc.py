"""`chainfs admin gc-status` and `admin gc`: the queue of removed files whose
chunks storage has not dropped yet, and one GC round run now.

Orphans (inodes with no name, no open session and no queue entry) are not
looked for: finding them needs a scan of every inode (`chainfs fsck` territory).
"""

from __future__ import annotations

import time
from typing import Any

from chainfs.cli.admin.common import admin, admin_options, async_command, emit_object
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc import grpc_util
from chainfs.common.rpc.mgmt_client import MgmtClient, env_credential
from chainfs.proto import meta_pb2 as pb
from chainfs.proto import meta_pb2_grpc as pbg
from chainfs.proto import mgmt_pb2 as mp

CALL_TIMEOUT_S = 30.0  # a GC round removes chunks of up to gc_batch files from storage


def status_object(rsp: pb.GcStatusRsp, now_ms: int) -> dict[str, Any]:
    oldest = rsp.oldest_removed_ms
    return {
        "queued_files": rsp.queued_files,
        "due_files": rsp.due_files,
        "queued_bytes": rsp.queued_bytes,
        "oldest_age_s": round((now_ms - oldest) / 1000, 1) if oldest else None,
        "counted_all": rsp.counted_all,
        "collected_files": rsp.collected_files,
        "removed_chunks": rsp.removed_chunks,
    }


async def call_meta_admin(address: str, method: str, request: Any) -> Any:
    """``method`` of the MetaAdmin service on the first online meta server of the routing."""
    async with MgmtClient(address) as mgmt:
        routing = await mgmt.get_routing()
        assert routing is not None, "known_version 0 always returns routing info"
    metas = [n for n in routing.nodes_of_type(mp.META) if n.rpc_address]
    if not metas:
        raise ChainfsError(Code.UNAVAILABLE, "no meta server online in the routing info")
    meta = min(metas, key=lambda n: n.node_id)
    async with grpc_util.channel(meta.rpc_address, env_credential()) as channel:
        stub = pbg.MetaAdminStub(channel)
        return await grpc_util.call(
            getattr(stub, method), request, CALL_TIMEOUT_S, meta.rpc_address
        )


@admin.command("gc-status")
@admin_options
@async_command
async def gc_status_cmd(address: str, as_json: bool) -> None:
    """Removed files waiting for GC: how many, their bytes, the oldest's age
    (counted up to meta's gc_status_scan_limit; counted_all says if that was all)."""
    rsp: pb.GcStatusRsp = await call_meta_admin(address, "GcStatus", pb.GcStatusReq())
    emit_object(status_object(rsp, time.time_ns() // 1_000_000), as_json, title="GC queue")


@admin.command("gc")
@admin_options
@async_command
async def gc_cmd(address: str, as_json: bool) -> None:
    """Run one GC round now on one meta server (up to its gc_batch due files)."""
    rsp: pb.RunGcRsp = await call_meta_admin(address, "RunGc", pb.RunGcReq())
    obj = {
        "collected_files": rsp.collected_files,
        "removed_chunks": rsp.removed_chunks,
        "more_due": rsp.more_due,
    }
    emit_object(obj, as_json, title="GC round")
