"""kill -9 the storage node of one host while a client on another host reads and writes.

Reads go on from the other hosts' replicas right away; writes resume once
mgmtd has taken the dead host's targets out of their chains; every file
whose write was acknowledged reads back as written, before and after; the
node, restarted, resyncs until every replica matches. The workload
(tests/fault/faultlib.py) is seeded; every wait is a bounded poll.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.client.config import ClientConfig
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.proto import mgmt_pb2 as mp
from chainfs.testing.hosts import MultiHostCluster
from tests.fault import faultlib as fl
from tests.multihost.conftest import hosts_cluster

pytestmark = pytest.mark.timeout(240)

HB_INTERVAL_MS = 300
HB_TIMEOUT_MS = 3000
VICTIM = 0  # host storage0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[MultiHostCluster]:
    body = hosts_cluster(
        tmp_path, heartbeat_interval_ms=HB_INTERVAL_MS, heartbeat_timeout_ms=HB_TIMEOUT_MS
    )
    yield from body


def test_storage_host_killed_under_reads_and_writes(cluster: MultiHostCluster) -> None:
    # Writes ride out the chain change (up to the heartbeat timeout) by retrying.
    fs = cluster.client(config=ClientConfig(storage=StorageClientConfig(retry_total_ms=30_000)))
    victim_targets = {
        t.target_id
        for t in fl.routing(cluster.address).targets.values()
        if t.node_id == cluster.storage[VICTIM].info["node_id"]
    }
    assert len(victim_targets) == cluster.targets_per_node
    w = fl.Workload(fs, seed=23)
    w.start()
    try:
        fl.poll(lambda: w.acked_count() >= 15, 60, "15 files written before the kill")
        cluster.kill_storage(VICTIM)
        killed_at = time.monotonic()
        before = dict(w.acked)
        # Served by the replicas on the other hosts, before mgmtd even noticed.
        for path, digest in before.items():
            assert hashlib.sha256(fs.read_file(path)).hexdigest() == digest, path
        fl.poll(
            lambda: all(
                fl.states(cluster.address)[t] in (mp.OFFLINE, mp.LASTSRV) for t in victim_targets
            ),
            30,
            "the killed host's targets to go offline",
        )
        after_offline = w.acked_count()
        fl.poll(lambda: w.acked_count() >= after_offline + 10, 60, "writes to resume")
        fl.poll(lambda: any(t > killed_at for t in w.read_ok_times), 30, "reads after the kill")
        assert not cluster.storage[VICTIM].alive()
        assert w.verify_all() == []
        # The host's node comes back: its targets are filled across the bridge.
        cluster.restart_storage(VICTIM)
        fl.poll(lambda: fl.all_serving(cluster.address), 60, "every target serving again")
    finally:
        w.stop()
    assert not w.corrupt, f"reads returned wrong bytes: {w.corrupt[:5]}"
    assert not w.read_errors, f"reads failed: {w.read_errors[:5]}"
    assert w.verify_all() == []
    assert fl.replica_differences(cluster.address) == []
