"""Every process of a live cluster serves Prometheus /metrics, and a workload
moves what a dashboard plots: bytes and ops counters, latency histograms,
target and chain states."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.common import metrics
from chainfs.local import LocalCluster
from tests.integration.fuse_fixtures import mounted_cluster

pytestmark = pytest.mark.timeout(240)

SCRAPE_TIMEOUT_S = 10.0
PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


def scrape(address: str) -> metrics.Samples:
    return asyncio.run(metrics.scrape(address, SCRAPE_TIMEOUT_S))


HEARTBEAT_S = 1.0  # storage nodes' default heartbeat interval


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from mounted_cluster(tmp_path_factory.mktemp("metrics"))


def all_scrapes(c: LocalCluster) -> dict[str, metrics.Samples]:
    return {name: scrape(addr) for name, addr in c.metrics_addresses().items()}


def test_every_process_serves_metrics(cluster: LocalCluster) -> None:
    names = set(cluster.metrics_addresses())
    assert {"mgmtd", "meta", "storage0", "storage1", "storage2", "mount"} <= names
    for name, addr in cluster.metrics_addresses().items():
        body = asyncio.run(metrics.http_get(addr, "/metrics", SCRAPE_TIMEOUT_S, 1 << 24))
        assert b"# TYPE " in body, name


def test_workload_moves_counters_and_histograms(cluster: LocalCluster) -> None:
    before = all_scrapes(cluster)
    fs = cluster.client()
    fs.mkdir("/m", exist_ok=True)
    with fs.open("/m/client.bin", "wb") as f:
        f.write(PAYLOAD)
    with fs.open("/m/client.bin", "rb") as f:
        assert f.read() == PAYLOAD
    assert cluster.mountpoint is not None
    through_mount = Path(cluster.mountpoint) / "m" / "mount.bin"
    through_mount.write_bytes(PAYLOAD)
    assert (Path(cluster.mountpoint) / "m" / "client.bin").read_bytes() == PAYLOAD
    after = all_scrapes(cluster)

    def grew(proc: str, name: str, **labels: str) -> float:
        return metrics.total(after[proc], name, **labels) - metrics.total(
            before.get(proc, {}), name, **labels
        )

    storage = [n for n in after if n.startswith("storage")]
    # Two writes of PAYLOAD reached the chain heads from clients; each was
    # replicated to 2 more targets.
    client_written = sum(
        grew(n, "chainfs_storage_write_bytes_total", source="client") for n in storage
    )
    chain_written = sum(
        grew(n, "chainfs_storage_write_bytes_total", source="chain") for n in storage
    )
    assert client_written >= 2 * len(PAYLOAD)
    assert chain_written >= 2 * 2 * len(PAYLOAD)
    assert sum(grew(n, "chainfs_storage_read_bytes_total") for n in storage) >= 2 * len(PAYLOAD)
    assert sum(grew(n, "chainfs_storage_request_seconds_count", op="update") for n in storage) > 0
    assert (
        sum(grew(n, "chainfs_storage_request_seconds_count", op="batch_read") for n in storage) > 0
    )
    # Meta: opens and closes were timed; the store committed transactions.
    assert grew("meta", "chainfs_meta_request_seconds_count", op="Open") >= 2
    assert grew("meta", "chainfs_meta_request_seconds_bucket", op="Open", le="+Inf") >= 2
    assert grew("meta", "chainfs_meta_kv_commits_total") > 0
    # mgmtd: heartbeats are timed (they come once a second, so the workload
    # above may fit between two: wait for the next); every target serves,
    # every chain is whole.
    beats_before = metrics.total(
        before["mgmtd"], "chainfs_grpc_request_seconds_count", op="Heartbeat"
    )
    deadline = time.monotonic() + 10 * HEARTBEAT_S
    while (
        metrics.total(
            scrape(cluster.metrics_addresses()["mgmtd"]),
            "chainfs_grpc_request_seconds_count",
            op="Heartbeat",
        )
        <= beats_before
    ):
        assert time.monotonic() < deadline, "no heartbeat reached mgmtd's metrics"
        time.sleep(HEARTBEAT_S / 4)
    targets = cluster.n_storage * cluster.targets_per_node
    assert metrics.total(after["mgmtd"], "chainfs_mgmtd_targets", state="serving") == targets
    assert metrics.total(after["mgmtd"], "chainfs_mgmtd_chains", state="degraded") == 0
    ages = [v for (n, _), v in after["mgmtd"].items() if n == "chainfs_mgmtd_heartbeat_age_seconds"]
    assert len(ages) == cluster.n_storage + 1 and all(0 <= a < 10 for a in ages)
    # The mount: FUSE requests by op, and the bytes its client moved.
    assert grew("mount", "chainfs_fuse_request_seconds_count", op="write") > 0
    assert grew("mount", "chainfs_fuse_request_seconds_count", op="read") > 0
    assert grew("mount", "chainfs_client_write_bytes_total") >= len(PAYLOAD)
    assert grew("mount", "chainfs_client_read_bytes_total") >= len(PAYLOAD)


def test_errors_are_counted_by_code(cluster: LocalCluster) -> None:
    assert cluster.mountpoint is not None
    before = scrape(cluster.metrics_addresses()["mount"])
    missing = Path(cluster.mountpoint) / "no-such-dir" / "x"
    with pytest.raises(FileNotFoundError):
        missing.read_bytes()
    after = scrape(cluster.metrics_addresses()["mount"])
    name = "chainfs_fuse_request_errors_total"
    got = metrics.total(after, name, op="lookup", code="ENOENT")
    assert got > metrics.total(before, name, op="lookup", code="ENOENT")


def test_killed_node_shows_in_mgmtd_metrics(tmp_path: Path) -> None:
    with LocalCluster(
        tmp_path, storage_nodes=3, heartbeat_interval_ms=200, heartbeat_timeout_ms=2000
    ) as c:
        address = c.metrics_addresses()["mgmtd"]
        c.kill_storage(2)
        deadline = time.monotonic() + 30
        while True:
            got = scrape(address)
            offline = metrics.total(got, "chainfs_mgmtd_nodes", type="storage", status="offline")
            if offline == 1:
                break
            assert time.monotonic() < deadline, "mgmtd never counted the killed node offline"
            time.sleep(0.2)
        assert metrics.total(got, "chainfs_mgmtd_targets", state="offline") == c.targets_per_node
        assert metrics.total(got, "chainfs_mgmtd_chains", state="serving") == 0


def test_admin_top_shows_live_rates(cluster: LocalCluster) -> None:
    """`chainfs admin top --json` while a client writes: per-node and total rates."""
    fs = cluster.client()
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            with fs.open(f"/m/top-{i % 4}.bin", "wb") as f:
                f.write(PAYLOAD)
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    fs.mkdir("/m", exist_ok=True)
    t.start()
    try:
        env = dict(os.environ, CHAINFS_ADDRESS=cluster.address)
        cmd = [sys.executable, "-m", "chainfs", "admin", "top", "--json"]
        out = subprocess.run(
            [*cmd, "--iterations", "2", "--interval", "1.5"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        stop.set()
        t.join(60)
    assert out.returncode == 0, out.stderr
    frames = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(frames) == 2
    types = sorted(n["type"] for n in frames[-1]["nodes"])
    assert types == ["meta", "storage", "storage", "storage"]
    assert all(not n["error"] for n in frames[-1]["nodes"])
    assert any(f["total"]["write_bytes"] > 0 for f in frames)
    assert any(f["total"]["meta_ops"] > 0 for f in frames)
