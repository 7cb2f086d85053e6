"""Capabilities and node credentials on the storage data plane, against a live cluster.

Storage serves a client's request about a file's chunks only with a capability
meta signed for that inode and access; chain forwards only from the chain
predecessor's node; chunk listings, sync reports and StorageControl only to
nodes (and admins). Each refusal must change nothing: the bytes read back and
every replica's committed version and CRC stay those of the real write.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import chainfs.aio
from chainfs.client.caps import CapabilityCache
from chainfs.client.layout import layout_of
from chainfs.common.auth import capability
from chainfs.common.auth.capability import CLOCK_SKEW_MS, READ, WRITE
from chainfs.common.auth.policy import POLICY
from chainfs.common.auth.secret import capability_key, load_secret, node_credential
from chainfs.common.checksum import crc32c
from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.local import LocalCluster
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import storage_pb2 as sp
from tests.integration.client_fixtures import module_cluster, pattern

pytestmark = pytest.mark.timeout(180)

DATA = pattern(64 * 1024, "capabilities")
CLIENT_ID = os.urandom(16)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(
        tmp_path_factory, "caps", storage_nodes=3, targets_per_node=1, replicas=3
    )


@dataclass
class File:
    """A file written through the client, and where its chunk 0 lives."""

    path: str
    inode: int
    chain_id: int
    chain_version: int
    targets: list[int]  # chain order: head first
    chunk_size: int
    routing: Routing


async def _routing(cluster: LocalCluster) -> Routing:
    async with MgmtClient(cluster.address) as mgmt:
        r = await mgmt.get_routing()
        assert r is not None
        return r


async def _write_file(cluster: LocalCluster, path: str) -> File:
    fs = await chainfs.aio.connect(cluster.address)
    try:
        async with await fs.open(path, "wb") as f:
            await f.write(DATA)
        inode = await fs.io.meta.stat(path)
    finally:
        await fs.close()
    layout = layout_of(inode)
    routing = await _routing(cluster)
    chain = routing.chains[layout.chains[0]]
    return File(
        path,
        inode.ino,
        chain.chain_id,
        chain.chain_version,
        list(chain.targets),
        layout.chunk_size,
        routing,
    )


@pytest.fixture
def file(cluster: LocalCluster, request: pytest.FixtureRequest) -> File:
    return asyncio.run(_write_file(cluster, f"/{request.node.name}"))


def _key(cluster: LocalCluster) -> bytes:
    return capability_key(load_secret(cluster.secret_file), 1)


def _sign(
    cluster: LocalCluster,
    inode: int,
    rights: int,
    client_id: bytes = CLIENT_ID,
    ttl_ms: int = 60_000,
) -> cpb.Capability:
    return capability.sign(_key(cluster), 1, inode, rights, client_id, ttl_ms)


def bad_caps(cluster: LocalCluster, f: File, rights: int) -> dict[str, cpb.Capability | None]:
    """Every way a capability can be wrong for ``rights`` on ``f``."""
    forged = _sign(cluster, f.inode, READ | WRITE)
    forged.mac = bytes(32)
    wrong_key = capability.sign(os.urandom(32), 1, f.inode, READ | WRITE, CLIENT_ID, 60_000)
    expired = _sign(cluster, f.inode, rights, ttl_ms=-(CLOCK_SKEW_MS + 60_000))
    out: dict[str, cpb.Capability | None] = {
        "missing": None,
        "forged": forged,
        "signed with another key": wrong_key,
        "expired": expired,
        "for another inode": _sign(cluster, f.inode + 1_000_000, READ | WRITE),
    }
    if rights == WRITE:
        out["read-only"] = _sign(cluster, f.inode, READ)
        out["issued to another client"] = _sign(cluster, f.inode, WRITE, os.urandom(16))
    return out


async def _send(
    f: File,
    target_id: int,
    msg_type: int,
    header: Any,
    payload: bytes = b"",
    credential: cpb.Credential | None = None,
) -> Any:
    dp = DataClient(credential=credential)
    try:
        address = f.routing.node_of_target(target_id).data_address
        return await dp.request(
            address,
            msg_type,
            header.SerializeToString(),
            payload=[memoryview(payload)] if payload else [],
        )
    finally:
        await dp.close()


def _update(f: File, cap: cpb.Capability | None, data: bytes, **extra: Any) -> sp.UpdateReq:
    req = sp.UpdateReq(
        req=cpb.RequestInfo(client_id=CLIENT_ID, request_id=int.from_bytes(os.urandom(6))),
        chain_id=f.chain_id,
        chain_version=f.chain_version,
        target_id=f.targets[0],
        chunk=sp.ChunkId(inode=f.inode, index=0),
        type=sp.WRITE,
        offset=0,
        length=len(data),
        crc32c=crc32c(data),
        chunk_size=f.chunk_size,
        **extra,
    )
    if cap is not None:
        req.capability.CopyFrom(cap)
    return req


def _read(f: File, target_id: int, caps: list[cpb.Capability]) -> sp.BatchReadReq:
    return sp.BatchReadReq(
        ios=[
            sp.ReadIO(
                chain_id=f.chain_id,
                target_id=target_id,
                chunk=sp.ChunkId(inode=f.inode, index=0),
                offset=0,
                length=len(DATA),
            )
        ],
        capabilities=caps,
    )


def _query(f: File, cap: cpb.Capability | None) -> sp.QueryLastChunkReq:
    req = sp.QueryLastChunkReq(chain_id=f.chain_id, target_id=f.targets[-1], inode=f.inode)
    if cap is not None:
        req.capability.CopyFrom(cap)
    return req


def _remove(f: File, cap: cpb.Capability | None) -> sp.RemoveChunksReq:
    req = sp.RemoveChunksReq(
        req=cpb.RequestInfo(client_id=CLIENT_ID, request_id=int.from_bytes(os.urandom(6))),
        chain_id=f.chain_id,
        chain_version=f.chain_version,
        target_id=f.targets[0],
        inode=f.inode,
        begin_index=0,
        end_index=1 << 32,
    )
    if cap is not None:
        req.capability.CopyFrom(cap)
    return req


def _refused(coro: Any, code: int = Code.BAD_CAPABILITY) -> ChainfsError:
    with pytest.raises(ChainfsError) as e:
        asyncio.run(coro)
    assert e.value.code == code, e.value
    return e.value


async def _replicas(cluster: LocalCluster, f: File) -> dict[int, tuple[int, int, int, int]]:
    """target -> (committed version, pending version, length, crc32c) of chunk 0."""
    out = {}
    for tid in f.targets:
        node = f.routing.node_of_target(tid)
        cred = node_credential(load_secret(cluster.secret_file), node.node_id)
        async with StorageControl(node.rpc_address, 10, cred) as control:
            rsp = await control.query_chunk(f.inode, 0, f.chain_id)
        for r in rsp.replicas:
            if r.target_id == tid:
                m = r.meta
                out[tid] = (m.committed_version, m.pending_version, m.length, m.crc32c)
    return out


def assert_unchanged(cluster: LocalCluster, f: File, version: int = 1) -> None:
    """The bytes read back are the real ones, and every replica holds them
    committed at ``version``."""
    fs = cluster.client()
    with fs.open(f.path, "rb") as r:
        assert r.read() == DATA
    reps = asyncio.run(_replicas(cluster, f))
    assert set(reps) == set(f.targets), reps
    assert set(reps.values()) == {(version, 0, len(DATA), crc32c(DATA))}, reps


# -- the policy table ------------------------------------------------------------------


def test_every_storage_message_and_control_rpc_is_classified() -> None:
    names = [n for n, _ in sp.MsgType.items() if n != "MSG_TYPE_UNSPECIFIED"]
    assert names, "storage.proto lists no message types"
    missing = [n for n in names if f"storage.MsgType/{n}" not in POLICY]
    assert not missing, f"storage message types absent from the access policy: {missing}"
    service = sp.DESCRIPTOR.services_by_name["StorageControl"]
    rpcs = [f"{service.full_name}/{m.name}" for m in service.methods]
    assert [r for r in rpcs if r not in POLICY] == []


# -- client requests need the right capability -------------------------------------------


def test_valid_capabilities_are_served(cluster: LocalCluster, file: File) -> None:
    """The positive control: the same requests with a good capability work."""
    f = file
    rsp = asyncio.run(
        _send(f, f.targets[-1], sp.QUERY_LAST_CHUNK, _query(f, _sign(cluster, f.inode, READ)))
    )
    got = sp.QueryLastChunkRsp.FromString(bytes(rsp.header))
    assert (got.found, got.index, got.length) == (True, 0, len(DATA))
    rsp = asyncio.run(
        _send(
            f,
            f.targets[-1],
            sp.BATCH_READ,
            _read(f, f.targets[-1], [_sign(cluster, f.inode, READ)]),
        )
    )
    assert bytes(rsp.payload) == DATA
    assert_unchanged(cluster, f)


def test_update_without_a_good_write_capability_is_refused(
    cluster: LocalCluster, file: File
) -> None:
    f = file
    evil = bytes(len(DATA))
    for why, cap in bad_caps(cluster, f, WRITE).items():
        err = _refused(_send(f, f.targets[0], sp.UPDATE, _update(f, cap, evil), evil))
        assert err.errno == errno.EACCES, (why, err)
    assert_unchanged(cluster, f)


def test_read_without_a_good_read_capability_is_refused(cluster: LocalCluster, file: File) -> None:
    f = file
    for why, cap in bad_caps(cluster, f, READ).items():
        req = _read(f, f.targets[-1], [cap] if cap is not None else [])
        err = _refused(_send(f, f.targets[-1], sp.BATCH_READ, req))
        assert err.errno == errno.EACCES, (why, err)
    # One good capability does not cover another inode of the same batch.
    other = asyncio.run(_write_file(cluster, "/caps-other"))
    req = _read(f, f.targets[-1], [_sign(cluster, f.inode, READ)])
    req.ios.add().CopyFrom(req.ios[0])
    req.ios[1].chunk.inode = other.inode
    _refused(_send(f, f.targets[-1], sp.BATCH_READ, req))
    assert_unchanged(cluster, f)


def test_query_without_a_good_capability_is_refused(cluster: LocalCluster, file: File) -> None:
    f = file
    for why, cap in bad_caps(cluster, f, READ).items():
        err = _refused(_send(f, f.targets[-1], sp.QUERY_LAST_CHUNK, _query(f, cap)))
        assert err.errno == errno.EACCES, (why, err)


def test_remove_without_a_good_write_capability_is_refused(
    cluster: LocalCluster, file: File
) -> None:
    f = file
    for why, cap in bad_caps(cluster, f, WRITE).items():
        err = _refused(_send(f, f.targets[0], sp.REMOVE_CHUNKS, _remove(f, cap)))
        assert err.errno == errno.EACCES, (why, err)
    assert_unchanged(cluster, f)


def test_a_client_cannot_forward(cluster: LocalCluster, file: File) -> None:
    """Chain fields are a node's alone, even with a genuine WRITE capability."""
    f = file
    evil = bytes(len(DATA))
    cap = _sign(cluster, f.inode, READ | WRITE)
    req = _update(f, cap, evil, from_target=f.targets[1], update_version=2, full_chunk=True)
    req.target_id = f.targets[2]
    _refused(_send(f, f.targets[2], sp.UPDATE, req, evil), Code.EPERM)
    assert_unchanged(cluster, f)


