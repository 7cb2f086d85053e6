"""A `chainfs agent` process for tests: started with a ready file, killed or stopped on demand."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

AGENT_START_TIMEOUT_S = 60.0


class AgentProcess:
    """One `chainfs agent --workers N` serving ``socket`` for the cluster at ``address``."""

    def __init__(self, address: str, base: Path, workers: int = 2) -> None:
        self.address = address
        self.base = base
        self.workers = workers
        self.socket = str(base / "agent.sock")
        self._ready = base / "agent.ready"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pids: list[int] = []

    def start(self) -> AgentProcess:
        self._ready.unlink(missing_ok=True)
        log = open(self.base / "agent.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chainfs",
                "agent",
                "--address",
                self.address,
                "--socket",
                self.socket,
                "--workers",
                str(self.workers),
                "--ready-file",
                str(self._ready),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while not self._ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {(self.base / 'agent.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("agent not ready")
            time.sleep(0.05)
        self.worker_pids = json.loads(self._ready.read_text())["workers"]
        return self

    def signal_workers(self, sig: int) -> None:
        for pid in self.worker_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL the agent and its workers (a crash of the whole agent)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.signal_workers(signal.SIGKILL)
        wait_gone(self.worker_pids)

    def stop(self) -> None:
        """SIGTERM the agent (it stops its workers); kill what is left of its children."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = children_of(self.proc.pid)  # the workers now, restarted ones included
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in wait_gone(children, 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def children_of(ppid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == ppid:
                out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of a dead agent still answers kill(0): look at its state.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def wait_gone(pids: list[int], timeout_s: float = 30.0) -> list[int]:
    """The pids still alive after waiting up to ``timeout_s`` for them to exit."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left
