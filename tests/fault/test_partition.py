"""A storage node cut off from mgmtd fences itself; no client reads stale bytes from it.

The node reaches mgmtd only through a TCP relay this test runs (its config
names the relay); cutting the relay partitions it from mgmtd while clients,
holding routing from before the cut, can still reach it. The chain moves on
without it and takes a new write; a read sent straight to the cut-off node
must answer FENCED (never the old bytes). After the relay is restored the node
comes back, resyncs, and serves the new bytes.
(Without network namespaces: no root or ip(8) needed, same property.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.storage_client import StorageClient, data_address
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.testing import cluster as cluster_mod
from tests.fault import faultlib as fl
from tests.fault.test_fsck import _storage

CHUNK = 1024 * 1024


class Relay:
    """TCP relay on 127.0.0.1 (its own thread and loop); cut() drops everything."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.loop = asyncio.new_event_loop()
        self.open = True
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._call(self._listen())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while self.open:
                data = await r.read(65536)
                if not data:
                    break
                w.write(data)
                await w.drain()
        w.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.open:
            w.close()
            return
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            w.close()
            return
        self.writers |= {w, uw}
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))

    async def _cut(self) -> None:
        self.open = False
        for w in list(self.writers):
            w.close()
        self.writers.clear()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut())
            if self.server is not None:
                self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.mark.timeout(150)
def test_partitioned_node_fences_and_serves_no_stale_bytes(tmp_path: Path) -> None:
    relays: list[Relay] = []

    def configure(i: int, c: Any) -> None:
        if i == 0:
            relays.append(Relay(c.mgmtd_addresses[0]))
            c.mgmtd_addresses = [relays[0].address]

    try:
        with cluster_mod.LocalCluster(
            tmp_path,
            storage_nodes=3,
            targets_per_node=1,
            replicas=3,
            heartbeat_interval_ms=200,
            heartbeat_timeout_ms=4000,
            configure_storage=configure,
        ) as c:
            relay = relays[0]
            r = fl.routing(c.address)
            chain = min(r.chains)
            cut_node = c.storage[0].info["node_id"]
            cut_target = next(t.target_id for t in r.targets.values() if t.node_id == cut_node)
            ino = 1 << 51
            old, new = b"old bytes " * 10, b"NEW BYTES " * 10

            async def write(data: bytes) -> Any:
                async def go(client: StorageClient, _r: Any) -> None:
                    await client.write(chain, ino, 0, 0, data, CHUNK)

                return await _storage(c.address, go)

            asyncio.run(write(old))
            stale = fl.routing(c.address)  # what a client that looked before the cut holds

            relay.cut()
            fl.poll(
                lambda: fl.states(c.address)[cut_target] in (mp.OFFLINE, mp.LASTSRV),
                30,
                "mgmtd to drop the cut-off target",
            )
            asyncio.run(write(new))

            async def read_direct() -> Any:
                dc = DataClient()
                try:
                    req = sp.BatchReadReq(
                        ios=[
                            sp.ReadIO(
                                chain_id=chain,
                                target_id=cut_target,
                                chunk=sp.ChunkId(inode=ino, index=0),
                                offset=0,
                                length=len(new),
                            )
                        ]
                    )
                    got: list[bytes] = []

                    def sink(_t: int, header: bytes) -> list[memoryview]:
                        rsp = sp.BatchReadRsp.FromString(header)
                        buf = memoryview(bytearray(rsp.results[0].length))
                        got.append(buf)  # type: ignore[arg-type]
                        return [buf] if len(buf) else []

                    try:
                        await dc.request(
                            data_address(stale.node_of_target(cut_target)),
                            sp.BATCH_READ,
                            req.SerializeToString(),
                            payload_sink=sink,
                            timeout_s=10,
                        )
                    except ChainfsError as e:
                        return e.code
                    return bytes(got[0]) if got else b""
                finally:
                    await dc.close()

            answer = asyncio.run(read_direct())
            assert answer == Code.FENCED, f"cut-off node answered {answer!r}"

            relay.restore()
            fl.poll(lambda: fl.all_serving(c.address), 60, "the node back and resynced")
            fl.poll(lambda: asyncio.run(read_direct()) == new, 30, "new bytes from the node")
            assert fl.replica_differences(c.address) == []
    finally:
        for rl in relays:
            rl.close()