# -- forwards only from the chain predecessor --------------------------------------------


def test_forged_forward_is_refused_and_repair_spreads_nothing(
    cluster: LocalCluster, file: File
) -> None:
    """A forged whole-chunk forward to the tail, from a node that is not its
    predecessor (a valid key of another node), is refused; a repair of every
    replica afterwards leaves all holding the real bytes."""
    f = file
    head, mid, tail = f.targets
    secret = load_secret(cluster.secret_file)
    evil = pattern(len(DATA), "forged")
    attempts = [
        # the head's node claiming to be the middle target
        (f.routing.node_of_target(head).node_id, mid),
        # the head's node naming itself (not the tail's predecessor)
        (f.routing.node_of_target(head).node_id, head),
        # the tail's own node
        (f.routing.node_of_target(tail).node_id, mid),
    ]
    for node_id, claimed in attempts:
        req = _update(f, None, evil, from_target=claimed, update_version=2, full_chunk=True)
        req.target_id = tail
        cred = node_credential(secret, node_id)
        _refused(_send(f, tail, sp.UPDATE, req, evil, cred), Code.STALE_CHAIN_VERSION)
    # Anonymous: refused outright.
    req = _update(f, None, evil, from_target=mid, update_version=2, full_chunk=True)
    req.target_id = tail
    _refused(_send(f, tail, sp.UPDATE, req, evil), Code.EPERM)
    assert_unchanged(cluster, f)

    async def repair_all() -> None:
        for tid in f.targets:
            node = f.routing.node_of_target(tid)
            async with StorageControl(
                node.rpc_address, 10, node_credential(secret, node.node_id)
            ) as control:
                await control.repair_chunk(tid, f.inode, 0)

    asyncio.run(repair_all())
    assert_unchanged(cluster, f)


