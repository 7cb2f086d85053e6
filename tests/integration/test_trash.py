"""The trash with delayed deletion, through real processes: with
meta.trash_retention_ms above 0 a removed file leaves its directory, is listed
by `admin trash list`, comes back byte for byte on restore, and on purge (by
hand or at expiry) goes to GC; at 0, removal is immediate as before."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chainfs.client.sync import FileSystem
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import module_cluster, pattern

pytestmark = pytest.mark.timeout(240)

CLI = [sys.executable, "-m", "chainfs", "admin"]
LONG_RETENTION_MS = 3_600_000
SHORT_RETENTION_MS = 1_000
WAIT_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    def meta(_i: int, cfg: Any) -> None:
        cfg.trash_retention_ms = LONG_RETENTION_MS
        cfg.cluster_config_poll_ms = 200
        cfg.trash_purge_interval_ms = 100
        cfg.gc_interval_ms = 100

    yield from module_cluster(tmp_path_factory, "trash", configure_meta=meta)


def admin(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, *args, "--address", cluster.address, "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def admin_json(cluster: LocalCluster, *args: str) -> Any:
    out = admin(cluster, *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def entries(cluster: LocalCluster) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = admin_json(cluster, "trash", "list")
    return rows


def poll(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def set_retention(cluster: LocalCluster, ms: int) -> None:
    async def set_it() -> None:
        async with MgmtClient(cluster.address) as mgmt:
            await mgmt.set_config("meta.trash_retention_ms", str(ms))

    asyncio.run(set_it())


def used_inodes(fs: FileSystem) -> int:
    s = fs.statfs()
    return s.f_files - s.f_ffree


def test_remove_list_restore_purge(cluster: LocalCluster) -> None:
    fs = cluster.client()
    fs.mkdir("/t")
    baseline = used_inodes(fs)
    data = pattern(300_000, "trash")
    fs.write_file("/t/a.bin", data)
    fs.remove("/t/a.bin")
    assert "a.bin" not in fs.listdir("/t")
    [rec] = [e for e in entries(cluster) if e["orig_name"] == "a.bin"]
    assert rec["size_bytes"] == len(data) and rec["entry"].endswith("-a.bin")
    assert rec["due_ms"] - rec["removed_ms"] == LONG_RETENTION_MS

    admin_json(cluster, "trash", "restore", rec["entry"])
    assert fs.read_file("/t/a.bin") == data
    assert entries(cluster) == []
    again = admin(cluster, "trash", "restore", rec["entry"])
    assert again.returncode != 0 and "no trash entry" in again.stderr

    fs.remove("/t/a.bin")
    [rec] = entries(cluster)
    fs.write_file("/t/a.bin", b"new")
    taken = admin(cluster, "trash", "restore", rec["entry"])
    assert taken.returncode != 0 and "exists" in taken.stderr
    admin_json(cluster, "trash", "restore", rec["entry"], "--to", "/t/b.bin")
    assert fs.read_file("/t/b.bin") == data and fs.read_file("/t/a.bin") == b"new"

    fs.remove("/t/b.bin")
    fs.remove("/t/a.bin")
    collected = admin_json(cluster, "gc-status")["collected_files"]
    assert admin_json(cluster, "trash", "purge", "--all") == {"purged": 2}
    assert entries(cluster) == []
    assert sorted(fs.listdir("/t")) == []
    # the written file's chunks went to GC: it collects it and the inodes are free again
    poll(lambda: admin_json(cluster, "gc-status")["collected_files"] > collected, "GC")
    trash_dirs = 2  # /.trash and /.trash/<uid>, made by the first removal, stay
    poll(lambda: used_inodes(fs) == baseline + trash_dirs, "inodes freed")


def retention_applied(cluster: LocalCluster, fs: FileSystem, ms: int) -> None:
    """Wait until meta trashes removed files with retention ``ms`` (a probe per try)."""
    probes = iter(range(1_000_000))

    def applied() -> bool:
        path = f"/x/p{next(probes)}"
        fs.write_file(path, b"probe")
        fs.remove(path)
        return any(r["due_ms"] - r["removed_ms"] == ms for r in entries(cluster))

    poll(applied, f"retention {ms} ms to reach meta")


def test_expiry_then_off(cluster: LocalCluster) -> None:
    fs = cluster.client()
    fs.mkdir("/x")
    set_retention(cluster, SHORT_RETENTION_MS)
    retention_applied(cluster, fs, SHORT_RETENTION_MS)
    for r in entries(cluster):  # probes removed before the change reached meta
        if r["due_ms"] - r["removed_ms"] != SHORT_RETENTION_MS:
            admin_json(cluster, "trash", "purge", r["entry"])
    poll(lambda: entries(cluster) == [], "expired entries purged by meta")
    assert fs.listdir("/x") == []

    set_retention(cluster, LONG_RETENTION_MS)  # so a trashed probe below stays listed
    retention_applied(cluster, fs, LONG_RETENTION_MS)
    set_retention(cluster, 0)
    tries = iter(range(1_000_000))

    def removal_immediate() -> bool:
        name = f"last{next(tries)}"
        fs.write_file(f"/x/{name}", b"x")
        fs.remove(f"/x/{name}")
        return all(r["orig_name"] != name for r in entries(cluster))

    poll(removal_immediate, "trash off to reach meta")
    admin_json(cluster, "trash", "purge", "--all")
    fs.write_file("/x/f", b"gone")
    fs.remove("/x/f")
    assert fs.listdir("/x") == [] and entries(cluster) == []
