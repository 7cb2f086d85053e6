"""`chainfs admin trash list|restore|purge`: files removed while the cluster
setting meta.trash_retention_ms was above 0, kept in /.trash until purged."""

from __future__ import annotations

import os
from typing import Any

import click

from chainfs.cli.admin.common import admin, admin_options, async_command, emit, emit_object
from chainfs.cli.admin.gc import call_meta_admin
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import meta_pb2 as pb

LIST_COLUMNS = ("entry", "uid", "size_bytes", "orig_parent", "orig_name", "removed_ms", "due_ms")


def record_object(rec: pb.TrashRecord) -> dict[str, Any]:
    return {
        "entry": os.fsdecode(rec.entry),
        "ino": rec.ino,
        "uid": rec.uid,
        "orig_parent": rec.orig_parent,
        "orig_name": os.fsdecode(rec.orig_name),
        "removed_ms": rec.removed_ms,
        "due_ms": rec.due_ms,
    }


@admin.group("trash")
def trash() -> None:
    """Removed files kept in /.trash (on when meta.trash_retention_ms > 0)."""


@trash.command("list")
@admin_options
@click.option("--uid", type=int, default=None, help="Only the trash of this user.")
@async_command
async def list_cmd(address: str, as_json: bool, uid: int | None) -> None:
    """Trash entries, soonest purge first (up to meta's trash_list_limit)."""
    req = pb.TrashListReq(by_uid=uid is not None, uid=uid or 0)
    rsp: pb.TrashListRsp = await call_meta_admin(address, "TrashList", req)
    rows = [
        {**record_object(rec), "size_bytes": size}
        for rec, size in zip(rsp.records, rsp.sizes, strict=True)
    ]
    if not rsp.counted_all:
        click.echo("(more entries than trash_list_limit: the rest not listed)", err=True)
    emit(rows, LIST_COLUMNS, as_json, title="Trash")


@trash.command("restore")
@admin_options
@click.argument("entry")
@click.option("--to", "to", default="", help="Absolute path to restore to (default: original).")
@async_command
async def restore_cmd(address: str, as_json: bool, entry: str, to: str) -> None:
    """Put ENTRY back at its original name (EEXIST if taken) or at --to."""
    req = pb.TrashRestoreReq(entry=os.fsencode(entry), to=os.fsencode(to))
    rsp: pb.TrashRestoreRsp = await call_meta_admin(address, "TrashRestore", req)
    obj = {**record_object(rsp.record), "parent": rsp.parent, "name": os.fsdecode(rsp.name)}
    emit_object(obj, as_json, title="Restored")


@trash.command("purge")
@admin_options
@click.argument("entry", required=False)
@click.option("--all", "purge_all", is_flag=True, help="Purge every entry.")
@click.option("--expired", is_flag=True, help="Purge the entries that are due.")
@async_command
async def purge_cmd(
    address: str, as_json: bool, entry: str | None, purge_all: bool, expired: bool
) -> None:
    """Remove ENTRY (or --all, or --expired) from the trash now; files go to GC."""
    if sum((entry is not None, purge_all, expired)) != 1:
        raise ChainfsError(Code.EINVAL, "give one of: ENTRY, --all, --expired")
    req = pb.TrashPurgeReq(entry=os.fsencode(entry or ""), all=purge_all, expired=expired)
    purged = 0
    while True:  # each call purges up to meta's trash_purge_batch entries
        rsp: pb.TrashPurgeRsp = await call_meta_admin(address, "TrashPurge", req)
        purged += rsp.purged
        if not rsp.more:
            break
    emit_object({"purged": purged}, as_json, title="Trash purge")
