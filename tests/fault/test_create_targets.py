"""`chainfs admin create-targets` on a live cluster: new targets join chains, are
filled by resync while writes go on, serve, and survive a restart of their node.

3 storage nodes, 2 targets each, 2 replicas: 3 chains, each missing one node, so
a node's new target can join the chain it is not in. Seeded data; every wait is
a bounded poll.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chainfs.cli.admin.cluster import public_state_name
from chainfs.local import cluster as cluster_mod
from chainfs.proto import mgmt_pb2 as mp
from tests.fault import faultlib as fl
from tests.fault.test_storage_faults import HB_INTERVAL_MS, HB_TIMEOUT_MS, _client_config

# Resync slowed so that "syncing" lasts long enough to be seen by polling (~2 s for
# the data below); the figure is not asserted.
RESYNC_RATE_BYTES_PER_S = 4 * 1024 * 1024


def _cluster(tmp_path: Path) -> cluster_mod.LocalCluster:
    def configure(i: int, c: Any) -> None:
        c.failure.resync_scan_interval_ms = 100
        c.failure.resync_rate_bytes_per_s = RESYNC_RATE_BYTES_PER_S
        c.failure.scrub_rate_bytes_per_s = 0

    return cluster_mod.LocalCluster(
        tmp_path,
        storage_nodes=3,
        targets_per_node=2,
        replicas=2,
        heartbeat_interval_ms=HB_INTERVAL_MS,
        heartbeat_timeout_ms=HB_TIMEOUT_MS,
        configure_storage=configure,
    )


def cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chainfs", "admin", *args, "--address", address, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def admin(address: str, *args: str) -> Any:
    out = cli(address, *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def admin_fails(address: str, *args: str) -> str:
    out = cli(address, *args)
    assert out.returncode != 0, f"{args} succeeded: {out.stdout}"
    return out.stderr


def _snapshot(c: cluster_mod.LocalCluster) -> tuple[Any, ...]:
    """What a failed create-targets must leave untouched: targets, chains, directories."""
    r = fl.routing(c.address)
    targets = sorted((t.target_id, t.node_id, t.chain_id, t.path) for t in r.targets.values())
    chains = sorted((cid, tuple(ch.targets)) for cid, ch in r.chains.items())
    dirs = sorted(
        str(p.relative_to(c.base_dir)) for p in c.base_dir.glob("storage*/*") if p.is_dir()
    )
    return targets, chains, dirs


def _storage_index(c: cluster_mod.LocalCluster, node_id: int) -> int:
    for i, p in enumerate(c.storage):
        if p.info and p.info.get("node_id") == node_id:
            return i
    raise AssertionError(f"no storage process with node id {node_id}")


def _watch_until_serving(address: str, tid: int, timeout_s: float) -> list[int]:
    """Public states ``tid`` went through (deduplicated) until it serves."""
    seen: list[int] = []

    def serving() -> bool:
        s = fl.states(address).get(tid, 0)
        if not seen or seen[-1] != s:
            seen.append(s)
        return s == mp.SERVING

    fl.poll(serving, timeout_s, f"target {tid} serving", every_s=0.05)
    return seen


def _fsck(address: str) -> tuple[int, list[Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "chainfs", "fsck", "--address", address, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def _verify(fs: Any, files: dict[str, bytes]) -> None:
    for p, d in files.items():
        got = fs.read_file(p)
        assert hashlib.sha256(got).digest() == hashlib.sha256(d).digest(), p


@pytest.mark.timeout(240)
def test_create_targets_join_chains_resync_and_survive_restart(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        fs = c.client(config=_client_config())
        rng = random.Random(11)
        files = {f"/d{i}": rng.randbytes(rng.randrange(1, 300_000)) for i in range(24)}
        files["/big"] = rng.randbytes(9 * 1024 * 1024 + 12345)  # three 4 MiB chunks
        files["/big2"] = rng.randbytes(6 * 1024 * 1024)
        for p, d in files.items():
            fs.write_file(p, d)

        r = fl.routing(c.address)
        node = min(n.node_id for n in r.nodes_of_type(mp.STORAGE))
        node_dir = c.base_dir / f"storage{_storage_index(c, node)}"
        node_of = {tid: t.node_id for tid, t in r.targets.items()}
        outside = [
            cid for cid, ch in r.chains.items() if node not in {node_of[t] for t in ch.targets}
        ]
        inside = [cid for cid in r.chains if cid not in outside]
        assert outside and inside

        # -- errors name the thing and change nothing -------------------------
        before = _snapshot(c)
        assert "node 99 is not registered" in admin_fails(
            c.address, "create-targets", "--node-id", "99"
        )
        err = admin_fails(
            c.address, "create-targets", "--node-id", str(node), "--path", "/nonexistent/disk"
        )
        assert "/nonexistent/disk does not exist" in err
        assert "absolute" in admin_fails(
            c.address, "create-targets", "--node-id", str(node), "--path", "rel/dir"
        )
        err = admin_fails(
            c.address, "create-targets", "--node-id", str(node), "--path", str(node_dir / "target0")
        )
        assert "already holds target" in err
        err = admin_fails(
            c.address, "create-targets", "--node-id", str(node), "--chain", str(inside[0])
        )
        assert f"chain {inside[0]} already has target" in err
        assert "chain 999 does not exist" in admin_fails(
            c.address, "create-targets", "--node-id", str(node), "--chain", "999"
        )
        assert "--auto" in admin_fails(
            c.address, "create-targets", "--node-id", str(node), "--auto"
        )
        assert _snapshot(c) == before

        # -- a new target joins a chain under a write load ---------------------
        load = fl.Workload(fs, seed=12, max_size=200_000)
        load.start()
        try:
            rows = admin(
                c.address, "create-targets", "--node-id", str(node), "--chain", str(outside[0])
            )
            assert len(rows) == 1
            new = rows[0]
            assert new["node_id"] == node and new["chain_id"] == outside[0]
            assert new["path"] == str(node_dir / "target2")
            tid = int(new["target_id"])
            seen = _watch_until_serving(c.address, tid, 120)
            fl.poll(lambda: load.acked_count() >= 5, 60, "writes acknowledged during the resync")
        finally:
            load.stop()
        assert mp.SYNCING in seen, [public_state_name(s) for s in seen]
        assert seen.index(mp.SYNCING) < seen.index(mp.SERVING)
        assert not load.corrupt and not load.verify_all()

        # -- replace a lost replica: the chain is short, --auto refills it -----
        r = fl.routing(c.address)
        victim_chain = inside[0]
        victim = next(t for t in r.chains[victim_chain].targets if node_of[t] == node)
        # A lost disk is taken out of its chain, then out of the registry.
        admin(c.address, "update-chain", str(victim_chain), "--remove", str(victim))
        admin(c.address, "remove-target", str(victim))
        disk = tmp_path / "newdisk"
        disk.mkdir()
        rows = admin(
            c.address,
            "create-targets",
            "--node-id",
            str(node),
            "--auto",
            "--path",
            str(disk),
            "--wait",
        )
        assert [(r["chain_id"], r["state"], r["path"]) for r in rows] == [
            (victim_chain, "serving", str(disk / "target0"))
        ]
        tid2 = int(rows[0]["target_id"])

        # -- every replica identical, every byte as written ---------------------
        fl.poll(lambda: fl.replica_differences(c.address) == [], 60, "identical replicas")
        _verify(fs, files)
        assert _fsck(c.address) == (0, [])
        ino = fs.stat("/big").st_ino
        for index in range(3):
            reps = admin(c.address, "query-chunk", str(ino), str(index))
            chain_reps = [x for x in reps if x["present"]]
            assert (
                len({(x["committed_version"], x["length"], x["crc32c"]) for x in chain_reps}) == 1
            )
            assert all(x["pending_version"] == 0 for x in chain_reps)
        targets = {t["target_id"]: t for t in admin(c.address, "targets")}
        for t in (tid, tid2):
            assert {k: targets[t][k] for k in ("node_id", "state", "local_state")} == {
                "node_id": node,
                "state": "serving",
                "local_state": "uptodate",
            }
        assert targets[tid]["chain_id"] == outside[0] and targets[tid2]["chain_id"] == victim_chain

        # -- restart: the node still serves its new targets ---------------------
        i = _storage_index(c, node)
        c.stop_storage(i)
        fl.poll(
            lambda: fl.routing(c.address).nodes[node].status == mp.NODE_OFFLINE,
            30,
            f"node {node} offline",
        )
        assert "offline" in admin_fails(c.address, "create-targets", "--node-id", str(node))
        c.restart_storage(i)
        assert {tid, tid2} <= set(c.storage[i].info["target_ids"])
        fl.poll(lambda: fl.all_serving(c.address), 90, "every chain member serving after restart")
        r = fl.routing(c.address)
        assert r.targets[tid].chain_id == outside[0] and r.targets[tid2].chain_id == victim_chain
        fl.poll(lambda: fl.replica_differences(c.address) == [], 60, "identical replicas")
        _verify(fs, files)
        assert json.loads((node_dir / "target0" / "extra_targets.json").read_text()) == {
            "targets": [str(node_dir / "target2"), str(disk / "target0")]
        }
        assert not any(c.dead_processes()), c.dead_processes()


@pytest.mark.timeout(120)
def test_free_targets_on_every_node_become_new_chains(tmp_path: Path) -> None:
    """New capacity: a free target on each node, then create-chains makes a chain of them
    that new files can use."""
    with _cluster(tmp_path) as c:
        fs = c.client(config=_client_config())
        r = fl.routing(c.address)
        chains_before = set(r.chains)
        new: list[int] = []
        for n in sorted(n.node_id for n in r.nodes_of_type(mp.STORAGE)):
            rows = admin(c.address, "create-targets", "--node-id", str(n), "--count", "2")
            assert [(x["node_id"], x["chain_id"], x["state"]) for x in rows] == [
                (n, 0, "waiting")
            ] * 2
            new += [int(x["target_id"]) for x in rows]
        made = admin(c.address, "create-chains", "--replicas", "2")
        assert len(made) == 3 and not chains_before & {m["chain_id"] for m in made}
        assert sorted(t for m in made for t in m["targets"]) == sorted(new)
        assert all(s == "serving" for m in made for s in m["states"])
        rng = random.Random(3)
        files = {f"/n{i}": rng.randbytes(rng.randrange(1, 200_000)) for i in range(30)}
        for p, d in files.items():
            fs.write_file(p, d)
        _verify(fs, files)
        fl.poll(lambda: fl.replica_differences(c.address) == [], 30, "identical replicas")
        now = fl.routing(c.address)
        used = {t for t in new if fl.dump_target(now.node_of_target(t), t)}
        assert used, "no new chain received a chunk"
        assert os.path.isdir(c.base_dir / "storage0" / "target3")
