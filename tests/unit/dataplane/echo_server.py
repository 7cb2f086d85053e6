"""A data-plane echo server in its own process (for the fuzz test).

msg_type 1 echoes header and payload; prints {"address": ...} once serving.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop

from chainfs.common.dataplane import DataPlaneConfig, DataServer, Request, Response


async def _echo(req: Request) -> Response:
    return Response(req.msg_type, req.header, payload=[req.payload])


async def _main() -> None:
    cfg = DataPlaneConfig(
        max_payload_bytes=1 << 20,
        max_header_bytes=64 * 1024,
        buffer_pool_bytes=8 << 20,
        buffer_pool_cached_bytes=4 << 20,
        frame_stall_timeout_ms=2_000,
    )
    server = DataServer(_echo, config=cfg)
    await server.start()
    print(json.dumps({"address": server.address}), flush=True)
    # Serve until stdin closes (the test holds the pipe) or we are signalled.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    print(json.dumps({"stats": server.stats, "pool_in_use": server.pool.in_use_bytes}), flush=True)
    await server.stop()


if __name__ == "__main__":
    uvloop.run(_main())
