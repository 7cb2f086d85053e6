"""`chainfs admin query-chunk` and `dump-chunkmeta`: chunk metadata on storage targets."""

from __future__ import annotations

import stat
from typing import Any

import click

from chainfs.cli.admin.common import admin, admin_options, async_command, emit
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp

CALL_TIMEOUT_S = 10.0
REPLICA_COLUMNS = (
    "target_id",
    "node_id",
    "chain_id",
    "state",
    "committed_version",
    "pending_version",
    "length",
    "crc32c",
    "chain_version",
    "lost",
)


def _state_name(state: int) -> str:
    return mp.PublicTargetState.Name(state).lower()  # type: ignore[arg-type]


def meta_row(meta: sp.ChunkMeta) -> dict[str, Any]:
    return {
        "inode": meta.chunk.inode,
        "index": meta.chunk.index,
        "committed_version": meta.committed_version,
        "pending_version": meta.pending_version,
        "length": meta.length,
        "crc32c": f"{meta.crc32c:08x}",
        "chain_version": meta.chain_version,
        "chunk_size": meta.chunk_size,
        "pending_remove": meta.pending_remove,
    }


async def query_chunk(
    routing: Routing, inode: int, index: int, chain_id: int = 0
) -> list[dict[str, Any]]:
    """Every replica's metadata of chunk (inode, index), from every storage node.

    Replicas of the chains that hold the chunk but lack it are listed with
    ``committed_version`` 0 and ``present`` false.
    """
    rows: dict[int, dict[str, Any]] = {}
    errors: list[str] = []
    for node in routing.nodes_of_type(mp.STORAGE, online_only=False):
        if not node.rpc_address:
            continue
        try:
            async with StorageControl(node.rpc_address, CALL_TIMEOUT_S) as control:
                rsp = await control.query_chunk(inode, index, chain_id)
        except ChainfsError as e:
            errors.append(f"node {node.node_id}: {e}")
            continue
        for r in rsp.replicas:
            rows[r.target_id] = _row(routing, r.target_id, r.chain_id, r.meta, True, r.lost)
    chains = {r["chain_id"] for r in rows.values() if r["chain_id"]}
    for cid in chains:
        chain = routing.chains.get(cid)
        for tid in chain.targets if chain else ():
            if tid not in rows:
                rows[tid] = _row(routing, tid, cid, sp.ChunkMeta(), False)
    if not rows and errors:
        raise ChainfsError(Code.UNAVAILABLE, "; ".join(errors))
    order = {tid: k for cid in sorted(chains) for k, tid in enumerate(routing.chains[cid].targets)}
    return sorted(rows.values(), key=lambda r: (r["chain_id"], order.get(r["target_id"], 99)))


def _row(
    routing: Routing,
    target_id: int,
    chain_id: int,
    meta: sp.ChunkMeta,
    present: bool,
    lost: bool = False,
) -> dict[str, Any]:
    t = routing.targets.get(target_id)
    return {
        "target_id": target_id,
        "node_id": t.node_id if t else 0,
        "chain_id": chain_id,
        "state": _state_name(t.public_state) if t else "unknown",
        "present": present,
        "committed_version": meta.committed_version,
        "pending_version": meta.pending_version,
        "length": meta.length,
        "crc32c": meta.crc32c,
        "chain_version": meta.chain_version,
        "lost": lost,  # damaged, and no replica held a good copy at the last repair try
    }


async def dump_chunkmeta(routing: Routing, target_id: int, limit: int = 0) -> list[sp.ChunkMeta]:
    """All chunk metadata of one target (paged from its storage node)."""
    t = routing.targets.get(target_id)
    if t is None:
        raise ChainfsError(Code.UNKNOWN_TARGET, f"no target {target_id}")
    node = routing.nodes[t.node_id]
    out: list[sp.ChunkMeta] = []
    async with StorageControl(node.rpc_address, CALL_TIMEOUT_S) as control:
        async for meta in control.chunk_meta(target_id):
            out.append(meta)
            if limit and len(out) >= limit:
                break
    return out


class InodeOrPath(click.ParamType):
    """An inode number, or an absolute path that the client resolves to one."""

    name = "PATH|INODE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or str(value).startswith("/"):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither an absolute path nor an inode number", param, ctx)


async def inode_of(address: str, file: int | str) -> int:
    """The inode number of ``file``: itself if a number, else its path's st_ino."""
    if isinstance(file, int):
        return file
    from chainfs import aio

    try:
        async with await aio.connect(address) as fs:
            st = await fs.stat(file)
    except FileNotFoundError:
        raise ChainfsError(Code.ENOENT, "no such file or directory", file) from None
    except OSError as e:
        raise click.ClickException(f"cannot resolve {file}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ChainfsError(Code.EISDIR, "a directory has no chunks", file)
    return st.st_ino


@admin.command("query-chunk")
@click.argument("file", metavar="PATH|INODE", type=InodeOrPath())
@click.argument("index", type=int)
@click.option("--chain", "chain_id", type=int, default=0, help="Only this chain.")
@admin_options
@async_command
async def query_chunk_cmd(
    file: int | str, index: int, chain_id: int, address: str, as_json: bool
) -> None:
    """Every replica's metadata of chunk INDEX of a file (its absolute PATH or its INODE)."""
    inode = await inode_of(address, file)
    async with MgmtClient(address) as mgmt:
        routing = await mgmt.get_routing()
        assert routing is not None
        rows = await query_chunk(routing, inode, index, chain_id)
    if not rows:
        raise ChainfsError(Code.CHUNK_NOT_FOUND, f"chunk ({inode}, {index}) is on no target")
    if not as_json:
        for r in rows:
            r["crc32c"] = f"{r['crc32c']:08x}"
    emit(rows, REPLICA_COLUMNS, as_json, title=f"chunk ({inode}, {index})")


@admin.command("dump-chunkmeta")
@click.argument("target", type=int)
@click.option("--limit", type=int, default=0, help="At most this many chunks (0 = all).")
@admin_options
@async_command
async def dump_chunkmeta_cmd(target: int, limit: int, address: str, as_json: bool) -> None:
    """Metadata of every chunk on storage target TARGET."""
    async with MgmtClient(address) as mgmt:
        routing = await mgmt.get_routing()
        assert routing is not None
        metas = await dump_chunkmeta(routing, target, limit)
    rows = [meta_row(m) for m in metas]
    emit(
        rows,
        (
            "inode",
            "index",
            "committed_version",
            "pending_version",
            "length",
            "crc32c",
            "chain_version",
            "chunk_size",
        ),
        as_json,
        title=f"target {target}: {len(rows)} chunks",
    )
