"""MetaClient failover: a meta server that stops answering is left after one
attempt timeout; an unreachable mgmtd does not end a call that can still
succeed on the meta servers it knows."""

from __future__ import annotations

import asyncio

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.meta_client import MetaClient
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.proto import mgmt_pb2 as mp
from tests.unit.meta.conftest import ROOT, MetaEnv, SilentServer

pytestmark = pytest.mark.timeout(60)


async def test_a_silent_meta_server_is_left_after_the_attempt_timeout(
    env: MetaEnv, silent: SilentServer
) -> None:
    silent_address = silent.address
    client = MetaClient(
        [silent_address, env.server.rpc_address], user=ROOT, timeout_s=30, attempt_timeout_s=0.3
    )
    try:
        client._current = silent_address  # the hung server is the one in use
        await client.mkdir("/after-hang")
        assert client._current == env.server.rpc_address
        assert (await env.client.stat("/after-hang")).ino > 0
    finally:
        await client.aclose()


async def test_the_attempt_timeout_is_bounded_by_the_call_deadline(silent: SilentServer) -> None:
    client = MetaClient([silent.address], user=ROOT, timeout_s=0.5, attempt_timeout_s=5)
    try:
        with pytest.raises(ChainfsError) as e:
            await client.stat("/")
        assert e.value.code == Code.ETIMEDOUT
    finally:
        await client.aclose()


def _routing(version: int, meta_rpc_addresses: list[str]) -> Routing:
    info = mp.RoutingInfo(version=version)
    for i, addr in enumerate(meta_rpc_addresses, start=1):
        info.nodes.append(
            mp.NodeInfo(node_id=i, type=mp.META, rpc_address=addr, status=mp.NODE_ONLINE)
        )
    return Routing(info)


async def test_an_unreachable_mgmtd_does_not_end_a_meta_call(env: MetaEnv) -> None:
    """Every known meta server failed and mgmtd cannot be asked for fresh routing
    (its own failover): the call keeps retrying on what it knows until the
    deadline, and succeeds once a meta server answers (here: the routing watch
    delivers one)."""
    mgmt = MgmtClient("127.0.0.1:1", timeout_s=0.2)  # nothing listens there
    routing = RoutingCache(mgmt)
    routing.install(_routing(1, ["127.0.0.1:2"]))  # a meta server that is gone
    client = MetaClient(routing, user=ROOT, timeout_s=30, transport="grpc")

    async def deliver_later() -> None:
        await asyncio.sleep(0.5)
        routing.install(_routing(2, [env.server.rpc_address]))

    task = asyncio.create_task(deliver_later())
    try:
        inode = await client.stat("/")
        assert inode.ino == 1
    finally:
        await task
        await client.aclose()
        await mgmt.close()
