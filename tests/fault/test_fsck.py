"""`chainfs fsck` against a real cluster: clean, orphan chunks (repaired), lost chunks,
a divergent replica, a missing replica (repaired by copying that one chunk)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chainfs.cli.fsck import chunk_metas
from chainfs.common.checksum import crc32c
from chainfs.common.dataplane.client import DataClient
from chainfs.common.routing import data_address
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import StorageClient
from chainfs.local import LocalCluster
from chainfs.proto import common_pb2 as cp
from chainfs.proto import storage_pb2 as sp
from tests.fault import faultlib as fl
from tests.fault.test_storage_faults import _cluster

CHUNK = 4 * 1024 * 1024


def fsck(address: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    out = subprocess.run(
        [sys.executable, "-m", "chainfs", "fsck", "--address", address, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (0, 1), out.stderr
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


async def _storage(c: LocalCluster, fn: Any) -> Any:
    """``fn(client, routing)`` with a StorageClient acting as one of ``c``'s nodes."""
    mgmt = MgmtClient([c.address])
    routing = RoutingCache(mgmt)
    r = await routing.refresh()
    client = StorageClient(
        routing, b"fsck-test", credential=fl.node_credential_of(c.secret_file, r)
    )
    try:
        return await fn(client, r)
    finally:
        await client.close()
        await mgmt.close()


@pytest.mark.timeout(120)
def test_fsck_finds_and_repairs(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        fs = c.client()
        rng = random.Random(9)
        for i in range(6):
            fs.write_file(f"/f{i}", rng.randbytes(200_000))
        code, problems = fsck(c.address)
        assert (code, problems) == (0, [])

        lost_ino = fs.stat("/f1").st_ino
        div_ino = fs.stat("/f2").st_ino
        orphan_ino = 1 << 60

        async def damage(client: StorageClient, routing: Any) -> None:
            cid = min(routing.chains)
            await client.write(cid, orphan_ino, 0, 0, b"orphan", CHUNK)
            for chain in routing.chains.values():
                await client.remove_chunks(chain.chain_id, lost_ino)
            # A forwarded full-chunk update sent to one tail only: that replica diverges.
            for chain in routing.chains.values():
                tail = chain.targets[-1]
                node = routing.node_of_target(tail)
                metas = [m async for m in chunk_metas(node, tail, 10)]
                meta = next(
                    (m for m in metas if (m.chunk.inode, m.chunk.index) == (div_ino, 0)), None
                )
                if meta is None:
                    continue
                data = b"diverged"
                req = sp.UpdateReq(
                    req=cp.RequestInfo(client_id=b"fsck-test", request_id=1),
                    chain_id=chain.chain_id,
                    chain_version=chain.chain_version,
                    target_id=tail,
                    from_target=chain.targets[-2],
                    chunk=sp.ChunkId(inode=div_ino, index=0),
                    type=sp.WRITE,
                    length=len(data),
                    crc32c=crc32c(data),
                    chunk_size=CHUNK,
                    update_version=meta.committed_version + 1,
                    full_chunk=True,
                )
                # Sent as the predecessor's node: the tail takes forwards from it only.
                dc = DataClient(
                    credential=fl.node_credential_of_target(
                        c.secret_file, routing, chain.targets[-2]
                    )
                )
                try:
                    await dc.request(
                        data_address(routing.node_of_target(tail)),
                        sp.UPDATE,
                        req.SerializeToString(),
                        payload=[memoryview(data)],
                        timeout_s=10,
                    )
                finally:
                    await dc.close()

        asyncio.run(_storage(c, damage))
        code, problems = fsck(c.address)
        kinds = {(p["kind"], p.get("path") or tuple(p.get("chunk", ()))) for p in problems}
        assert code == 1
        assert ("orphan_chunk", (orphan_ino, 0)) in kinds
        assert ("lost_chunks", "/f1") in kinds
        assert ("divergent_replica", "/f2") in kinds

        code, problems = fsck(c.address, "--repair")
        assert any(p.get("repair") == "removed" for p in problems)
        # The divergent chunk was copied from the newest replica (the tail's v+1) onto
        # the two others, 8 bytes each; no target went offline or resynced.
        copies = [p for p in problems if p["kind"] == "divergent_replica"]
        assert len(copies) == 2, copies
        assert all(p["repair"].startswith("copied from target") for p in copies)
        assert all(p["bytes_copied"] == len(b"diverged") for p in copies)
        assert fl.all_serving(c.address)
        assert sorted({p["kind"] for p in fsck(c.address)[1]}) == ["lost_chunks"]
        assert fl.replica_differences(c.address) == []


def _target_files(tdir: str) -> dict[str, tuple[int, int]]:
    """Every chunk file of a target directory -> (inode number, mtime ns)."""
    out = {}
    for p in sorted(Path(tdir, "data").rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p)] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.mark.timeout(120)
