"""A `chainfs agent` (shared-memory I/O) started by a workload, stopped when it ends."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from chainfs.bench.context import WorkloadFailed

_POLL_S = 0.05
_STOP_TIMEOUT_S = 30.0


@contextlib.contextmanager
def running_agent(address: str, workers: int, start_timeout_s: float) -> Iterator[str]:
    """Start `chainfs agent --workers N` for the cluster at ``address``; its socket path.

    The socket lives in a fresh directory under the system temp (short: unix socket
    paths end at 108 bytes); the agent is stopped (SIGTERM, then SIGKILL) and the
    directory removed on exit."""
    base = Path(tempfile.mkdtemp(prefix="cfsa-"))
    socket, ready, log_path = str(base / "agent.sock"), base / "ready", base / "agent.log"
    cmd = [sys.executable, "-m", "chainfs", "agent", "--address", address, "--socket", socket,
           "--workers", str(workers), "--ready-file", str(ready)]  # fmt: skip
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, ready, log_path, start_timeout_s)
            yield socket
        finally:
            proc.terminate()  # the agent stops its workers
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(
    proc: subprocess.Popen[bytes], ready: Path, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise WorkloadFailed(f"chainfs agent exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise WorkloadFailed(f"chainfs agent not ready after {timeout_s:.0f}s")
        time.sleep(_POLL_S)
    workers = json.loads(ready.read_text()).get("workers")
    if not isinstance(workers, list) or not workers:
        raise WorkloadFailed(f"chainfs agent ready file without workers: {ready.read_text()!r}")
