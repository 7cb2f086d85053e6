"""Rebalancing with a real cluster under load: a node joins and replicas move onto
it, then another node is drained, while a client writes and reads throughout.
Nothing acknowledged may be lost, replicas must end identical, and the drained
node must hold no chain."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from chainfs.proto import mgmt_pb2 as mp
from tests.fault import faultlib as fl
from tests.fault.test_admin_targets import admin
from tests.fault.test_storage_faults import _client_config, _cluster


def admin_error(address: str, *args: str) -> str:
    """Run an admin command that must fail; its error text."""
    cmd = [sys.executable, "-m", "chainfs", "admin", *args, "--address", address]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stdout
    return out.stderr


def replicas_by_node(address: str) -> dict[int, int]:
    r = fl.routing(address)
    out: dict[int, int] = {}
    for chain in r.chains.values():
        for tid in chain.targets:
            node = r.targets[tid].node_id
            out[node] = out.get(node, 0) + 1
    return out


def check_chains_whole(address: str, replicas: int) -> None:
    r = fl.routing(address)
    for cid, chain in r.chains.items():
        states = [r.targets[t].public_state for t in chain.targets]
        assert states == [mp.SERVING] * replicas, f"chain {cid}: {states}"
        nodes = {r.targets[t].node_id for t in chain.targets}
        assert len(nodes) == replicas, f"chain {cid} has two replicas on one node"


@pytest.mark.timeout(300)
def test_add_node_then_drain_node_under_load(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        fs = c.client(config=_client_config())
        rng = random.Random(11)
        files = {f"/pre{i}": rng.randbytes(rng.randrange(1, 3_000_000)) for i in range(24)}
        for p, d in files.items():
            fs.write_file(p, d)
        before = replicas_by_node(c.address)
        load = fl.Workload(fs, seed=3)
        load.start()
        try:
            new = c.add_storage()
            new_node = int(c.storage[new].info["node_id"])
            assert new_node not in before
            # Bad input changes nothing: a node that does not exist, a rebalance given a node.
            assert "not a registered storage node" in admin_error(c.address, "drain-node", "999")
            plan = admin(c.address, "add-node", str(new_node), "--dry-run")
            assert plan and all(m["to_node"] == new_node for m in plan), plan
            assert replicas_by_node(c.address) == before  # a dry run moves nothing

            done = admin(c.address, "add-node", str(new_node), "--rate", "0")
            assert done["moves_done"] == done["moves_total"] == len(plan), done
            assert done["moves_failed"] == 0 and done["bytes_moved"] > 0, done
            after_add = replicas_by_node(c.address)
            assert after_add.get(new_node, 0) == len(plan)
            assert max(after_add.values()) - min(after_add.values()) <= 1, after_add
            check_chains_whole(c.address, 3)

            drained = min(n for n in before if n != new_node)
            done = admin(c.address, "drain-node", str(drained), "--concurrency", "1")
            assert done["moves_failed"] == 0 and done["moves_done"] == done["moves_total"] > 0
            status = admin(c.address, "rebalance-status")
            assert not status["running"] and status["moves_done"] == done["moves_done"]
        finally:
            load.stop()

        assert drained not in replicas_by_node(c.address)
        check_chains_whole(c.address, 3)
        assert load.corrupt == [] and load.acked_count() > 0
        assert load.verify_all() == []
        for p, d in files.items():
            assert fs.read_file(p) == d, p
        fl.poll(lambda: fl.replica_differences(c.address) == [], 30, "identical replicas")
        # The replicas moved away were dropped: every target in no chain is empty.
        r = fl.routing(c.address)
        free = [t for t in r.targets.values() if not t.chain_id]
        assert len(free) == 2  # 8 targets, 6 of them in the 2 chains
        for t in free:
            assert fl.dump_target(r.nodes[t.node_id], t.target_id) == {}, t.target_id
