"""`chainfs fsck [--json] [--repair] [--verify-data [--rate B]]`: check that namespace,
chunks and their bytes agree.

Walks the namespace (meta) and streams every chain replica's chunk metadata
(StorageControl.DumpChunkMeta, a page at a time, the replicas of a chain merged
in chunk order, so fsck's memory does not grow with what a target holds), then
reports:

- ``orphan_chunk``: a chunk whose inode no file has (an unlinked file whose
  chunks the meta GC has not removed yet shows up here too, until it does);
- ``missing_replica``: a chunk on some serving replicas of its chain, not all;
- ``divergent_replica``: serving replicas disagree (committed version, length
  or CRC32C);
- ``lost_chunks``: a non-empty file none of whose chunks exists anywhere.

``--verify-data`` also has every replica read its chunks and check the bytes
against their stored CRC32C where they lie (StorageControl.VerifyChunks; no
bytes cross the wire), at most ``--rate`` bytes/s over all nodes, with a
progress line on stderr:

- ``damaged_replica``: a replica whose bytes do not match their CRC32C;
- ``lost_chunk``: no replica of the chunk holds good bytes.

Chunks with a pending version (a write in flight) are skipped, not reported.

The healthy copy of a chunk is the one with the newest committed version
(versions only grow along a chain; among equals, the tail's: CRAQ's committed
truth). ``--repair``: orphan chunks are removed through their chain (all
replicas); a replica missing a chunk or diverging from the healthy copy gets
that one chunk copied from the healthy replica (StorageControl.RepairChunk on
its node: under its chunk lock, from a replica whose bytes match their CRC32C,
installed at the same version), nothing else on the target is touched and it
keeps serving; a damaged replica gets the chunk copied from a replica whose
bytes verified good at the same version. Lost chunks cannot be repaired; they
are only reported. Exit
status: 0 clean, 1 problems.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import click

from chainfs.cli.admin.common import emit
from chainfs.cli.options import token_options
from chainfs.common.errors import ChainfsError
from chainfs.common.routing import Routing
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.proto import meta_pb2 as mt
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp

Key = tuple[int, int]  # (inode, chunk index)
PAGE_CHUNKS = 4096  # chunk metadata entries fsck holds per replica (one DumpChunkMeta page)
VERIFY_BATCH_CHUNKS = 64  # chunks one round of VerifyChunks calls checks
VERIFY_BATCH_BYTES = 256 * 1024 * 1024  # ... or fewer, when their replicas hold this much
VERIFY_RATE_BYTES_PER_S = 128 * 1024 * 1024  # --rate default: a fraction of one disk
PROGRESS_TTY_S = 0.5  # redraw interval of the progress line on a terminal
PROGRESS_LOG_S = 10.0  # interval of progress lines when stderr is not a terminal


async def chunk_metas(
    node: mp.NodeInfo, target_id: int, timeout_s: float
) -> AsyncGenerator[sp.ChunkMeta, None]:
    """Every chunk's metadata on one target, in (inode, index) order, a page at a time:
    memory stays bounded whatever the target holds."""
    async with StorageControl(node.rpc_address, timeout_s) as control:
        async for meta in control.chunk_meta(target_id, page_chunks=PAGE_CHUNKS):
            yield meta


async def merged(
    streams: dict[int, AsyncIterator[sp.ChunkMeta]],
) -> AsyncIterator[tuple[Key, dict[int, sp.ChunkMeta | None]]]:
    """Merge the replicas' ordered chunk streams: each chunk once, with every replica's
    metadata of it (None where a replica lacks it)."""
    heads: dict[int, sp.ChunkMeta] = {}
    for t, it in streams.items():
        if (m := await anext(it, None)) is not None:
            heads[t] = m
    while heads:
        key = min((m.chunk.inode, m.chunk.index) for m in heads.values())
        metas: dict[int, sp.ChunkMeta | None] = dict.fromkeys(streams)
        for t, m in list(heads.items()):
            if (m.chunk.inode, m.chunk.index) != key:
                continue
            metas[t] = m
            if (nxt := await anext(streams[t], None)) is None:
                del heads[t]
            else:
                heads[t] = nxt
        yield key, metas


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


Problem = dict[str, Any]


@dataclass
class Findings:
    problems: list[Problem] = field(default_factory=list)
    repairs: list[tuple[Problem, ChunkRepair]] = field(default_factory=list)
    seen_inodes: set[int] = field(default_factory=set)  # inodes with a chunk somewhere


async def check(
    routing: Routing,
    files: dict[int, tuple[str, mt.Inode]],
    timeout_s: float,
    verifier: DataVerifier | None = None,
) -> Findings:
    """Compare every chain's replicas (and, with ``verifier``, their bytes)."""
    found = Findings()
    for cid, chain in sorted(routing.chains.items()):
        serving = [int(t) for t in chain.targets if routing.targets[t].public_state == mp.SERVING]
        if not serving:
            found.problems.append({"kind": "chain_not_serving", "chain_id": cid})
            continue
        streams = {t: chunk_metas(routing.node_of_target(t), t, timeout_s) for t in serving}
        try:
            async for key, metas in merged(dict(streams)):
                await check_chunk(found, cid, serving[-1], files, key, metas, verifier)
        finally:
            for it in streams.values():
                await it.aclose()
    if verifier is not None:
        await verifier.flush(found)
    for ino, (path, inode) in sorted(files.items()):
        if inode.size > 0 and ino not in found.seen_inodes:
            found.problems.append(
                {"kind": "lost_chunks", "inode": ino, "path": path, "size": inode.size}
            )
    return found


