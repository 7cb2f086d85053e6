"""`chainfs up` and LocalCluster: start, serve, stop cleanly, clean up after failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chainfs.common.errors import ChainfsError
from chainfs.local import LocalCluster
from tests.conftest import require_binary

pytestmark = pytest.mark.timeout(180)


def _ours(base: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions ``base`` (ours: unique tmp dirs)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(base) in a for a in p.info["cmdline"] or []) and p.status() != "zombie":
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _wait_gone(base: Path, timeout_s: float = 20.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = _ours(base)
        if not left:
            return []
        time.sleep(0.1)
    return _ours(base)


def test_chainfs_up_sample_data_then_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "up"
    cmd = [sys.executable, "-m", "chainfs", "up", "--data", str(data), "--sample-data"]
    log = tmp_path / "up.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "serving;" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert "address: 127.0.0.1:" in text
        assert "targets_serving" in text and "chains_total" in text  # admin status
        assert "sample data: wrote and verified 6 files" in text
        pids = [json.loads(f.read_text())["pid"] for f in data.glob("*/*.ready.json")]
        assert len(pids) == 5  # mgmtd, 3 storage nodes, meta
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert log.read_text().rstrip().endswith("stopped")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert not _wait_gone(data)


def test_start_failure_stops_what_was_started(tmp_path: Path) -> None:
    with pytest.raises(ChainfsError):
        # Too short to bring storage up: start-up fails half-way.
        LocalCluster(tmp_path / "c", start_timeout_s=0.05)
    assert not _wait_gone(tmp_path / "c")
    with pytest.raises(ChainfsError, match="replicas"):
        LocalCluster(tmp_path / "d", storage_nodes=2, replicas=3)
    assert not (tmp_path / "d").exists() or not _ours(tmp_path / "d")


def test_etcd_backed_cluster(tmp_path: Path) -> None:
    require_binary("etcd")
    base = tmp_path / "etcd-cluster"
    with LocalCluster(base, storage_nodes=2, targets_per_node=1, replicas=2, kv="etcd") as c:
        fs = c.client()
        fs.mkdir("/on-etcd")
        fs.write_file("/on-etcd/f", b"x" * 5_000_000)
        assert fs.read_file("/on-etcd/f") == b"x" * 5_000_000
        assert fs.listdir("/on-etcd") == ["f"]
        assert set(c.pids()) == {"mgmtd", "storage0", "storage1", "meta"}
        c.kill_storage(1)
        assert c.dead_processes() == []  # killed on purpose: not reported as dead
        c.restart_storage(1)
    assert not _wait_gone(base)
    assert c.dead_processes() == []
    c.stop()  # idempotent
    assert os.path.isdir(base / "etcd")
