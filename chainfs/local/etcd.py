"""Real ``etcd`` processes on 127.0.0.1: one member or an N-member cluster.

The metadata store of ``chainfs up --kv etcd`` and of LocalCluster(kv="etcd"),
and of the tests of the etcd backend.

    with EtcdCluster(base_dir, members=3) as etcd:
        store = chainfs.kv.open(etcd.url("chainfs"))
        etcd.kill(0)        # SIGKILL one member
        etcd.restart(0)     # same ports, same data dir

Ports are picked free at start; when a member loses a port race (another
process bound it first) the whole start is retried with fresh ports and fresh
data dirs. Each member keeps its data and its log (``etcd.log``) in
``base_dir/<name>/``. Only pids started here are ever signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chainfs.common.errors import ChainfsError, Code
from chainfs.local.private import make_private_dir, private_opener
from chainfs.local.process import (
    DEFAULT_STOP_TIMEOUT_S,
    Popen,
    StopOnExit,
    kill_process,
    spawn,
    stop_process,
    tail_file,
)

DEFAULT_START_TIMEOUT_S = 30.0  # wait for every member to report healthy
PORT_RACE_ATTEMPTS = 5  # fresh-port retries when a port was taken under us
# Our commits compare every key a transaction read, so one Txn can carry many ops.
DEFAULT_MAX_TXN_OPS = 10_000
DEFAULT_QUOTA_BACKEND_BYTES = 512 * 1024 * 1024  # bounded db size for tests
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # room for large values in one Txn
# Loopback: much shorter than etcd's WAN defaults (100/1000 ms) so failover is quick.
DEFAULT_HEARTBEAT_INTERVAL_MS = 50
DEFAULT_ELECTION_TIMEOUT_MS = 500
# Revisions of history etcd keeps (compacted every 5 minutes beyond that): only
# a backstop. chainfs's etcd store compacts to a few seconds of history itself
# (EtcdOptions.compact_interval_ms), since history of deleted keys slows every
# range read; this bound matters for a store opened with compaction off. Without
# any compaction every write grows etcd's database until it hits the quota.
DEFAULT_AUTO_COMPACTION_REVISIONS = 100_000
_HEALTH_POLL_S = 0.05
_HEALTH_HTTP_TIMEOUT_S = 0.25  # a member without a leader stalls /health: poll again


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    proc: Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail_log(self, lines: int = 30) -> str:
        return tail_file(self.log_path, lines)


class EtcdCluster(StopOnExit):
    """``members`` etcd processes forming one cluster (1 = a single member)."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        members: int = 1,
        *,
        etcd_binary: str = "etcd",
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        quota_backend_bytes: int = DEFAULT_QUOTA_BACKEND_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
        election_timeout_ms: int = DEFAULT_ELECTION_TIMEOUT_MS,
        start: bool = True,
    ) -> None:
        if members < 1:
            raise ChainfsError(Code.EINVAL, f"members must be >= 1, not {members}")
        binary = shutil.which(etcd_binary)
        if binary is None:
            raise ChainfsError(
                Code.ENOENT, f"`{etcd_binary}` not on PATH (deploy/bootstrap.sh installs it)"
            )
        self.binary = binary
        self.base_dir = Path(base_dir)
        self.n_members = members
        self.start_timeout_s = start_timeout_s
        self.max_txn_ops = max_txn_ops
        self.quota_backend_bytes = quota_backend_bytes
        self.max_request_bytes = max_request_bytes
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.members: list[EtcdMember] = []
        self._token = ""
        # Kill our processes at exit even if the owner forgot to stop them.
        self._finalizer = weakref.finalize(self, _kill_all, self.members)
        if start:
            self.start()

    # -- addresses -----------------------------------------------------------
    @property
    def endpoints(self) -> str:
        """``"127.0.0.1:p1,127.0.0.1:p2,..."`` (client ports)."""
        return ",".join(m.endpoint for m in self.members)

    def url(self, prefix: str = "chainfs") -> str:
        """A ``chainfs.kv.open`` URL for this cluster under ``prefix``."""
        return f"etcd://{self.endpoints}/{prefix.strip('/')}"

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start every member with fresh ports and wait until all are healthy."""
        if any(m.alive() for m in self.members):
            raise ChainfsError(Code.EBUSY, "etcd cluster already running")
        make_private_dir(self.base_dir)
        last_error: ChainfsError | None = None
        for _ in range(PORT_RACE_ATTEMPTS):
            self._plan_members()
            for i in range(self.n_members):
                self._spawn(i)
            try:
                self._wait_healthy(range(self.n_members), self.start_timeout_s)
                return
            except ChainfsError as e:
                last_error = e
                port_race = any(_lost_port_race(m) for m in self.members)
                _kill_all(self.members)
                if not port_race:
                    raise
        assert last_error is not None
        raise last_error

    def _plan_members(self) -> None:
        self._token = f"chainfs-{uuid.uuid4().hex[:12]}"
        ports: set[int] = set()
        while len(ports) < 2 * self.n_members:
            ports.add(_free_port())
        it = iter(sorted(ports))
        self.members.clear()
        for i in range(self.n_members):
            name = f"etcd{i}"
            member_dir = self.base_dir / name
            if member_dir.exists():
                shutil.rmtree(member_dir)  # a fresh cluster needs fresh data dirs
            make_private_dir(member_dir)
            self.members.append(
                EtcdMember(name, member_dir / "data", client_port=next(it), peer_port=next(it))
            )

    def _command(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            self.binary,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self._token,
            "--initial-cluster-state", "new",
            "--max-txn-ops", str(self.max_txn_ops),
            "--quota-backend-bytes", str(self.quota_backend_bytes),
            "--max-request-bytes", str(self.max_request_bytes),
            "--heartbeat-interval", str(self.heartbeat_interval_ms),
            "--election-timeout", str(self.election_timeout_ms),
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", str(DEFAULT_AUTO_COMPACTION_REVISIONS),
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip

    def _spawn(self, i: int) -> None:
        m = self.members[i]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(m.log_path, "ab", opener=private_opener) as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
        m.proc = spawn(self._command(m), m.log_path, env)

    def _wait_healthy(self, which: range | list[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(which)
        while pending:
            for i in list(pending):
                m = self.members[i]
                if not m.alive():
                    assert m.proc is not None
                    raise ChainfsError(
                        Code.EIO,
                        f"etcd member {m.name} exited with {m.proc.returncode}; "
                        f"log {m.log_path}:\n{m.tail_log()}",
                    )
                if _healthy(m):
                    pending.remove(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(self.members[i].name for i in pending)
                raise ChainfsError(
                    Code.ETIMEDOUT,
                    f"etcd member(s) {names} not healthy after {timeout_s}s; log "
                    f"{self.members[pending[0]].log_path}:\n{self.members[pending[0]].tail_log()}",
                )
            time.sleep(_HEALTH_POLL_S)

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (a crash)."""
        kill_process(self.members[i].proc)

    def restart(self, i: int, wait: bool = True) -> None:
        """Start member ``i`` again on its ports and data dir; wait until healthy.

        Health needs a leader, so with a majority of members down this waits
        until enough of them are back (restart them with ``wait=False`` first).
        """
        m = self.members[i]
        if m.alive():
            raise ChainfsError(Code.EBUSY, f"etcd member {m.name} still running (pid {m.pid})")
        self._spawn(i)
        if wait:
            self._wait_healthy([i], self.start_timeout_s)

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        """Wait until every running member reports healthy (it has a leader)."""
        running = [i for i, m in enumerate(self.members) if m.alive()]
        self._wait_healthy(running, timeout_s or self.start_timeout_s)

    def leader_index(self, timeout_s: float | None = None) -> int:
        """Index of the member that is the Raft leader now (polls until one is)."""
        bound_s = timeout_s or self.start_timeout_s
        deadline = time.monotonic() + bound_s
        while True:
            for m in self.members:
                status = _status(m) if m.alive() else None
                if status and status.get("leader") not in (None, "0"):
                    leader = status["leader"]
                    for i, other in enumerate(self.members):
                        other_status = _status(other) if other.alive() else None
                        if other_status and other_status["header"]["member_id"] == leader:
                            return i
            if time.monotonic() > deadline:
                raise ChainfsError(Code.ETIMEDOUT, f"no etcd leader after {bound_s}s")
            time.sleep(_HEALTH_POLL_S)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM the members we started one at a time, SIGKILL after ``timeout_s``.

        (Terminating all members at once makes each wait seconds for peers
        that are going away; one at a time each exits in milliseconds.)"""
        for m in self.members:
            stop_process(m.proc, timeout_s)


def _healthy(m: EtcdMember) -> bool:
    try:
        with urllib.request.urlopen(
            m.client_url + "/health", timeout=_HEALTH_HTTP_TIMEOUT_S
        ) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _status(m: EtcdMember) -> dict[str, Any] | None:
    req = urllib.request.Request(m.client_url + "/v3/maintenance/status", data=b"{}")
    try:
        with urllib.request.urlopen(req, timeout=_HEALTH_HTTP_TIMEOUT_S) as resp:
            out = json.loads(resp.read())
            return out if isinstance(out, dict) else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _lost_port_race(m: EtcdMember) -> bool:
    return (not m.alive()) and "address already in use" in m.tail_log(200)


def _kill_all(members: list[EtcdMember]) -> None:
    for m in members:
        kill_process(m.proc)
