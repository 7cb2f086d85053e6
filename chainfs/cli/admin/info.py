"""`chainfs admin info PATH|INODE`: one file's inode, layout and chunks with
the state of every replica (storage's QueryChunk), bounded by ``--chunks``."""

from __future__ import annotations

from typing import Any

import click

from chainfs.cli.admin.chunks import InodeOrPath, query_chunk
from chainfs.cli.admin.common import admin, admin_options, async_command, emit, emit_object
from chainfs.cli.admin.layout import meta_client
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.proto import meta_pb2 as pb

DEFAULT_CHUNKS = 16  # chunks listed unless --chunks says otherwise (each costs a query per node)
MAX_CHUNKS = 4096  # --chunks above this is refused: a huge file is sampled, not dumped


def inode_object(path: str, inode: pb.Inode) -> dict[str, Any]:
    lay = inode.layout
    obj: dict[str, Any] = {
        "path": path,
        "inode": inode.ino,
        "type": pb.InodeType.Name(inode.type).lower(),
        "mode": f"{inode.mode:04o}",
        "uid": inode.uid,
        "gid": inode.gid,
        "nlink": inode.nlink,
        "size_bytes": inode.size,
        "chunk_size": lay.chunk_size,
        "stripe": lay.stripe,
        "chains": list(lay.chains),
    }
    if inode.type == pb.FILE and lay.chunk_size:
        obj["chunks_total"] = -(-inode.size // lay.chunk_size)
    return obj


async def chunk_rows(routing: Routing, inode: pb.Inode, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` chunks of ``inode``: chain and every replica's state."""
    lay = inode.layout
    total = -(-inode.size // lay.chunk_size) if lay.chunk_size and lay.chains else 0
    out = []
    for index in range(min(total, limit)):
        chain_id = lay.chains[index % len(lay.chains)]
        replicas = await query_chunk(routing, inode.ino, index, chain_id)
        out.append({"index": index, "chain_id": chain_id, "replicas": replicas})
    return out


def _replica_cell(r: dict[str, Any]) -> str:
    if not r["present"]:
        return f"{r['target_id']}({r['state']}, missing)"
    flags = " LOST" if r["lost"] else ""
    pending = f" pending v{r['pending_version']}" if r["pending_version"] else ""
    return (
        f"{r['target_id']}({r['state']} v{r['committed_version']} {r['length']} B{pending}{flags})"
    )


@admin.command("info")
@click.argument("file", metavar="PATH|INODE", type=InodeOrPath())
@click.option(
    "--chunks",
    "max_chunks",
    type=click.IntRange(0, MAX_CHUNKS),
    default=DEFAULT_CHUNKS,
    show_default=True,
    help="List at most this many chunks (the first ones).",
)
@admin_options
@async_command
async def info_cmd(file: int | str, max_chunks: int, address: str, as_json: bool) -> None:
    """Inode, layout and chunks (with every replica's state) of a file."""
    async with meta_client(address) as m:
        inode = await m.stat(file)
    path = file if isinstance(file, str) else f"inode {file}"
    obj = inode_object(path, inode)
    rows: list[dict[str, Any]] = []
    if inode.type == pb.FILE and max_chunks:
        async with MgmtClient(address) as mgmt:
            routing = await mgmt.get_routing()
            assert routing is not None, "known_version 0 always returns routing info"
            rows = await chunk_rows(routing, inode, max_chunks)
    obj["chunks_shown"] = len(rows)
    if as_json:
        emit_object({**obj, "chunks": rows}, True)
        return
    obj["chains"] = " ".join(map(str, obj["chains"]))
    emit_object(obj, False, title=f"{path}")
    if rows:
        table = [
            {**r, "replicas": "  ".join(_replica_cell(x) for x in r["replicas"])} for r in rows
        ]
        emit(table, ["index", "chain_id", "replicas"], False, title="chunks (head first)")