async def check_chunk(
    found: Findings,
    cid: int,
    tail: int,
    files: dict[int, tuple[str, mt.Inode]],
    key: Key,
    metas: dict[int, sp.ChunkMeta | None],
    verifier: DataVerifier | None,
) -> None:
    """The metadata checks of one chunk; then queue its replicas' bytes for verification."""
    if any(m is not None and m.pending_version for m in metas.values()):
        return  # a write in flight
    found.seen_inodes.add(key[0])
    if key[0] not in files:
        found.problems.append({"kind": "orphan_chunk", "chain_id": cid, "chunk": list(key)})
        return
    best = healthy_replica(metas, tail)
    assert best is not None  # the key came from some replica's dump
    ref = metas[best]
    assert ref is not None
    repaired: set[int] = set()
    for t, m in metas.items():
        if t == best or (m is not None and _sig(m) == _sig(ref)):
            continue
        p: Problem = {
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
        found.problems.append(p)
        found.repairs.append((p, ChunkRepair(cid, key, t, best)))
        repaired.add(t)
    if verifier is not None:
        await verifier.add(found, PendingChunk(cid, key, files[key[0]][0], metas, repaired))


@dataclass
class PendingChunk:
    """A chunk whose replicas' bytes are to be verified."""

    chain_id: int
    key: Key
    path: str
    metas: dict[int, sp.ChunkMeta | None]
    repaired: set[int]  # replicas already getting a copy (missing or divergent)


class DataVerifier:
    """``--verify-data``: every replica checks its chunks' bytes against their CRC32C
    in place (StorageControl.VerifyChunks), in batches paced to ``rate_bytes_per_s``."""

    def __init__(self, routing: Routing, rate_bytes_per_s: int, timeout_s: float) -> None:
        self.routing = routing
        self.rate = rate_bytes_per_s
        self.timeout_s = timeout_s
        self.batch: list[PendingChunk] = []
        self.batch_bytes = 0
        self.started = time.monotonic()
        self.checked_bytes = 0
        self.checked_chunks = 0
        self.damaged = 0
        self.progress = Progress()

    async def add(self, found: Findings, chunk: PendingChunk) -> None:
        self.batch.append(chunk)
        self.batch_bytes += sum(m.length for m in chunk.metas.values() if m is not None)
        if len(self.batch) >= VERIFY_BATCH_CHUNKS or self.batch_bytes >= VERIFY_BATCH_BYTES:
            await self.flush(found)

    async def flush(self, found: Findings) -> None:
        batch, self.batch, n, self.batch_bytes = self.batch, [], self.batch_bytes, 0
        if not batch:
            return
        await self._pace(n)
        per_target: dict[int, list[Key]] = {}
        for c in batch:
            for t, m in c.metas.items():
                if m is not None:
                    per_target.setdefault(t, []).append(c.key)
        replies = await asyncio.gather(*(self._verify(t, keys) for t, keys in per_target.items()))
        verdicts = {(t, (r.chunk.inode, r.chunk.index)): r for rsp in replies for t, r in rsp}
        for c in batch:
            self._judge(found, c, {t: verdicts.get((t, c.key)) for t in c.metas})
        self.checked_bytes += n
        self.checked_chunks += len(batch)
        self.progress.show(self.line())

    def line(self) -> str:
        elapsed_s = max(time.monotonic() - self.started, 1e-9)
        mib = self.checked_bytes / 2**20
        return (
            f"verify-data: {self.checked_chunks} chunks, {mib:.1f} MiB checked "
            f"({mib / elapsed_s:.1f} MiB/s), {self.damaged} damaged replicas"
        )

    async def _pace(self, n: int) -> None:
        """Keep the bytes asked for since the start at or under the rate."""
        ahead_s = (self.checked_bytes + n) / self.rate - (time.monotonic() - self.started)
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)

    async def _verify(
        self, target_id: int, keys: list[Key]
    ) -> list[tuple[int, sp.ChunkVerification]]:
        node = self.routing.node_of_target(target_id)
        async with StorageControl(node.rpc_address, self.timeout_s) as control:
            rsp = await control.verify_chunks(target_id, keys)
        return [(target_id, r) for r in rsp.results]

    def _judge(
        self, found: Findings, c: PendingChunk, got: dict[int, sp.ChunkVerification | None]
    ) -> None:
        """Damaged replicas of one chunk: repairable from a good one at the same version,
        or the chunk is lost (no replica's bytes are good)."""
        # A replica whose record changed since the dump is not judged (a write came).
        same = {
            t: v
            for t, v in got.items()
            if v is not None and (m := c.metas[t]) is not None and _sig(v.meta) == _sig(m)
        }
        good = [t for t, v in same.items() if v.verdict == sp.VERDICT_OK]
        damaged = [t for t, v in same.items() if v.verdict == sp.VERDICT_DAMAGED]
        self.damaged += len(damaged)
        where = {"chain_id": c.chain_id, "chunk": list(c.key), "path": c.path}
        if damaged and not good:
            found.problems.append({"kind": "lost_chunk", **where, "damaged_targets": damaged})
            return
        for t in damaged:
            p: Problem = {"kind": "damaged_replica", **where, "target_id": t}
            found.problems.append(p)
            if t in c.repaired:
                continue  # the missing/divergent repair replaces it already
            source = [g for g in good if _sig(same[g].meta) == _sig(same[t].meta)]
            if source:
                found.repairs.append((p, ChunkRepair(c.chain_id, c.key, t, source[0])))
            else:
                p["repair"] = "not possible: no good replica holds the same version"


