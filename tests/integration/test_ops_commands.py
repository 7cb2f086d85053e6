"""Everyday operator commands on real processes: `chainfs up` keeps its address
across restarts, passes -o to its mount, and `chainfs umount` detaches a mount."""

from __future__ import annotations

import os
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

import pytest

import chainfs
from chainfs.local import LocalCluster
from tests.conftest import require_binary
from tests.integration.fuse_fixtures import is_mounted, require_fuse

pytestmark = pytest.mark.timeout(300)

_UP_START_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chainfs(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "chainfs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


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
