"""chainfs.testing.hosts itself: hosts reach each other and nothing else, and what a
run made is removed by close() on failure and, after a kill -9, by the next sweep."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.testing.hosts import HostNetwork, MultiHostCluster, sweep_stale
from chainfs.testing.netns import run_ip
from tests.integration.fuse_fixtures import is_mounted
from tests.multihost.conftest import HOSTS, fuse_available, require_hosts

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
_CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
    "    print(0)\n"
    "except OSError as e:\n"
    "    print(e.errno)\n"
)


def _on_host(prefix: list[str], code: str, *args: str) -> str:
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _gone(namespace: str, bridge: str) -> bool:
    return namespace not in run_ip("netns", "list") and bridge not in run_ip("-o", "link")


def test_hosts_reach_each_other_and_nothing_outside() -> None:
    require_hosts()
    with HostNetwork.create(["a", "b"]) as net, socket.create_server((net.address, 0)) as srv:
        a, b = net.hosts["a"], net.hosts["b"]
        assert _on_host(a.exec_prefix(), "import socket; print(socket.gethostname())") == "a"
        port = str(srv.getsockname()[1])
        assert _on_host(b.exec_prefix(), _CONNECT, net.address, port) == "0"  # this machine
        # No route off the bridge: this machine's other addresses are out of reach.
        outside = next(
            ip for ip in run_ip("-4", "-o", "addr", "show").split() if "/" in ip
            and not ip.startswith(("127.", net.address))
        ).split("/")[0]  # fmt: skip
        assert _on_host(a.exec_prefix(), _CONNECT, outside, port) == str(errno.ENETUNREACH)
        assert a.address != b.address


def test_close_after_a_failure_removes_everything() -> None:
    require_hosts()
    with pytest.raises(RuntimeError), HostNetwork.create(["x"]) as net:
        namespace, bridge = net.hosts["x"].namespace, net.bridge
        sleeper = subprocess.Popen([*net.hosts["x"].exec_prefix(), "sleep", "600"])
        time.sleep(0.2)
        raise RuntimeError("a test failed")
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert _gone(namespace, bridge)


_ORPHAN = (
    "import json, sys, time\n"
    "from pathlib import Path\n"
    "from chainfs.testing.hosts import HostNetwork, MultiHostCluster\n"
    "base, mount = Path(sys.argv[1]), sys.argv[2] == '1'\n"
    "net = HostNetwork.create(sys.argv[3:])\n"
    "c = MultiHostCluster(base / 'cluster', net, mount=base if mount else None)\n"
    "m = c.mount_process\n"
    "print(json.dumps({'namespaces': [h.namespace for h in net.hosts.values()],"
    " 'bridge': net.bridge, 'pids': list(c.pids().values()),"
    " 'mount_pid': m.pid if m else None, 'mountpoint': str(c.mountpoint)}), flush=True)\n"
    "time.sleep(600)\n"
)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_killed_runs_leftovers_are_swept(tmp_path: Path) -> None:
    """A run killed with its cluster up (and its mount process killed too, so that a
    dead FUSE connection stays mounted): the next sweep removes all of it."""
    require_hosts()
    mount = fuse_available()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _ORPHAN, str(tmp_path), "1" if mount else "0", *HOSTS]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert run.stdout is not None
        left = json.loads(run.stdout.readline())
        if mount:
            os.kill(left["mount_pid"], signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    mountpoint = Path(left["mountpoint"])
    assert all(_running(pid) for pid in left["pids"]) and len(left["pids"]) == 5
    assert not mount or is_mounted(mountpoint)  # a dead FUSE connection
    removed = set(sweep_stale())
    assert {*left["namespaces"], left["bridge"]} <= removed
    assert all(_gone(ns, left["bridge"]) for ns in left["namespaces"])
    assert not mount or not is_mounted(mountpoint)
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in left["pids"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in left["pids"])


def test_a_layout_it_cannot_build_is_refused_before_anything_starts(tmp_path: Path) -> None:
    require_hosts()
    cases = [
        ({"storage_nodes": 3}, "storage"),
        ({"kv": "etcd"}, "etcd"),
        ({"mount": tmp_path}, "client"),
    ]
    with HostNetwork.create(["mgmtd", "meta", "storage0", "storage1"]) as net:
        for kwargs, named in cases:
            with pytest.raises(ChainfsError) as e:
                MultiHostCluster(tmp_path / "c", net, **kwargs)
            assert e.value.code == Code.EINVAL and named in str(e.value), str(e.value)
        assert not (tmp_path / "c").exists()
