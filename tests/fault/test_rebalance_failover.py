"""A rebalance survives the loss of the mgmtd primary that runs it: two mgmtd on
etcd, an add-node run paced slowly (one move at a time), kill -9 of the primary
while a move is syncing. The new primary must report the same run and finish
it; every chain ends with its replica count, no target in two chains, the moved
replicas identical to the others, and nothing the load acknowledged lost."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from chainfs.local import LocalCluster
from tests.conftest import require_binary
from tests.fault import faultlib as fl
from tests.fault.test_admin_targets import admin
from tests.fault.test_rebalance import check_chains_whole, replicas_by_node
from tests.fault.test_storage_faults import _client_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.etcd]

PHASE_TIMEOUT_S = 120.0  # bound on each wait (2 busy cores, a paced resync)


def _configure_storage(i: int, c: Any) -> None:
    c.failure.resync_scan_interval_ms = 100


def _plan_of(status: dict[str, Any]) -> list[tuple[int, int, int]]:
    return [(m["chain_id"], m["from_target"], m["to_target"]) for m in status["moves"]]


def test_add_node_resumes_on_the_new_mgmtd_primary(tmp_path: Path) -> None:
    require_binary("etcd")
    with LocalCluster(
        tmp_path,
        storage_nodes=3,
        targets_per_node=4,  # 4 chains: a new node takes 3 replicas
        replicas=3,
        kv="etcd",
        mgmtds=2,
        heartbeat_interval_ms=200,
        heartbeat_timeout_ms=6000,  # nodes ride out the mgmtd handover
        lease_ms=1000,
        lease_renew_interval_ms=100,
        configure_storage=_configure_storage,
    ) as c:
        fs = c.client(config=_client_config())
        rng = random.Random(5)
        files = {f"/pre{i}": rng.randbytes(rng.randrange(500_000, 1_500_000)) for i in range(8)}
        for p, d in files.items():
            fs.write_file(p, d)
        replicas_before = sum(replicas_by_node(c.address).values())
        load = fl.Workload(fs, seed=9, max_size=100_000)
        load.start()
        try:
            new_node = int(c.storage[c.add_storage()].info["node_id"])
            started = admin(
                c.address,
                "add-node",
                str(new_node),
                "--rate",
                "1M",
                "--concurrency",
                "1",
                "--no-wait",
            )
            plan = _plan_of(started)
            assert len(plan) >= 2, started  # one move syncing, one still planned at the kill

            def first_move_syncing() -> bool:
                s = admin(c.address, "rebalance-status")
                return s["running"] and any(m["state"] == "syncing" for m in s["moves"])

            fl.poll(first_move_syncing, PHASE_TIMEOUT_S, "a move syncing")
            first = c.kill_mgmtd_primary()
            second = c.mgmtd_primary(PHASE_TIMEOUT_S)
            assert second != first

            # The new primary shows the same run, still going, and finishes it.
            resumed = fl.poll(
                lambda: admin(c.address, "rebalance-status"),
                PHASE_TIMEOUT_S,
                "rebalance status on the new primary",
            )
            assert resumed["mode"] == "add_node" and resumed["node_id"] == new_node, resumed
            assert _plan_of(resumed) == plan
            done = fl.poll(
                lambda: (s := admin(c.address, "rebalance-status"))["running"] is False and s,
                PHASE_TIMEOUT_S,
                "the resumed rebalance to end",
            )
        finally:
            load.stop()

        assert _plan_of(done) == plan
        assert done["moves_failed"] == 0 and done["moves_done"] == len(plan), done
        assert all(m["state"] == "done" for m in done["moves"]), done
        assert replicas_by_node(c.address).get(new_node, 0) == len(plan)
        assert sum(replicas_by_node(c.address).values()) == replicas_before
        check_chains_whole(c.address, 3)
        r = fl.routing(c.address)
        members = [t for chain in r.chains.values() for t in chain.targets]
        assert len(members) == len(set(members)), "a target in two chains"
        assert load.corrupt == [] and load.acked_count() > 0
        assert load.verify_all() == []
        for p, d in files.items():
            assert fs.read_file(p) == d, p
        fl.poll(lambda: fl.replica_differences(c.address) == [], 30, "identical replicas")
        # The status outlives the run on the new primary too.
        assert admin(c.address, "rebalance-status")["moves_done"] == len(plan)