# -- nodes only --------------------------------------------------------------------------


def test_listings_and_sync_reports_need_a_node_key(cluster: LocalCluster, file: File) -> None:
    f = file
    listing = sp.ListChunksReq(chain_id=f.chain_id, target_id=f.targets[0], inode=f.inode)
    e = _refused(_send(f, f.targets[0], sp.LIST_CHUNKS, listing), Code.UNAUTHENTICATED)
    assert e.errno == errno.EACCES
    report = sp.SyncReportReq(
        chain_id=f.chain_id,
        chain_version=f.chain_version,
        target_id=f.targets[2],
        from_target=f.targets[1],
        done=True,
    )
    _refused(_send(f, f.targets[2], sp.SYNC_REPORT, report), Code.UNAUTHENTICATED)
    # Even a node's report is refused unless it holds the sync source.
    head_node = f.routing.node_of_target(f.targets[0]).node_id
    cred = node_credential(load_secret(cluster.secret_file), head_node)
    _refused(
        _send(f, f.targets[2], sp.SYNC_REPORT, report, credential=cred), Code.STALE_CHAIN_VERSION
    )
    # A node may list (the positive control).
    rsp = asyncio.run(_send(f, f.targets[0], sp.LIST_CHUNKS, listing, credential=cred))
    assert [m.chunk.index for m in sp.ListChunksRsp.FromString(bytes(rsp.header)).chunks] == [0]


