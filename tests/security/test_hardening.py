"""Attacks from another local user (uid 65534 through setpriv when the tests run as
root) against a real cluster: oversized header frames, oversized batch reads,
stalled large updates, thousands of idle sockets. Each must leave the server's
resident memory within its pool bounds while a real client's writes and reads
complete; idle sockets are closed; what the cluster wrote is owner-only."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.auth import capability
from chainfs.common.auth.secret import capability_key, load_secret
from chainfs.common.errors import Code
from chainfs.local import LocalCluster
from chainfs.proto import storage_pb2 as sp
from tests.conftest import require
from tests.integration.client_fixtures import module_cluster, pattern
from tests.security.paths import exposed_paths

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
CHUNK = 4 * MiB  # the default chunk size
STORAGE_IDLE_TIMEOUT_MS = 3_000
# Resident memory a process may gain beyond its pools (allocator slack, caches).
RSS_SLACK_BYTES = 64 * MiB
STORAGE_POOL_BYTES = 128 * MiB  # StorageConfig().dataplane.buffer_pool_bytes
ATTACKER = (Path(__file__).with_name("attacker.py")).read_text()
AS_ROOT = os.geteuid() == 0 and shutil.which("setpriv") is not None
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _configure_storage(_i: int, c: Any) -> None:
    c.dataplane.idle_timeout_ms = STORAGE_IDLE_TIMEOUT_MS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(
        tmp_path_factory,
        "hardening",
        storage_nodes=1,
        targets_per_node=1,
        replicas=1,
        configure_storage=_configure_storage,
    )


class Attack:
    """The attacker script running as uid 65534 (as this user when not root)."""

    def __init__(self, mode: str, **args: Any) -> None:
        python = "/usr/bin/python3" if AS_ROOT else sys.executable
        cmd = [*(NOBODY if AS_ROOT else []), python, "-c", ATTACKER]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"mode": mode, **args}) + "\n")
        self.proc.stdin.flush()
        ready = self.proc.stdout.readline()
        assert ready, f"attacker {mode} failed to start"
        self.ready = json.loads(ready)["ready"]

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        self.proc.wait(timeout=60)
        return out

    def __enter__(self) -> Attack:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


class PeakRss:
    """How far a process's resident memory rose above where it was at the start
    (the kernel's high-water mark, reset here, so a spike freed again counts)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        self.before = _status_bytes(pid, "VmRSS")

    def grown(self) -> int:
        return _status_bytes(self.pid, "VmHWM") - self.before


def socket_fds(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            count += os.readlink(fd).startswith("socket:")
    return count


def _pid(proc: Any) -> int:
    assert proc is not None and proc.proc is not None
    return int(proc.proc.pid)


def _target_dir(cluster: LocalCluster) -> Path:
    info = cluster.storage[0].info
    return Path(str(info["targets"][str(info["target_ids"][0])]))


def _roundtrip(cluster: LocalCluster, path: str, size: int) -> None:
    """A real client writes ``size`` bytes and reads back the same bytes."""
    data = pattern(size, path)
    with cluster.client() as fs:
        with fs.open(path, "wb") as f:
            f.write(data)
        with fs.open(path, "rb") as f:
            assert f.read() == data


def test_oversized_header_frames_keep_meta_memory_bounded(cluster: LocalCluster) -> None:
    meta = _pid(cluster.meta)
    address = str(cluster.meta.info["data_address"]) if cluster.meta else ""
    _roundtrip(cluster, "/warm-meta", 1024)
    # The 41-byte frames that used to cost 16 MiB each, then frames at the cap.
    for header_len in (16 * MiB, MiB):
        peak = PeakRss(meta)
        with Attack("headers", address=address, n=16, header_len=header_len) as attack:
            _roundtrip(cluster, f"/during-headers-{header_len}", 1024)
            grown = peak.grown()
            attack.finish()
        assert grown < RSS_SLACK_BYTES, f"meta grew by {grown >> 20} MiB"


def test_oversized_batch_reads_are_refused_before_reading(cluster: LocalCluster) -> None:
    _roundtrip(cluster, "/big", CHUNK)
    with cluster.client() as fs:
        inode = fs.stat("/big").st_ino
    storage = cluster.storage[0]
    target_id = int(storage.info["target_ids"][0])
    chain_id = _chain_of(cluster, target_id)
    # The attacker is a user who may read the file: it holds a valid capability.
    cap = capability.sign(
        capability_key(load_secret(cluster.secret_file)), 1, inode, capability.READ, b"", 60_000
    )
    for ios, length in ((256, CHUNK), (4096, 64 * MiB)):
        req = sp.BatchReadReq()
        req.capabilities.append(cap)
        for _ in range(ios):
            io = req.ios.add(chain_id=chain_id, target_id=target_id, offset=0, length=length)
            io.chunk.inode = inode
            io.chunk.index = 0
        peak = PeakRss(_pid(storage))
        with Attack(
            "batch",
            address=str(storage.info["data_address"]),
            n=4,
            header_hex=req.SerializeToString().hex(),
        ) as attack:
            _roundtrip(cluster, f"/during-batch-{ios}", CHUNK)
            result = attack.finish()
        grown = peak.grown()
        assert grown < RSS_SLACK_BYTES, f"storage grew by {grown >> 20} MiB"
        assert result["replies"] == [{"error": True, "status": Code.E2BIG, "payload": 0}] * 4


def test_unread_batch_replies_do_not_hold_back_other_readers(cluster: LocalCluster) -> None:
    storage = cluster.storage[0]
    pid = _pid(storage)
    _roundtrip(cluster, "/big-unread", CHUNK)
    with cluster.client() as fs:
        inode = fs.stat("/big-unread").st_ino
    target_id = int(storage.info["target_ids"][0])
    chain_id = _chain_of(cluster, target_id)
    req = sp.BatchReadReq()
    for _ in range(16):  # 64 MiB: a reply that fits a frame and the read pool
        io = req.ios.add(chain_id=chain_id, target_id=target_id, length=CHUNK)
        io.chunk.inode = inode
    peak = PeakRss(pid)
    with Attack(
        "batch",
        address=str(storage.info["data_address"]),
        n=4,
        header_hex=req.SerializeToString().hex(),
        trickle_s=1,  # 64 KiB a second keeps clear of frame_stall_timeout_ms
    ) as attack:
        # Another client reads while the attacker's replies sit unread.
        _roundtrip(cluster, "/during-unread", 2 * CHUNK)
        grown = peak.grown()
        result = attack.finish()
    read_pool_bytes = 96 * MiB  # StorageConfig().max_read_bytes_in_flight
    assert grown < read_pool_bytes + RSS_SLACK_BYTES, f"storage grew by {grown >> 20} MiB"
    assert result["closed"] >= 1  # the server dropped readers that did not read


def _chain_of(cluster: LocalCluster, target_id: int) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "chainfs", "admin", "targets", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CHAINFS_ADDRESS": cluster.address},
        timeout=60,
    )
    rows = json.loads(out.stdout)
    return next(int(r["chain_id"]) for r in rows if int(r["target_id"]) == target_id)


def test_trickled_large_updates_do_not_hold_back_other_writers(cluster: LocalCluster) -> None:
    storage = cluster.storage[0]
    pid = _pid(storage)
    _roundtrip(cluster, "/warm-storage", CHUNK)
    peak = PeakRss(pid)
    with Attack(
        "stall", address=str(storage.info["data_address"]), n=4, payload_len=65 * MiB, trickle_s=1
    ) as attack:
        # Another client's 16 MiB write completes while the trickling senders hold on
        # (a byte a second keeps clear of frame_stall_timeout_ms).
        _roundtrip(cluster, "/during-stall", 16 * MiB)
        grown = peak.grown()
        result = attack.finish()
    assert grown < STORAGE_POOL_BYTES + RSS_SLACK_BYTES, f"storage grew by {grown >> 20} MiB"
    assert result["closed"] >= 1  # the server dropped slow senders to serve the writer


def test_real_client_is_served_while_5000_idle_sockets_are_open(cluster: LocalCluster) -> None:
    meta = _pid(cluster.meta)
    address = str(cluster.meta.info["data_address"]) if cluster.meta else ""
    peak = PeakRss(meta)
    with Attack("idle", address=address, n=5000, source="127.0.0.2") as attack:
        assert attack.ready == 5000
        _roundtrip(cluster, "/during-idle-flood", CHUNK)
        held = socket_fds(meta)
        grown = peak.grown()
        attack.finish()
    # One host gets max_connections_per_address (256) of them; the rest are refused.
    assert held < 256 + 64, f"meta holds {held} sockets"
    assert grown < RSS_SLACK_BYTES, f"meta grew by {grown >> 20} MiB"


def test_idle_connections_are_closed(cluster: LocalCluster) -> None:
    storage = cluster.storage[0]
    _roundtrip(cluster, "/before-idle", 1024)
    # The attacker itself watches its connections: a count of the server's
    # sockets said "closed" before a busy server had even accepted them.
    wait_s = 20 * STORAGE_IDLE_TIMEOUT_MS / 1000
    address = str(storage.info["data_address"])
    with Attack("idle", address=address, n=10, source="127.0.0.2", wait_closed_s=wait_s) as a:
        result = a.finish()
    assert result["closed"] == 10
    # The client's own idle connections were closed too: it reconnects unseen.
    _roundtrip(cluster, "/after-idle", 1024)


def test_cluster_paths_are_owner_only(cluster: LocalCluster) -> None:
    _roundtrip(cluster, "/modes", CHUNK)
    exposed = exposed_paths(cluster.base_dir)
    assert not exposed, "open to others:\n" + "\n".join(exposed[:20])
    target = _target_dir(cluster)
    chunk_files = [p for p in (target / "data").rglob("*") if p.is_file()]
    assert chunk_files
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in chunk_files)


def test_other_users_cannot_read_chunks_and_use_tcp(cluster: LocalCluster) -> None:
    require("root (to run as uid 65534 with setpriv)", AS_ROOT)
    _roundtrip(cluster, "/secret", 1024)
    storage = cluster.storage[0]
    target = _target_dir(cluster)
    chunk = next(p for p in (target / "data").rglob("*") if p.is_file())
    with Attack("read", path=str(chunk)) as attack:
        assert attack.finish()["errno"] == errno.EACCES
    with Attack("unix", path=str(storage.info["unix_socket"])) as attack:
        assert attack.finish()["errno"] == errno.EACCES
