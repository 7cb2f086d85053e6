"""Everyday operator commands on real processes: `chainfs up` keeps its address
across restarts, passes -o to its mount, and `chainfs umount` detaches a mount."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import chainfs
from chainfs.local import LocalCluster
from tests.conftest import require_binary
from tests.integration.fuse_fixtures import is_mounted, require_fuse

pytestmark = pytest.mark.timeout(300)

_UP_START_S = 120.0


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, as an operator would pick:
    an ephemeral one could be taken by any outgoing connection between the two
    starts of the restart test, and the address could then not be kept."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def _chainfs(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "chainfs", *args]
    env = dict(os.environ, COLUMNS="240")  # tables wide enough to hold every cell
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)


@contextmanager
def chainfs_up(data: Path, *args: str) -> Iterator[str]:
    """`chainfs up --data DATA ARGS` as a subprocess until it serves; its address.

    Stopped with SIGINT (Ctrl-C) at the end; it must exit 0."""
    log = data.parent / f"{data.name}-up.out"
    cmd = [sys.executable, "-m", "chainfs", "up", "--data", str(data), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + _UP_START_S
        while "serving;" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        m = re.search(r"^address: (\S+)$", log.read_text(), re.M)
        assert m is not None, log.read_text()
        yield m.group(1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_keeps_its_address_and_data_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "up"
    port = _free_port()
    with chainfs_up(data, "--port", str(port)) as address:
        assert address == f"127.0.0.1:{port}"
        with chainfs.connect(address) as fs:
            fs.write_file("/kept.bin", b"written before the restart" * 1000)
    # No --port: the data directory remembers it.
    with chainfs_up(data) as again:
        assert again == address
        with chainfs.connect(again) as fs:
            assert fs.read_file("/kept.bin") == b"written before the restart" * 1000
    # Someone else listens there now: a clear failure naming the port, no new port.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        out = _chainfs("up", "--data", str(data), timeout_s=_UP_START_S)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"port {port}" in out.stderr and "in use" in out.stderr, out.stderr
    assert "address:" not in out.stdout


def test_up_rejects_a_port_taken_before_it_starts(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        out = _chainfs("up", "--data", str(tmp_path / "up"), "--port", str(port))
    assert out.returncode == 1 and f"port {port}" in out.stderr, out.stderr
    assert not (tmp_path / "up" / "ports.json").exists()


def test_up_refuses_several_metas_on_the_embedded_store(tmp_path: Path) -> None:
    out = _chainfs("up", "--data", str(tmp_path / "up"), "--metas", "2")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--metas 2" in out.stderr and "--kv etcd" in out.stderr, out.stderr
    assert not (tmp_path / "up").exists()  # refused before anything was made


def test_up_runs_several_metas_on_a_shared_store_and_clients_use_each(tmp_path: Path) -> None:
    """`chainfs up --kv etcd --metas 2`: both meta servers register, clients
    spread over them, and every file written through either reads back."""
    require_binary("etcd")
    data = tmp_path / "up"
    args = ("--kv", "etcd", "--metas", "2", "--storage-nodes", "1", "--replicas", "1")
    with chainfs_up(data, *args) as address:
        nodes = json.loads(_admin(address, "nodes", "--json").stdout)
        metas = [n for n in nodes if n["type"] == "meta"]
        assert len(metas) == 2 and all(n["status"] == "online" for n in metas), nodes
        # Each client picks one meta at random: 24 clients leave one unused
        # with probability 2**-23.
        files = {f"/c{i}.bin": os.urandom(1000 + i) for i in range(24)}
        for path, body in files.items():
            with chainfs.connect(address) as fs:
                fs.write_file(path, body)
        with chainfs.connect(address) as fs:
            assert {p: fs.read_file(p) for p in files} == files
        log = (data.parent / f"{data.name}-up.out").read_text()
        urls = re.findall(r"metrics (meta\d*): (http://\S+/metrics)", log)
        assert sorted(name for name, _ in urls) == ["meta", "meta1"], log
        for name, url in urls:
            served = _opened(url)
            assert served > 0, f"{name} served no Open"


def _opened(url: str) -> float:
    """Opens a meta server answered, from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    m = re.search(r'^chainfs_meta_request_seconds_count\{op="Open"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="chainfs-ops-"))
    d.chmod(0o755)
    yield d
    if not is_mounted(d / "mnt"):
        shutil.rmtree(d, ignore_errors=True)


def _stat_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    setpriv = require_binary("setpriv")
    cmd = [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", "stat", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def test_up_mount_options_reach_the_mount(public_dir: Path) -> None:
    require_fuse()
    data, mnt = public_dir / "up", public_dir / "mnt"
    with chainfs_up(data, "--mount", str(mnt), "-o", "allow_other"):
        assert is_mounted(mnt)
        seen = _stat_as_nobody(mnt)
        assert seen.returncode == 0, seen.stderr
    assert not is_mounted(mnt)
    with chainfs_up(data, "--mount", str(mnt)):
        seen = _stat_as_nobody(mnt)
        assert seen.returncode != 0 and "Permission denied" in seen.stderr, seen


def test_umount_detaches_a_chainfs_mount_and_waits_for_its_process(
    tmp_path: Path, public_dir: Path
) -> None:
    require_fuse()
    other = public_dir / "plain"
    other.mkdir()
    out = _chainfs("umount", str(other))
    assert out.returncode == 1 and "not a chainfs mount" in out.stderr, out.stderr
    mnt = public_dir / "mnt"
    with LocalCluster(tmp_path / "c", storage_nodes=1, replicas=1, mount=mnt) as c:
        (mnt / "f").write_bytes(b"through the mount")
        mount_proc = c._mount_proc
        assert mount_proc is not None and mount_proc.alive()
        out = _chainfs("umount", str(mnt))
        assert out.returncode == 0, out.stderr
        assert f"mount process {mount_proc.pid} exited" in out.stdout
        assert not is_mounted(mnt)
        assert mount_proc.proc is not None and mount_proc.proc.poll() is not None
        assert c.client().read_file("/f") == b"through the mount"
        again = _chainfs("umount", str(mnt))
        assert again.returncode == 1 and "not a chainfs mount" in again.stderr
    assert os.listdir(mnt) == []


def _admin(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _chainfs("admin", *args, "--address", address, timeout_s=120)


def test_online_target_waits_until_serving_and_watch_explains_itself(tmp_path: Path) -> None:
    """online-target returns once the target serves again (its resync done, the
    bytes written while it was out on it); sync-status --watch says what it waits
    for instead of exiting silently; admin tables print sizes readable."""
    with tiny_resync_cluster(tmp_path) as c:
        fs = c.client()
        victim = int(json.loads(_admin(c.address, "chains", "--json").stdout)[0]["targets"][0])
        assert _admin(c.address, "offline-target", str(victim)).returncode == 0
        files = {f"/f{i}": os.urandom(300_000 + i) for i in range(12)}
        for path, data in files.items():
            fs.write_file(path, data)
        held = _admin(c.address, "sync-status", "--watch")
        assert held.returncode == 0 and "no target is waiting for or doing a resync" in held.stdout
        released = _admin(c.address, "online-target", "--no-wait", str(victim))
        assert released.returncode == 0, released.stderr
        assert "resyncing; watch with `chainfs admin sync-status --watch`" in released.stdout
        watched = _admin(c.address, "sync-status", "--watch")
        assert watched.returncode == 0, watched.stderr
        assert "waiting for target(s)" in watched.stdout or "resync done" in watched.stdout
        assert _state(c.address, victim) == "serving"
        # Out again, more writes; this time online-target itself waits.
        assert _admin(c.address, "offline-target", str(victim)).returncode == 0
        fs.write_file("/late", os.urandom(700_000))
        back = _admin(c.address, "online-target", str(victim), "--json")
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout)[0]["state"] == "serving"
        assert _state(c.address, victim) == "serving"
        table = _admin(c.address, "targets").stdout
        assert re.search(r"│ +\d+\.\d [KMGTP]iB │", table), table  # used_bytes
        raw = json.loads(_admin(c.address, "targets", "--json").stdout)
        assert all(isinstance(r["used_bytes"], int) for r in raw)


def _state(address: str, target_id: int) -> str:
    rows = json.loads(_admin(address, "targets", "--json").stdout)
    return str(next(r["state"] for r in rows if r["target_id"] == target_id))


def tiny_resync_cluster(base: Path) -> LocalCluster:
    """3 nodes, 3 replicas, a resync slowed to 1 MiB/s so it is seen running."""

    def configure(i: int, c: Any) -> None:
        c.failure.resync_scan_interval_ms = 100
        c.failure.resync_rate_bytes_per_s = 1024 * 1024
        c.failure.resync_report_interval_ms = 100

    return LocalCluster(
        base,
        storage_nodes=3,
        targets_per_node=1,
        replicas=3,
        heartbeat_interval_ms=300,
        heartbeat_timeout_ms=3000,
        configure_storage=configure,
    )
