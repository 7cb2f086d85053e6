"""MgmtClient, RoutingCache and HeartbeatLoop against in-process mgmtds."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import (
    FramedMgmtClient,
    HeartbeatLoop,
    MgmtClient,
    RoutingCache,
    local_state_for,
)
from chainfs.common.rpc.mgmt_wire import frame_address_of
from chainfs.kv.memory import MemoryStore
from chainfs.proto import mgmt_pb2 as mp
from tests.unit.mgmt.conftest import InProcMgmtd, eventually, run_mgmtd

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def storage_node(i: int) -> mp.NodeInfo:
    return mp.NodeInfo(
        type=mp.STORAGE,
        hostname="test",
        rpc_address=f"127.0.0.1:{20000 + i}",
        data_address=f"127.0.0.1:{21000 + i}",
    )


def targets(i: int, n: int = 2) -> list[mp.TargetInfo]:
    return [mp.TargetInfo(path=f"/data{i}/t{j}") for j in range(n)]


async def test_unreachable_mgmtd_is_unavailable_not_a_hang() -> None:
    addrs = f"127.0.0.1:{_free_port()},127.0.0.1:{_free_port()}"
    client = MgmtClient(addrs, timeout_s=0.5)
    try:
        with pytest.raises(ChainfsError) as e:
            await client.get_status()
        assert e.value.code == Code.UNAVAILABLE
        assert f"cannot reach mgmtd at {addrs}" in str(e.value)
    finally:
        await client.close()


async def test_register_heartbeat_and_routing(mgmtd: InProcMgmtd) -> None:
    async with MgmtClient(mgmtd.address) as client:
        rsp = await client.register_node(storage_node(1), targets(1))
        assert rsp.node_id > 0 and len(rsp.target_ids) == 2
        assert rsp.heartbeat_interval_ms == mgmtd.cfg.heartbeat_interval_ms
        routing = await client.get_routing()
        assert routing is not None
        assert routing.nodes[rsp.node_id].rpc_address == "127.0.0.1:20001"
        assert {t.target_id for t in routing.info.targets} == set(rsp.target_ids)
        # Known version: unchanged.
        assert await client.get_routing(routing.version) is None
        hb = await client.heartbeat(
            mp.HeartbeatReq(node_id=rsp.node_id, routing_version=routing.version)
        )
        assert hb.routing_version == routing.version and not hb.HasField("routing")
        with pytest.raises(ChainfsError) as e:
            await client.heartbeat(mp.HeartbeatReq(node_id=9999))
        assert e.value.code == Code.UNKNOWN_NODE


async def test_routing_cache_follows_changes(mgmtd: InProcMgmtd) -> None:
    async with MgmtClient(mgmtd.address) as client:
        cache = RoutingCache(client, refresh_interval_s=0.1)
        seen: list[int] = []
        cache.add_listener(lambda r: seen.append(r.version))
        first = await cache.get()
        cache.start()
        try:
            for i in range(3):
                await client.register_node(storage_node(i), targets(i))
            await client.create_chains(3)
            routing = await cache.wait_for(lambda r: len(r.chains) == 2, timeout_s=10)
            assert routing.version > first.version
            assert seen == sorted(seen) and seen[-1] == routing.version
            assert (await cache.refresh()).version == routing.version
        finally:
            await cache.stop()


async def test_heartbeat_loop_acks_and_delivers_routing(mgmtd: InProcMgmtd) -> None:
    async with MgmtClient(mgmtd.address) as client:
        got: list[Routing] = []
        reports = lambda: [mp.TargetHeartbeat(target_id=t, local_state=mp.UPTODATE) for t in ids]  # noqa: E731
        ids: list[int] = []
        loop = HeartbeatLoop(client, storage_node(7), reports, got.append, targets=targets(7))
        before = time.monotonic()
        await loop.start()
        ids.extend(loop.target_ids)
        try:
            assert loop.node_id > 0 and len(loop.target_ids) == 2
            assert loop.last_ack_monotonic >= before
            first_ack = loop.last_ack_monotonic
            await eventually(lambda: loop.last_ack_monotonic > first_ack, what="a heartbeat ack")
            assert got and got[-1].nodes[loop.node_id].status == mp.NODE_ONLINE
        finally:
            await loop.stop()


async def test_client_follows_not_primary_and_survives_failover(tmp_path: Path) -> None:
    store = MemoryStore()
    async with (
        run_mgmtd(tmp_path, store, "a") as a,
        run_mgmtd(tmp_path, store, "b") as b,
        # Only the standby's address: the client must be redirected to the primary.
        MgmtClient(b.address, timeout_s=10) as client,
    ):
        status = await client.get_status()
        assert status.primary_address == a.address and not status.primary
        rsp = await client.register_node(storage_node(1), targets(1))
        assert client.primary_address == a.address
        a.stop.set()  # clean stop releases the lease: b takes over
        routing = await client.get_routing()
        assert routing is not None and rsp.node_id in routing.nodes
        assert client.primary_address == b.address


def test_local_state_protocol_drives_a_returning_target_to_serving() -> None:
    """A storage node following local_state_for moves through the state table."""
    from chainfs.mgmt_service.target_states import LS, PS, Member, step_chain

    assert local_state_for(mp.SERVING) == mp.UPTODATE
    assert local_state_for(mp.SYNCING) == mp.ONLINE
    assert local_state_for(mp.SYNCING, sync_done=True) == mp.UPTODATE
    chain = [Member(1, PS.SERVING, LS.UPTODATE), Member(2, PS.OFFLINE, LS.OFFLINE)]
    sync_done = False
    for _ in range(5):
        chain = [
            m if m.target_id == 1 else Member(2, m.public, LS(local_state_for(m.public, sync_done)))
            for m in chain
        ]
        chain = step_chain(chain)
        sync_done = chain[1].public == PS.SYNCING  # the predecessor finishes at once
    assert [m.public for m in chain] == [PS.SERVING, PS.SERVING]


def test_example_config_loads() -> None:
    from chainfs.common import config
    from chainfs.mgmt_service.config import MgmtdConfig

    root = Path(__file__).resolve().parents[3]
    cfg = config.load(MgmtdConfig, root / "deploy" / "mgmtd.example.toml")
    assert cfg.store_url() == "rocksdb:///var/lib/chainfs/mgmtd/kv"


async def test_watch_stream_delivers_every_new_version(mgmtd: InProcMgmtd) -> None:
    async with MgmtClient(mgmtd.address) as client:
        await client.register_node(storage_node(1), targets(1))
        start = await client.get_routing()
        assert start is not None
        stream = client.watch_routing(start.version)
        last = start.version

        async def next_with_nodes(n: int) -> Routing:
            # These nodes never heartbeat: on a slow machine mgmtd may time them
            # out in between, which is a version of its own; skip past those.
            nonlocal last
            while True:
                routing = await asyncio.wait_for(anext(stream), 10)
                assert routing.version > last, "versions only go up"
                last = routing.version
                if len(routing.nodes) == n:
                    return routing

        try:
            await client.register_node(storage_node(2), targets(2))
            await next_with_nodes(2)
            # The generator now sits on the stream: the next change must come through it.
            await client.register_node(storage_node(3), targets(3))
            await next_with_nodes(3)
        finally:
            await stream.aclose()


# -- the framed client (the client library's; no gRPC) ---------------------------


async def _long_poll(client: FramedMgmtClient, known: int, wait_ms: int) -> mp.GetRoutingInfoRsp:
    req = mp.GetRoutingInfoReq(known_version=known, wait_ms=wait_ms)
    rsp: mp.GetRoutingInfoRsp = await client._call("GetRoutingInfo", req, timeout_s=30)
    return rsp


async def test_framed_long_poll_answers_unchanged_after_mgmtds_bound(tmp_path: Path) -> None:
    async with (
        run_mgmtd(tmp_path, max_routing_wait_ms=300) as m,
        MgmtClient(m.address) as admin,
        FramedMgmtClient(m.address) as framed,
    ):
        first = await admin.register_node(storage_node(1), targets(1))
        start = await framed.get_routing()
        assert start is not None and first.node_id in start.nodes
        # Nothing changes: "unchanged" once mgmtd's bound (300 ms) is up, though
        # the caller asked for a minute (10 s: a bound far above it, not a timing).
        rsp = await asyncio.wait_for(_long_poll(framed, start.version, 60_000), 10)
        assert rsp.unchanged


async def test_framed_long_poll_is_woken_by_a_change(mgmtd: InProcMgmtd) -> None:
    async with MgmtClient(mgmtd.address) as admin, FramedMgmtClient(mgmtd.address) as framed:
        await admin.register_node(storage_node(1), targets(1))
        start = await framed.get_routing()
        assert start is not None

        async def until_two_nodes() -> mp.GetRoutingInfoRsp:
            # Each poll waits up to mgmtd's default bound (30 s) unless a change
            # wakes it (a node timed out is a change too: poll on past it).
            known = start.version
            while True:
                rsp = await _long_poll(framed, known, 60_000)
                assert not rsp.unchanged and rsp.routing.version > known
                if len(rsp.routing.nodes) == 2:
                    return rsp
                known = rsp.routing.version

        poll = asyncio.create_task(until_two_nodes())
        second = await admin.register_node(storage_node(2), targets(2))
        rsp = await asyncio.wait_for(poll, 10)
        assert second.node_id in {n.node_id for n in rsp.routing.nodes}


async def test_framed_client_follows_not_primary_and_its_watch_survives_failover(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    async with (
        run_mgmtd(tmp_path, store, "a") as a,
        run_mgmtd(tmp_path, store, "b") as b,
        MgmtClient([a.address, b.address], timeout_s=10) as admin,
        # Only the standby's address: NOT_PRIMARY (an error frame) leads to the primary.
        FramedMgmtClient(b.address, timeout_s=10, watch_wait_s=0.5) as framed,
    ):
        assert (await framed.get_status()).primary_address == a.address
        cache = RoutingCache(framed, refresh_interval_s=0.1)
        cache.start_after_first_fetch()
        await cache.refresh()
        assert framed.primary_address == a.address
        try:
            rsp = await admin.register_node(storage_node(1), targets(1))
            await cache.wait_for(lambda r: rsp.node_id in r.nodes, 10)
            a.stop.set()  # clean stop releases the lease: b takes over
            rsp2 = await admin.register_node(storage_node(2), targets(2))
            await cache.wait_for(lambda r: rsp2.node_id in r.nodes, 20)
            assert framed.primary_address == b.address
        finally:
            await cache.stop()


def test_framed_client_rejects_an_address_that_is_not_host_port() -> None:
    for bad in ("localhost", "host:", ":9000", "host:65535", "host:port"):
        with pytest.raises(ChainfsError) as e:
            FramedMgmtClient(bad)
        assert e.value.code == Code.EINVAL, bad
    assert frame_address_of("10.0.0.1:8000") == "10.0.0.1:8001"
    assert frame_address_of("[::1]:8000") == "[::1]:8001"
