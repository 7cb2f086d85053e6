"""gRPC servers are bounded by their GrpcServerConfig: RPCs beyond
max_concurrent_rpcs are refused (RESOURCE_EXHAUSTED), the rest are served."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from chainfs.common.rpc import grpc_util
from chainfs.common.rpc.server_config import GrpcServerConfig
from chainfs.mgmt_service.config import MgmtdConfig

pytestmark = pytest.mark.timeout(60)


async def test_rpcs_beyond_the_concurrency_bound_are_refused() -> None:
    release = asyncio.Event()
    both_started = asyncio.Event()
    started = 0

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal started
        started += 1
        if started == 2:
            both_started.set()
        await release.wait()
        return request

    srv = grpc_util.server(GrpcServerConfig(max_concurrent_rpcs=2))
    handler = grpc.unary_unary_rpc_method_handler(hold)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"M": handler}),))
    port = grpc_util.bind(srv, "127.0.0.1", 0)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/t.S/M")
            held = [asyncio.ensure_future(call(b"a")), asyncio.ensure_future(call(b"b"))]
            await both_started.wait()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(b"c")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert sorted(await asyncio.gather(*held)) == [b"a", b"b"]
            assert await call(b"d") == b"d"  # room again
    finally:
        await srv.stop(None)


def test_config_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="handshake_timeout_ms"):
        GrpcServerConfig(handshake_timeout_ms=0).validate()
    cfg = MgmtdConfig(kv_url="memory://")
    cfg.grpc.max_concurrent_rpcs = cfg.max_watch_streams
    with pytest.raises(ValueError, match="max_watch_streams"):
        cfg.validate()
