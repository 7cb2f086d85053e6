"""mgmtd as a real process: registration, heartbeats, chain table, admin CLI, restart.

Storage nodes are played by the test through MgmtClient/HeartbeatLoop (the
protocol a storage node speaks), so these tests need nothing but mgmtd.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.mgmt_client import HeartbeatLoop, MgmtClient
from chainfs.proto import mgmt_pb2 as mp
from chainfs.testing.proc import ServiceProcess

pytestmark = pytest.mark.timeout(120)

FAST = {
    "heartbeat_interval_ms": 100,
    "heartbeat_timeout_ms": 1000,
    "check_interval_ms": 50,
    "lease_ms": 1000,
    "lease_renew_interval_ms": 100,
    "lease_safety_margin_ms": 200,
}


def write_config(path: Path, **fields: Any) -> Path:
    lines = []
    for k, v in {**FAST, **fields}.items():
        lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def admin(address: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m chainfs admin ARGS --address A` as a subprocess.

    Awaited, not run blocking: the fake storage nodes heartbeat on this event
    loop, and a CLI start-up on a loaded machine can outlast the heartbeat
    timeout, which would mark them offline mid-test.
    """
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "chainfs", "admin", *args, "--address", address]
    p = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(60):
            out, err = await p.communicate()
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()
    assert p.returncode is not None
    proc = subprocess.CompletedProcess(cmd, p.returncode, out.decode(), err.decode())
    if check and proc.returncode != 0:
        raise AssertionError(f"admin {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


async def admin_json(address: str, *args: str) -> Any:
    return json.loads((await admin(address, *args, "--json")).stdout)


@pytest.fixture
def mgmtd(tmp_path: Path) -> Iterator[ServiceProcess]:
    cfg = write_config(tmp_path / "mgmtd.toml", data_dir=str(tmp_path / "mgmtd"))
    proc = ServiceProcess("mgmtd", cfg, tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


class FakeStorageNode:
    """A test playing a storage node: registers targets, heartbeats their local states."""

    def __init__(self, client: MgmtClient, index: int, n_targets: int = 2) -> None:
        self.client = client
        self.index = index
        self.node = mp.NodeInfo(
            type=mp.STORAGE,
            hostname="fake",
            rpc_address=f"127.0.0.1:{30000 + index}",
            data_address=f"127.0.0.1:{31000 + index}",
        )
        self.paths = [f"/fake{index}/t{j}" for j in range(n_targets)]
        self.local_state = mp.UPTODATE
        self.loop: HeartbeatLoop | None = None
        self.target_ids: list[int] = []

    def reports(self) -> list[mp.TargetHeartbeat]:
        return [
            mp.TargetHeartbeat(target_id=t, local_state=self.local_state, used_bytes=4096)
            for t in self.target_ids
        ]

    async def start(self) -> None:
        targets = [mp.TargetInfo(path=p) for p in self.paths]
        self.loop = HeartbeatLoop(self.client, self.node, self.reports, None, targets=targets)
        await self.loop.start()
        self.node.node_id = self.loop.node_id
        self.target_ids = list(self.loop.target_ids)

    async def stop(self) -> None:
        if self.loop is not None:
            await self.loop.stop()
            self.loop = None


@pytest.fixture
async def client(mgmtd: ServiceProcess) -> AsyncIterator[MgmtClient]:
    c = MgmtClient(mgmtd.info["rpc_address"], timeout_s=10)
    try:
        yield c
    finally:
        await c.close()


async def start_nodes(client: MgmtClient, n: int) -> list[FakeStorageNode]:
    nodes = [FakeStorageNode(client, i) for i in range(n)]
    for node in nodes:
        await node.start()
    return nodes


async def wait_routing(client: MgmtClient, pred: Any, timeout_s: float = 20.0) -> Any:
    """Poll routing info until ``pred(routing)``; a bound, not a timing assertion."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        routing = await client.get_routing()
        assert routing is not None
        if pred(routing):
            return routing
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"routing never satisfied the condition: {routing.info}")
        await asyncio.sleep(0.05)


async def settled(client: MgmtClient) -> Any:
    """Routing once every target's first heartbeat is applied (bounded poll)."""
    return await wait_routing(
        client, lambda r: all(t.local_state == mp.UPTODATE for t in r.info.targets)
    )


async def test_chain_table_heartbeat_timeout_and_return(
    mgmtd: ServiceProcess, client: MgmtClient
) -> None:
    addr = mgmtd.info["rpc_address"]
    nodes = await start_nodes(client, 3)
    try:
        await settled(client)
        created = await admin_json(addr, "init-cluster", "--replicas", "3")
        assert len(created) == 2
        for chain in created:
            assert chain["chain_version"] == 1 and chain["writable"]
            assert len(set(chain["nodes"])) == 3, "replicas on distinct nodes"
        assert len({c["nodes"][0] for c in created}) == 2, "heads on different nodes"

        targets = await admin_json(addr, "targets")
        assert len(targets) == 6
        for t in targets:
            assert set(t) >= {"target_id", "node_id", "chain_id", "state", "local_state"}
            assert t["state"] == "serving" and t["local_state"] == "uptodate"
            assert t["chain_id"] in {c["chain_id"] for c in created}

        # A node stops heartbeating: offline, its targets offline and last in their chains.
        before = await client.get_routing()
        assert before is not None
        victim = nodes[0]
        await victim.stop()
        after = await wait_routing(
            client, lambda r: r.nodes[victim.node.node_id].status == mp.NODE_OFFLINE
        )
        assert after.version > before.version
        for chain in after.info.chains:
            last = after.targets[chain.targets[-1]]
            assert last.node_id == victim.node.node_id
            assert last.public_state == mp.OFFLINE and last.local_state == mp.LOCAL_OFFLINE
            assert chain.chain_version > before.chains[chain.chain_id].chain_version
            assert after.head(chain.chain_id) is not None, "chain still writable"
        nodes_json = await admin_json(addr, "nodes")
        assert {n["node_id"]: n["status"] for n in nodes_json}[victim.node.node_id] == "offline"

        # It returns (re-registers with its id): waiting/syncing, then serving once up to date.
        victim.local_state = mp.ONLINE
        await victim.start()
        mine = set(victim.target_ids)
        await wait_routing(
            client,
            lambda r: (
                any(r.targets[t].public_state == mp.SYNCING for t in mine)
                and all(r.targets[t].public_state in (mp.SYNCING, mp.WAITING) for t in mine)
            ),
        )
        victim.local_state = mp.UPTODATE
        final = await wait_routing(
            client, lambda r: all(r.targets[t].public_state == mp.SERVING for t in mine)
        )
        states = {t["target_id"]: t["state"] for t in await admin_json(addr, "targets")}
        assert all(states[t] == "serving" for t in mine)
        assert final.nodes[victim.node.node_id].status == mp.NODE_ONLINE
    finally:
        for n in nodes:
            await n.stop()


async def test_bad_input_is_rejected_and_changes_nothing(
    mgmtd: ServiceProcess, client: MgmtClient
) -> None:
    addr = mgmtd.info["rpc_address"]
    nodes = await start_nodes(client, 2)
    try:
        before = await settled(client)
        targets_before = await admin_json(addr, "targets")
        chains_before = await admin_json(addr, "chains")

        # The same node registering again (same id, then same address).
        with pytest.raises(ChainfsError) as e:
            await client.register_node(nodes[0].node, [])
        assert e.value.code == Code.ALREADY_REGISTERED
        fresh = mp.NodeInfo()
        fresh.CopyFrom(nodes[1].node)
        fresh.node_id = 0
        with pytest.raises(ChainfsError) as e:
            await client.register_node(fresh, [mp.TargetInfo(path="/new")])
        assert e.value.code == Code.ALREADY_REGISTERED
        # A heartbeat from a node mgmtd never registered.
        with pytest.raises(ChainfsError) as e:
            await client.heartbeat(mp.HeartbeatReq(node_id=4242))
        assert e.value.code == Code.UNKNOWN_NODE
        # More replicas than nodes.
        bad = await admin(addr, "create-chains", "--replicas", "3", check=False)
        assert bad.returncode == 1
        assert "NOT_ENOUGH_NODES" in bad.stderr and "3 replicas" in bad.stderr

        after = await client.get_routing()
        assert after is not None
        assert after.version == before.version
        assert await admin_json(addr, "targets") == targets_before
        assert await admin_json(addr, "chains") == chains_before == []
    finally:
        for n in nodes:
            await n.stop()


async def test_state_survives_a_mgmtd_restart(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "mgmtd.toml", data_dir=str(tmp_path / "mgmtd"))
    proc = ServiceProcess("mgmtd", cfg, tmp_path)
    proc.start()
    try:
        async with MgmtClient(proc.info["rpc_address"], timeout_s=10) as c:
            nodes = await start_nodes(c, 2)
            await c.create_chains(2)
            await c.set_config("meta.gc_batch", "30")
            routing = await c.get_routing()
            assert routing is not None
            for n in nodes:
                await n.stop()
        proc.kill()  # a crash: the embedded store keeps everything committed
        proc.start()
        async with MgmtClient(proc.info["rpc_address"], timeout_s=10) as c:
            again = await c.get_routing()
            assert again is not None
            assert again.version == routing.version
            assert list(again.info.chains) == list(routing.info.chains)
            assert dict((await c.get_config()).values) == {"meta.gc_batch": "30"}
    finally:
        proc.stop()


async def test_admin_reports_unreachable_mgmtd() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await admin(f"127.0.0.1:{port}", "status", "--timeout", "1", check=False)
    assert proc.returncode == 1
    assert f"cannot reach mgmtd at 127.0.0.1:{port}" in proc.stderr


def test_bad_config_names_field_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('data_dir = "/tmp/x"\nheartbeat_timeout_msec = 5\n')
    proc = ServiceProcess("mgmtd", cfg, tmp_path)
    with pytest.raises(ChainfsError) as e:
        proc.start(timeout_s=30)
    assert "heartbeat_timeout_msec" in str(e.value) and str(cfg) in str(e.value)
