"""`chainfs up` keeps what it writes to itself: its data directory is 0700 and
nothing under it (configs, logs, KV store, chunk files, sockets) is open to
group or others."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.security.paths import exposed_paths

pytestmark = pytest.mark.timeout(300)


def test_chainfs_up_data_is_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "up"
    cmd = [sys.executable, "-m", "chainfs", "up", "--data", str(data), "--sample-data"]
    cmd += ["--storage-nodes", "1", "--targets-per-node", "1", "--replicas", "1"]
    log = tmp_path / "up.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "serving;" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        chunk_files = [p for p in data.rglob("*") if p.is_file() and p.parent.parent.name == "data"]
        assert chunk_files, "the sample data left no chunk files"
        assert exposed_paths(data) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
