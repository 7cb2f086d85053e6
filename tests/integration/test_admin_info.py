"""Operator commands and figures on a real cluster: `admin info`, the bytes a
target holds and the disk capacity counted once, `admin config` accepting only
keys a service reads (and meta applying one), error texts naming the user's
path, and parquet through fsspec/pyarrow by URL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import CHUNK, module_cluster, pattern

pytestmark = pytest.mark.timeout(180)
REPLICAS = 2
CONFIG_POLL_MS = 200
CLI = [sys.executable, "-m", "chainfs", "admin"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    def meta(_i: int, cfg: Any) -> None:
        cfg.cluster_config_poll_ms = CONFIG_POLL_MS
        cfg.gc_interval_ms = 3_600_000  # GC runs when `admin gc` asks (and once at start)

    yield from module_cluster(
        tmp_path_factory,
        "admin-info",
        storage_nodes=2,
        targets_per_node=2,
        replicas=REPLICAS,
        heartbeat_interval_ms=200,
        configure_meta=meta,
    )


def admin(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
    )


def admin_json(address: str, *args: str) -> Any:
    out = admin(address, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def set_config(address: str, key: str, value: str) -> int:
    async with MgmtClient(address) as mgmt:
        return await mgmt.set_config(key, value)


def poll(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_info_shows_inode_layout_and_every_replica(cluster: LocalCluster) -> None:
    fs = cluster.client()
    data = pattern(3 * CHUNK + 100, "info")
    fs.mkdir("/info", exist_ok=True)
    fs.write_file("/info/f.bin", data)
    obj = admin_json(cluster.address, "info", "/info/f.bin")
    st = fs.stat("/info/f.bin")
    assert obj["inode"] == st.st_ino and obj["type"] == "file"
    assert obj["size_bytes"] == len(data) and obj["chunk_size"] == CHUNK
    assert obj["mode"] == f"{st.st_mode & 0o7777:04o}" and obj["uid"] == st.st_uid
    assert obj["chunks_total"] == 4 and obj["chunks_shown"] == 4
    for chunk in obj["chunks"]:
        chain = obj["chains"][chunk["index"] % obj["stripe"]]
        assert chunk["chain_id"] == chain
        lengths = {r["length"] for r in chunk["replicas"]}
        assert lengths == {100 if chunk["index"] == 3 else CHUNK}, chunk
        assert len(chunk["replicas"]) == REPLICAS
        assert all(r["present"] and r["state"] == "serving" for r in chunk["replicas"])
    bounded = admin_json(cluster.address, "info", "/info/f.bin", "--chunks", "1")
    assert bounded["chunks_shown"] == 1 and [c["index"] for c in bounded["chunks"]] == [0]
    table = admin(cluster.address, "info", "/info/f.bin")
    assert table.returncode == 0 and "/info/f.bin" in table.stdout and "serving" in table.stdout
    d = admin_json(cluster.address, "info", "/info")
    assert d["type"] == "directory" and d["chunks"] == []
    missing = admin(cluster.address, "info", "/info/nope")
    assert missing.returncode != 0 and "/info/nope" in missing.stderr


def test_targets_report_the_bytes_they_hold_and_disks_count_once(cluster: LocalCluster) -> None:
    fs = cluster.client()
    fs.mkdir("/used", exist_ok=True)
    before = sum(t["used_bytes"] for t in admin_json(cluster.address, "targets"))
    data = pattern(2 * CHUNK + 777, "used")
    fs.write_file("/used/f.bin", data)

    def held() -> int:
        return sum(t["used_bytes"] for t in admin_json(cluster.address, "targets"))

    # Every replica holds the file's bytes, and nothing else of this disk counts.
    poll(lambda: held() == before + REPLICAS * len(data), 30, "heartbeats with the new bytes")
    # All targets share the disk under base_dir: its capacity counts once.
    sv = os.statvfs(cluster.base_dir)
    disk = sv.f_blocks * sv.f_frsize
    status = admin_json(cluster.address, "status")
    assert status["capacity_bytes"] == disk
    vfs = fs.statfs()
    assert vfs.f_blocks * vfs.f_frsize == pytest.approx(disk // REPLICAS, abs=vfs.f_frsize)


def test_config_takes_only_keys_a_service_reads(cluster: LocalCluster) -> None:
    bad = admin(cluster.address, "config", "set", "foo", "bar")
    assert bad.returncode != 0 and "unknown config key 'foo'" in bad.stderr
    assert "meta.gc_delay_ms" in bad.stderr  # says what is settable
    wrong_type = admin(cluster.address, "config", "set", "meta.gc_delay_ms", "soon")
    assert wrong_type.returncode != 0 and "int" in wrong_type.stderr
    negative = subprocess.run(
        [*CLI, "config", "set", "--address", cluster.address, "--", "meta.gc_delay_ms", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert negative.returncode != 0 and ">= 0" in negative.stderr
    # mgmtd itself refuses, whatever client asks.
    for key, value in (("foo", "bar"), ("meta.gc_delay_ms", "soon")):
        with pytest.raises(ChainfsError) as refused:
            asyncio.run(set_config(cluster.address, key, value))
        assert refused.value.code == Code.EINVAL
    assert all(r["key"] != "foo" for r in admin_json(cluster.address, "config", "get"))
    keys = json.loads(
        subprocess.run(
            [*CLI, "config", "keys", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert {k["key"]: k["read_by"] for k in keys}["meta.gc_delay_ms"] == "meta"
    assert all(k["key"].startswith("meta.") for k in keys)  # the prefix meta applies


def test_meta_applies_a_cluster_setting(cluster: LocalCluster) -> None:
    """meta.gc_delay_ms set at run time: a file removed afterwards keeps its chunks."""
    fs = cluster.client()
    fs.write_file("/kept.bin", pattern(1000, "kept"))
    ino = fs.stat("/kept.bin").st_ino
    out = admin_json(cluster.address, "config", "set", "meta.gc_delay_ms", "600000")
    assert out["read_by"] == "meta"
    time.sleep(10 * CONFIG_POLL_MS / 1000)  # several polls: meta has the new value
    try:
        fs.remove("/kept.bin")
        assert admin_json(cluster.address, "gc")["collected_files"] == 0  # not due yet
        rows = admin_json(cluster.address, "query-chunk", str(ino), "0")
        assert [r["present"] for r in rows] == [True] * REPLICAS, rows
    finally:
        admin_json(cluster.address, "config", "set", "meta.gc_delay_ms", "0")


def test_errors_name_the_users_path_not_inodes(cluster: LocalCluster) -> None:
    fs = cluster.client()
    fs.mkdir("/err", exist_ok=True)
    with pytest.raises(FileNotFoundError) as info:
        fs.open("/err/ckpt/step-1.pt", "rb")
    text = str(info.value)
    assert text == "[Errno 2] No such file or directory: '/err/ckpt/step-1.pt'", text
    fs.write_file("/err/f", b"x")
    with pytest.raises(NotADirectoryError) as info2:
        fs.listdir("/err/f/sub")
    assert "directory " + str(fs.stat("/err").st_ino) not in str(info2.value)
    assert "'/err/f/sub'" in str(info2.value)


def test_parquet_by_url_through_fsspec_and_pyarrow(cluster: LocalCluster) -> None:
    """What the README shows: pyarrow has no hook for a new URL scheme
    (FileSystem.from_uri refuses chainfs://), so the chainfs fsspec filesystem is
    handed to pyarrow, or the URL is opened with fsspec."""
    fsspec = pytest.importorskip("fsspec")
    pa = pytest.importorskip("pyarrow")
    pafs = pytest.importorskip("pyarrow.fs")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(1000)), "name": [f"row-{i}" for i in range(1000)]})
    url = f"chainfs://{cluster.address}/arrow/t.parquet"
    with pytest.raises(pa.ArrowInvalid):
        pafs.FileSystem.from_uri(url)
    cfs, path = fsspec.core.url_to_fs(url)
    cfs.makedirs("/arrow", exist_ok=True)
    pq.write_table(table, path, filesystem=cfs)  # pyarrow wraps an fsspec filesystem itself
    assert pq.read_table(path, filesystem=cfs).equals(table)
    assert pq.read_table(fsspec.open(url).open()).equals(table)  # the README's one line
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(cfs))
    assert pq.read_table(path, filesystem=arrow_fs).equals(table)


def test_gc_status_and_a_gc_round_on_demand(cluster: LocalCluster) -> None:
    """Files removed while meta.gc_delay_ms holds them back wait in the queue
    (gc-status counts them and their bytes); once due, `admin gc` collects them."""
    fs = cluster.client()
    fs.mkdir("/gc", exist_ok=True)
    sizes = {f"/gc/f{i}": 1000 * (i + 1) for i in range(3)}
    for p, n in sizes.items():
        fs.write_file(p, pattern(n, p))
    inos = [fs.stat(p).st_ino for p in sizes]
    admin_json(cluster.address, "config", "set", "meta.gc_delay_ms", "4000")
    time.sleep(10 * CONFIG_POLL_MS / 1000)
    try:
        before = admin_json(cluster.address, "gc-status")
        for p in sizes:
            fs.remove(p)
        queued = admin_json(cluster.address, "gc-status")
        assert queued["counted_all"] is True
        assert queued["queued_files"] == before["queued_files"] + 3
        assert queued["queued_bytes"] == before["queued_bytes"] + sum(sizes.values())
        assert queued["oldest_age_s"] is not None and queued["oldest_age_s"] >= 0
        assert queued["due_files"] == before["due_files"]  # held back by the delay
    finally:
        admin_json(cluster.address, "config", "set", "meta.gc_delay_ms", "0")
    time.sleep(4)  # past the delay: due now
    status_before_gc = admin_json(cluster.address, "gc-status")
    ran = admin_json(cluster.address, "gc")
    assert ran["collected_files"] == 3, (status_before_gc, ran)
    assert ran["collected_files"] == 3 and ran["removed_chunks"] >= 3, ran

    def gone() -> bool:
        outs = [admin(cluster.address, "query-chunk", str(i), "0") for i in inos]
        return all(o.returncode == 1 and "is on no target" in o.stderr for o in outs)

    poll(gone, 30, "the removed files' chunks dropped from storage")
    assert admin_json(cluster.address, "gc-status")["queued_files"] == before["queued_files"]
