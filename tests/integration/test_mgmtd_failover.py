"""Two mgmtd processes on one etcd: one primary by lease; killing it hands over."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.mgmt_client import FramedMgmtClient, MgmtClient, RoutingCache
from chainfs.common.rpc.mgmt_wire import frame_address_of
from chainfs.proto import mgmt_pb2 as mp
from chainfs.testing.proc import ServiceProcess
from tests.conftest import require_binary
from tests.integration.test_mgmtd import settled, start_nodes, write_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.etcd]

LEASE_MS = 1000
RENEW_MS = 100
# Handover bound the config promises (lease + two renew rounds), plus slack for a
# loaded 2-core CI machine: process start, an etcd commit, client retry pauses.
HANDOVER_BOUND_S = (LEASE_MS + 2 * RENEW_MS) / 1000.0 + 5.0


@pytest.fixture
def etcd_url(tmp_path: Path) -> Iterator[str]:
    require_binary("etcd")
    from chainfs.testing.etcd import EtcdCluster

    with EtcdCluster(tmp_path / "etcd", members=1) as etcd:
        yield etcd.url("chainfs-mgmt-test")


def start_mgmtds(tmp_path: Path, url: str, n: int = 2) -> list[ServiceProcess]:
    procs = []
    for i in range(n):
        cfg = write_config(
            tmp_path / f"mgmtd{i}.toml",
            kv_url=url,
            lease_ms=LEASE_MS,
            lease_renew_interval_ms=RENEW_MS,
            heartbeat_timeout_ms=4000,  # nodes ride out the handover
        )
        p = ServiceProcess("mgmtd", cfg, tmp_path, name=f"mgmtd{i}")
        p.start()
        procs.append(p)
    return procs


async def primary_of(procs: list[ServiceProcess]) -> ServiceProcess:
    """The process whose GetStatus says it is primary (polled, bounded)."""
    deadline = time.monotonic() + HANDOVER_BOUND_S
    while True:
        for p in procs:
            if not p.alive():
                continue
            async with MgmtClient(p.info["rpc_address"], timeout_s=2) as c:
                try:
                    if (await c.get_status()).primary:
                        return p
                except ChainfsError as e:
                    # Down, paused or still starting: ask again; anything else is a bug.
                    if e.code not in (Code.UNAVAILABLE, Code.ETIMEDOUT, Code.NOT_PRIMARY):
                        raise
        if time.monotonic() > deadline:
            raise AssertionError("no mgmtd became primary")
        await asyncio.sleep(0.02)


async def test_killing_the_primary_hands_over_and_loses_nothing(
    tmp_path: Path, etcd_url: str
) -> None:
    procs = start_mgmtds(tmp_path, etcd_url)
    addresses = [p.info["rpc_address"] for p in procs]
    try:
        first = await primary_of(procs)
        standby = next(p for p in procs if p is not first)
        async with MgmtClient(addresses, timeout_s=HANDOVER_BOUND_S) as client:
            # Through the standby's address alone: NOT_PRIMARY redirects to the primary.
            async with MgmtClient(standby.info["rpc_address"], timeout_s=5) as via_standby:
                status = await via_standby.get_status()
                assert status.primary_address == first.info["rpc_address"]
                await via_standby.set_config("meta.gc_batch", "32")
                assert via_standby.primary_address == first.info["rpc_address"]
            nodes = await start_nodes(client, 3)
            try:
                before = await settled(client)
                await client.create_chains(3)
                before = await settled(client)
                assert len(before.chains) == 2

                killed_at = time.monotonic()
                first.kill()
                second = await primary_of(procs)
                handover_s = time.monotonic() - killed_at
                assert second is standby
                print(f"mgmtd handover after kill -9: {handover_s:.3f}s (lease {LEASE_MS} ms)")

                # Nothing lost, nothing changed: same routing version, chains, nodes, config.
                after = await client.get_routing()
                assert after is not None
                assert after.version == before.version
                assert list(after.info.chains) == list(before.info.chains)
                assert set(after.nodes) == set(before.nodes)
                config = dict((await client.get_config("meta.gc_batch")).values)
                assert config == {"meta.gc_batch": "32"}
                assert client.primary_address == standby.info["rpc_address"]
                # Heartbeats go on to the new primary, within the nodes' timeout.
                resumed = time.monotonic()
                for n in nodes:
                    assert n.loop is not None
                    await n.loop.beat_once()
                    assert n.loop.last_ack_monotonic >= resumed
                final = await client.get_routing()
                assert final is not None
                assert all(x.status == mp.NODE_ONLINE for x in final.info.nodes)
            finally:
                for n in nodes:
                    await n.stop()
    finally:
        for p in procs:
            p.stop()


async def test_a_paused_primary_does_not_act_after_the_handover(
    tmp_path: Path, etcd_url: str
) -> None:
    procs = start_mgmtds(tmp_path, etcd_url)
    try:
        first = await primary_of(procs)
        standby = next(p for p in procs if p is not first)
        assert first.pid is not None
        os.kill(first.pid, signal.SIGSTOP)
        try:
            assert await primary_of([standby]) is standby
            async with MgmtClient(standby.info["rpc_address"], timeout_s=5) as c:
                await c.set_config("meta.gc_delay_ms", "1000")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        # The old primary wakes up past its lease: it answers as a standby and
        # sends writers to the new primary.
        async with MgmtClient(first.info["rpc_address"], timeout_s=10) as c:
            await c.set_config("meta.gc_retry_delay_ms", "2000")
            assert c.primary_address == standby.info["rpc_address"]
            status = await c.get_status()
            assert status.primary_address == standby.info["rpc_address"]
            values = dict((await c.get_config()).values)
            assert values == {"meta.gc_delay_ms": "1000", "meta.gc_retry_delay_ms": "2000"}
    finally:
        for p in procs:
            p.stop()


async def test_framed_client_follows_the_primary_and_its_watch_survives_a_kill(
    tmp_path: Path, etcd_url: str
) -> None:
    """The client library's mgmtd client (framed, no gRPC): NOT_PRIMARY from a
    standby leads it to the primary, and its routing watch (long polls) sees
    changes made before and after the primary is killed."""
    procs = start_mgmtds(tmp_path, etcd_url)
    addresses = [p.info["rpc_address"] for p in procs]
    try:
        first = await primary_of(procs)
        standby = next(p for p in procs if p is not first)
        assert standby.info["frame_address"] == frame_address_of(standby.info["rpc_address"])
        async with FramedMgmtClient(standby.info["rpc_address"], timeout_s=5) as via_standby:
            assert (await via_standby.get_status()).primary_address == first.info["rpc_address"]
            assert await via_standby.get_routing() is not None
            assert via_standby.primary_address == first.info["rpc_address"]
        async with (
            MgmtClient(addresses, timeout_s=HANDOVER_BOUND_S) as admin,
            FramedMgmtClient(addresses, timeout_s=HANDOVER_BOUND_S, watch_wait_s=1.0) as framed,
        ):
            cache = RoutingCache(framed, refresh_interval_s=0.1)
            start_version = (await cache.refresh()).version
            cache.start()
            nodes = await start_nodes(admin, 3)
            try:
                # Registrations bump the version; the watch delivers it unasked.
                await cache.wait_for(lambda r: len(r.nodes) == 3, HANDOVER_BOUND_S)
                assert cache.version > start_version
                first.kill()
                assert await primary_of(procs) is standby
                await settled(admin)
                await admin.create_chains(3)
                routing = await cache.wait_for(lambda r: len(r.info.chains) == 2, 30.0)
                assert framed.primary_address == standby.info["rpc_address"]
                assert routing.version == (await admin.get_routing()).version  # type: ignore[union-attr]
            finally:
                await cache.stop()
                for n in nodes:
                    await n.stop()
    finally:
        for p in procs:
            p.stop()
