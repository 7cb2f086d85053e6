"""`chainfs fsck [--json] [--repair]`: check that namespace and chunks agree.

Walks the namespace (meta) and dumps every chain replica's chunk metadata
(StorageControl.DumpChunkMeta), then reports:

- ``orphan_chunk``: a chunk whose inode no file has (an unlinked file whose
  chunks the meta GC has not removed yet shows up here too, until it does);
- ``missing_replica``: a chunk on some serving replicas of its chain, not all;
- ``divergent_replica``: serving replicas disagree (committed version, length
  or CRC32C);
- ``lost_chunks``: a non-empty file none of whose chunks exists anywhere.

Chunks with a pending version (a write in flight) are skipped, not reported.

The healthy copy of a chunk is the one with the newest committed version
(versions only grow along a chain; among equals, the tail's: CRAQ's committed
truth). ``--repair``: orphan chunks are removed through their chain (all
replicas); a replica missing a chunk or diverging from the healthy copy gets
that one chunk copied from the healthy replica (StorageControl.RepairChunk on
its node: under its chunk lock, from a replica whose bytes match their CRC32C,
installed at the same version), nothing else on the target is touched and it
keeps serving. Lost chunks cannot be repaired; they are only reported. Exit
status: 0 clean, 1 problems.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

import click

from chainfs.cli.admin.common import emit
from chainfs.common.errors import ChainfsError
from chainfs.common.routing import Routing
from chainfs.common.rpc import grpc_util
from chainfs.proto import meta_pb2 as mt
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.proto import storage_pb2_grpc as sg

Key = tuple[int, int]  # (inode, chunk index)


async def dump_target(node: mp.NodeInfo, target_id: int, timeout_s: float) -> dict[Key, Any]:
    out: dict[Key, Any] = {}
    ch = grpc_util.channel(node.rpc_address)
    try:
        stub = sg.StorageControlStub(ch)
        after = b""
        while True:
            rsp = await grpc_util.call(
                stub.DumpChunkMeta,
                sp.DumpChunkMetaReq(target_id=target_id, start_after=after),
                timeout_s=timeout_s,
                target=node.rpc_address,
            )
            for m in rsp.chunks:
                out[(m.chunk.inode, m.chunk.index)] = m
            if not rsp.next:
                return out
            after = rsp.next
    finally:
        await ch.close()


async def walk(meta: Any, root: str = "/") -> dict[int, tuple[str, mt.Inode]]:
    """Every file inode reachable from ``root`` -> (one path, inode)."""
    files: dict[int, tuple[str, mt.Inode]] = {}
    todo = [root]
    while todo:
        d = todo.pop()
        async for e in meta.iterdir(d, with_attrs=True):
            name = e.name.decode(errors="surrogateescape")
            path = d.rstrip("/") + "/" + name
            if e.inode.type == mt.DIRECTORY:
                todo.append(path)
            elif e.inode.type == mt.FILE:
                files.setdefault(e.inode.ino, (path, e.inode))
    return files


def _sig(m: Any) -> tuple[int, int, int]:
    return (m.committed_version, m.length, m.crc32c)


@dataclass(frozen=True)
class ChunkRepair:
    """Copy chunk ``key`` of chain ``chain_id`` onto ``target_id`` from ``healthy``."""

    chain_id: int
    key: Key
    target_id: int
    healthy: int


def healthy_replica(metas: dict[int, Any], tail: int) -> int | None:
    """The replica holding the newest committed version (the tail among equals)."""
    present = [(m.committed_version, t == tail, t) for t, m in metas.items() if m is not None]
    return max(present)[2] if present else None


async def check(
    routing: Routing, files: dict[int, tuple[str, mt.Inode]], timeout_s: float
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], ChunkRepair]]]:
    """(problems, (problem, the chunk copy that repairs it))."""
    problems: list[dict[str, Any]] = []
    repairs: list[tuple[dict[str, Any], ChunkRepair]] = []
    seen_inodes: set[int] = set()
    for cid, chain in sorted(routing.chains.items()):
        serving = [int(t) for t in chain.targets if routing.targets[t].public_state == mp.SERVING]
        if not serving:
            problems.append({"kind": "chain_not_serving", "chain_id": cid})
            continue
        dumps = await asyncio.gather(
            *(dump_target(routing.node_of_target(t), t, timeout_s) for t in serving)
        )
        by_target = dict(zip(serving, dumps, strict=True))
        tail = serving[-1]
        keys = set().union(*(d.keys() for d in dumps))
        for key in sorted(keys):
            metas = {t: d.get(key) for t, d in by_target.items()}
            if any(m is not None and m.pending_version for m in metas.values()):
                continue  # a write in flight
            seen_inodes.add(key[0])
            if key[0] not in files:
                problems.append({"kind": "orphan_chunk", "chain_id": cid, "chunk": list(key)})
                continue
            best = healthy_replica(metas, tail)
            assert best is not None  # the key came from some replica's dump
            ref = metas[best]
            for t, m in metas.items():
                if t == best or (m is not None and _sig(m) == _sig(ref)):
                    continue
                p: dict[str, Any] = {
                    "kind": "missing_replica" if m is None else "divergent_replica",
                    "chain_id": cid,
                    "chunk": list(key),
                    "target_id": t,
                    "path": files[key[0]][0],
                    "healthy_target": best,
                    "healthy": list(_sig(ref)),
                }
                if m is not None:
                    p["replica"] = list(_sig(m))
                problems.append(p)
                repairs.append((p, ChunkRepair(cid, key, t, best)))
    for ino, (path, inode) in sorted(files.items()):
        if inode.size > 0 and ino not in seen_inodes:
            problems.append({"kind": "lost_chunks", "inode": ino, "path": path, "size": inode.size})
    return problems, repairs


async def repair_chunk(routing: Routing, r: ChunkRepair, timeout_s: float) -> sp.RepairChunkRsp:
    """Have the node of ``r.target_id`` copy the one chunk from the healthy replica."""
    node = routing.node_of_target(r.target_id)
    ch = grpc_util.channel(node.rpc_address)
    try:
        stub = sg.StorageControlStub(ch)
        rsp: sp.RepairChunkRsp = await grpc_util.call(
            stub.RepairChunk,
            sp.RepairChunkReq(
                target_id=r.target_id,
                chunk=sp.ChunkId(inode=r.key[0], index=r.key[1]),
                prefer_target=r.healthy,
            ),
            timeout_s=timeout_s,
            target=node.rpc_address,
        )
        return rsp
    finally:
        await ch.close()


async def run_fsck(address: str, repair: bool, timeout_s: float) -> list[dict[str, Any]]:
    from chainfs.client.aio_fs import AsyncFileSystem

    afs = await AsyncFileSystem.connect(address)
    try:
        meta = afs.io.meta  # the namespace and data-plane clients of the connection
        storage = afs.io.storage
        routing = await storage.routing.refresh()
        files = await walk(meta)
        problems, repairs = await check(routing, files, timeout_s)
        if repair:
            for p in problems:
                if p["kind"] == "orphan_chunk":
                    ino, idx = p["chunk"]
                    await storage.remove_chunks(p["chain_id"], ino, idx, idx + 1)
                    p["repair"] = "removed"
            for p, r in repairs:
                try:
                    rsp = await repair_chunk(routing, r, timeout_s)
                except ChainfsError as e:
                    p["repair"] = f"failed: {e}"
                    continue
                p["bytes_copied"] = rsp.bytes_copied
                p["repair"] = (
                    f"copied from target {rsp.from_target}"
                    if rsp.copied
                    else f"nothing copied: {rsp.reason}"
                )
        return problems
    finally:
        await afs.close()


@click.command("fsck")
@click.option("--address", envvar="CHAINFS_ADDRESS", required=True, help="mgmtd host:port")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--repair", is_flag=True, help="Fix what can be fixed (see the docs above).")
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True)
def fsck(address: str, as_json: bool, repair: bool, timeout_s: float) -> None:
    """Check namespace and chunk replicas agree; --repair fixes orphans and replicas."""
    try:
        problems = asyncio.run(run_fsck(address, repair, timeout_s))
    except (ChainfsError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        json.dump(problems, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        emit(
            [{**p, "where": p.get("path") or p.get("chunk")} for p in problems],
            ["kind", "chain_id", "target_id", "where", "repair"],
            False,
            title=f"fsck: {len(problems)} problem(s)",
        )
    sys.exit(1 if problems else 0)