def test_storage_control_needs_a_node_key(cluster: LocalCluster, file: File) -> None:
    f = file
    node = f.routing.node_of_target(f.targets[0])

    async def calls(cred: cpb.Credential | None) -> list[int]:
        """The chainfs code of each StorageControl call (0 = served)."""
        out = []
        async with StorageControl(node.rpc_address, 10, cred) as control:
            for call in (
                control.query_chunk(f.inode, 0),
                control.chunk_meta_page(f.targets[0]),
                control.get_targets(),
                control.repair_chunk(f.targets[0], f.inode, 0),
                control.verify_chunks(f.targets[0], [(f.inode, 0)]),
                control.create_targets(0, ""),
            ):
                try:
                    await call
                    out.append(0)
                except ChainfsError as e:
                    out.append(e.code)
        return out

    assert asyncio.run(calls(cpb.Credential())) == [Code.UNAUTHENTICATED] * 6
    forged = cpb.Credential(node_id=node.node_id, node_key=os.urandom(32))
    assert asyncio.run(calls(forged)) == [Code.UNAUTHENTICATED] * 6
    good = node_credential(load_secret(cluster.secret_file), node.node_id)
    # Served (create_targets(0) is the caller's EINVAL, past the access check).
    assert asyncio.run(calls(good)) == [0, 0, 0, 0, 0, Code.EINVAL]
    assert_unchanged(cluster, f)


# -- the client renews -------------------------------------------------------------------


def test_client_renews_refused_and_expiring_capabilities(cluster: LocalCluster, file: File) -> None:
    """A capability storage refuses (here: forged) is fetched again from meta once;
    one about to expire is renewed before it is used."""
    f = file

    async def go() -> None:
        fs = await chainfs.aio.connect(cluster.address)
        try:
            caps = fs.io.storage.caps
            assert isinstance(caps, CapabilityCache)
            forged = _sign(cluster, f.inode, READ | WRITE, fs.io.storage.client_id)
            forged.mac = bytes(32)
            caps.put(forged)
            got_bytes = await fs.io.storage.read(f.chain_id, f.inode, 0, 0, len(DATA))
            assert bytes(got_bytes) == DATA
            renewed = await caps.get([f.inode], READ)
            assert renewed[f.inode].mac != forged.mac
            # About to expire: replaced before use (storage would accept it still).
            soon = _sign(cluster, f.inode, READ, fs.io.storage.client_id, ttl_ms=1_000)
            caps.put(soon)
            got = await caps.get([f.inode], READ)
            assert got[f.inode].expires_ms > soon.expires_ms
            # Writes through an open file carry the WRITE capability of the open.
            async with await fs.open(f.path, "r+b") as w:
                await w.write(DATA)
        finally:
            await fs.close()

    asyncio.run(go())
    assert_unchanged(cluster, f, version=2)