class Progress:
    """One progress line on stderr: redrawn on a terminal, else at most one a few seconds."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, line: str, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (PROGRESS_TTY_S if self.tty else PROGRESS_LOG_S):
            return
        self.last = now
        end = "\n" if final or not self.tty else ""
        sys.stderr.write(("\r" if self.tty else "") + line + end)
        sys.stderr.flush()


async def repair_chunk(routing: Routing, r: ChunkRepair, timeout_s: float) -> sp.RepairChunkRsp:
    """Have the node of ``r.target_id`` copy the one chunk from the healthy replica."""
    node = routing.node_of_target(r.target_id)
    async with StorageControl(node.rpc_address, timeout_s) as control:
        return await control.repair_chunk(r.target_id, r.key[0], r.key[1], r.healthy)


async def run_fsck(
    address: str, repair: bool, timeout_s: float, verify_rate: int = 0
) -> list[Problem]:
    """Check (and with ``repair`` fix); ``verify_rate`` > 0: verify data at that rate."""
    from chainfs.client.aio_fs import AsyncFileSystem

    afs = await AsyncFileSystem.connect(address)
    try:
        meta = afs.io.meta  # the namespace and data-plane clients of the connection
        storage = afs.io.storage
        routing = await storage.routing.refresh()
        files = await walk(meta)
        verifier = DataVerifier(routing, verify_rate, timeout_s) if verify_rate > 0 else None
        found = await check(routing, files, timeout_s, verifier)
        if verifier is not None:
            verifier.progress.show(verifier.line(), final=True)
        if repair:
            for p in found.problems:
                if p["kind"] == "orphan_chunk":
                    ino, idx = p["chunk"]
                    await storage.remove_chunks(p["chain_id"], ino, idx, idx + 1)
                    p["repair"] = "removed"
            for p, r in found.repairs:
                await repair_one(routing, p, r, timeout_s)
        return found.problems
    finally:
        await afs.close()


async def repair_one(routing: Routing, p: Problem, r: ChunkRepair, timeout_s: float) -> None:
    """Copy one chunk onto one replica; the outcome goes into the problem ``p``."""
    try:
        rsp = await repair_chunk(routing, r, timeout_s)
    except ChainfsError as e:
        p["repair"] = f"failed: {e}"
        return
    p["bytes_copied"] = rsp.bytes_copied
    p["repair"] = (
        f"copied from target {rsp.from_target}" if rsp.copied else f"nothing copied: {rsp.reason}"
    )


@click.command("fsck")
@token_options
@click.option("--address", envvar="CHAINFS_ADDRESS", required=True, help="mgmtd host:port")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--repair", is_flag=True, help="Fix what can be fixed (see the docs above).")
@click.option(
    "--verify-data",
    is_flag=True,
    help="Also check every replica's bytes against their CRC32C (on the storage nodes).",
)
@click.option(
    "--rate",
    "rate_bytes_per_s",
    type=click.IntRange(min=1),
    default=VERIFY_RATE_BYTES_PER_S,
    show_default=True,
    help="--verify-data: bytes per second read on the storage nodes, all together.",
)
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True)
def fsck(
    address: str,
    as_json: bool,
    repair: bool,
    verify_data: bool,
    rate_bytes_per_s: int,
    timeout_s: float,
) -> None:
    """Check namespace and chunk replicas agree; --repair fixes orphans and replicas."""
    given = click.get_current_context().get_parameter_source("rate_bytes_per_s")
    if not verify_data and given == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--rate paces --verify-data; give both or neither")
    rate = rate_bytes_per_s if verify_data else 0
    try:
        problems = asyncio.run(run_fsck(address, repair, timeout_s, rate))
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