def test_fsck_repair_copies_only_the_missing_chunk(tmp_path: Path) -> None:
    """One replica loses one chunk: --repair copies that chunk (and nothing else)
    from a healthy replica; the target keeps serving, no resync runs."""
    with _cluster(tmp_path) as c:
        fs = c.client()
        rng = random.Random(21)
        files = {f"/g{i}": rng.randbytes(2 * CHUNK + 1000) for i in range(3)}
        for p, d in files.items():
            fs.write_file(p, d)
        ino = fs.stat("/g1").st_ino
        r = fl.routing(c.address)
        chain = next(
            ch
            for ch in r.chains.values()
            if (ino, 1) in fl.dump_target(r.node_of_target(ch.targets[-1]), ch.targets[-1])
        )
        tail = int(chain.targets[-1])
        node = r.node_of_target(tail)
        proc = next(p for p in c.storage if p.info and p.info.get("node_id") == node.node_id)
        tdir = proc.info["targets"][str(tail)]
        want = fl.dump_target(node, tail)[(ino, 1)]

        async def drop(client: StorageClient, routing: Any) -> None:
            # A forwarded remove sent to the tail only: that replica loses chunk 1.
            req = sp.RemoveChunksReq(
                chain_id=chain.chain_id,
                chain_version=chain.chain_version,
                target_id=tail,
                from_target=chain.targets[-2],
                inode=ino,
                begin_index=1,
                end_index=2,
                indexes=[1],
            )
            dc = DataClient(
                credential=fl.node_credential_of_target(c.secret_file, routing, chain.targets[-2])
            )
            try:
                await dc.request(
                    data_address(node), sp.REMOVE_CHUNKS, req.SerializeToString(), timeout_s=10
                )
            finally:
                await dc.close()

        asyncio.run(_storage(c, drop))
        assert (ino, 1) not in fl.dump_target(node, tail)
        before = _target_files(tdir)
        code, problems = fsck(c.address)
        assert code == 1
        assert [(p["kind"], p["target_id"], p["chunk"]) for p in problems] == [
            ("missing_replica", tail, [ino, 1])
        ]

        code, problems = fsck(c.address, "--repair")
        assert len(problems) == 1
        assert problems[0]["repair"].startswith("copied from target")
        assert problems[0]["bytes_copied"] == want.length == CHUNK
        # Exactly one new chunk file on the repaired target; every other one untouched.
        after = _target_files(tdir)
        added = set(after) - set(before)
        assert len(added) == 1 and set(before) <= set(after), added
        assert all(after[f] == before[f] for f in before)
        got = fl.dump_target(node, tail)[(ino, 1)]
        assert (got.committed_version, got.length, got.crc32c) == (
            want.committed_version,
            want.length,
            want.crc32c,
        )
        # Nobody went offline and no resync ran; the replicas are byte-identical.
        assert fl.all_serving(c.address)
        for p in c.storage:
            assert " resync " not in p.log_path.read_text(), p.tail_log()
        assert fl.replica_differences(c.address) == []
        assert fsck(c.address) == (0, [])
        for p, d in files.items():
            assert fs.read_file(p) == d
