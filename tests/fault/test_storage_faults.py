"""Storage failures with real processes: kill -9 under load, resync, bit flips.

Heartbeats are fast here (300 ms, timeout 3 s) so failover happens within a
test; every wait is a bounded poll. Workloads are seeded.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest

from chainfs.client.config import ClientConfig
from chainfs.common.checksum import crc32c
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.local import cluster as cluster_mod
from chainfs.proto import mgmt_pb2 as mp
from tests.fault import faultlib as fl

HB_INTERVAL_MS = 300
HB_TIMEOUT_MS = 3000


def _client_config() -> ClientConfig:
    # Writes ride out a chain change (up to the heartbeat timeout) by retrying.
    return ClientConfig(storage=StorageClientConfig(retry_total_ms=30_000))


def _cluster(tmp_path: Path, scrub: bool = False, **failure: Any) -> cluster_mod.LocalCluster:
    """3 nodes x 2 targets, 3 replicas; ``failure``: FailureConfig fields to set."""

    def configure(i: int, c: Any) -> None:
        c.failure.resync_scan_interval_ms = 100
        c.failure.scrub_rate_bytes_per_s = 64 * 1024 * 1024 if scrub else 0
        c.failure.scrub_round_pause_ms = 200
        for name, value in failure.items():
            setattr(c.failure, name, value)

    return cluster_mod.LocalCluster(
        tmp_path,
        storage_nodes=3,
        targets_per_node=2,
        replicas=3,
        heartbeat_interval_ms=HB_INTERVAL_MS,
        heartbeat_timeout_ms=HB_TIMEOUT_MS,
        configure_storage=configure,
    )


def _node_index(c: cluster_mod.LocalCluster, node_id: int) -> int:
    for i, p in enumerate(c.storage):
        if p.info and p.info.get("node_id") == node_id:
            return i
    raise AssertionError(f"no storage process with node id {node_id}")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("role", ["head", "middle", "tail"])
def test_kill9_under_load_then_resync(tmp_path: Path, role: str) -> None:
    """kill -9 of one replica while files are written (the tail commits each update
    in one step, the others on the ack): every acknowledged write reads back
    byte-exact, during the outage and after the restarted node is resynced."""
    with _cluster(tmp_path) as c:
        fs = c.client(config=_client_config())
        r = fl.routing(c.address)
        chain = r.chains[min(r.chains)]
        victim_target = chain.targets[{"head": 0, "middle": 1, "tail": 2}[role]]
        victim = _node_index(c, r.targets[victim_target].node_id)

        w = fl.Workload(fs, seed={"head": 7, "middle": 11, "tail": 13}[role])
        w.start()
        try:
            fl.poll(lambda: w.acked_count() >= 15, 60, "15 files written before the kill")
            c.kill_storage(victim)
            after_kill = w.acked_count()
            # Writes resume once mgmtd moves the dead targets out of the chains.
            fl.poll(
                lambda: fl.states(c.address)[victim_target] in (mp.OFFLINE, mp.LASTSRV),
                30,
                "the killed target to go offline",
            )
            fl.poll(lambda: w.acked_count() >= after_kill + 10, 60, "writes to resume")
            c.restart_storage(victim)
            fl.poll(lambda: fl.all_serving(c.address), 60, "every target serving again")
            before_stop = w.acked_count()
            fl.poll(lambda: w.acked_count() >= before_stop + 5, 60, "writes after the resync")
        finally:
            w.stop()
        assert not w.corrupt, f"reads returned wrong bytes: {w.corrupt[:5]}"
        assert w.verify_all() == []
        assert fl.replica_differences(c.address) == []
        assert len(w.acked) >= 30
        from tests.fault.test_fsck import fsck

        assert fsck(c.address) == (0, [])


def _flip_one_replica(c: cluster_mod.LocalCluster, fs: Any, path: str) -> tuple[str, int]:
    """Flip a bit in one replica's file of ``path``'s first chunk; (file, stored crc)."""
    ino = fs.stat(path).st_ino
    r = fl.routing(c.address)
    for chain in r.chains.values():
        tid = chain.targets[-1]
        node = r.node_of_target(tid)
        meta = fl.dump_target(node, tid).get((ino, 0))
        if meta is None:
            continue
        proc = c.storage[_node_index(c, node.node_id)]
        tdir = proc.info["targets"][str(tid)]
        files = fl.chunk_files(tdir, ino, 0)
        assert len(files) == 1, files
        with open(files[0], "r+b") as f:
            f.seek(meta.length // 2)
            b = f.read(1)
            f.seek(meta.length // 2)
            f.write(bytes([b[0] ^ 0x10]))
        return files[0], meta.crc32c
    raise AssertionError(f"no chunk of {path} found")


def _file_crc_ok(path: str, want: int) -> bool:
    try:
        with open(path, "rb") as f:
            return crc32c(f.read()) == want
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("finder", ["read", "scrubber"])
def test_bit_flip_detected_and_repaired(tmp_path: Path, finder: str) -> None:
    with _cluster(tmp_path, scrub=finder == "scrubber") as c:
        fs = c.client()
        data = random.Random(3).randbytes(700_000)
        fs.write_file("/victim", data)
        digest = hashlib.sha256(data).hexdigest()
        chunk_file, want_crc = _flip_one_replica(c, fs, "/victim")
        assert not _file_crc_ok(chunk_file, want_crc)
        if finder == "read":
            # Reads pick replicas at random: every read returns the right bytes
            # (the corrupt replica answers CHECKSUM_MISMATCH; another one serves).
            for _ in range(40):
                assert hashlib.sha256(fs.read_file("/victim")).hexdigest() == digest
                if _file_crc_ok(chunk_file, want_crc):
                    break
        fl.poll(lambda: _file_crc_ok(chunk_file, want_crc), 30, "the corrupt replica repaired")
        assert hashlib.sha256(fs.read_file("/victim")).hexdigest() == digest
        assert fl.replica_differences(c.address) == []
        assert os.path.exists(chunk_file)
