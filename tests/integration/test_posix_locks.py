"""Advisory locks kept by meta: across two FUSE mounts and Python clients,
released at close, waited for (and interrupted), and freed with the lease of
a client or mount that was killed."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.local import LocalCluster
from chainfs.local.process import MountProcess
from tests.integration.fuse_fixtures import mounted_cluster

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

PY3 = "/usr/bin/python3"  # lock holders: plain processes with their own file descriptors
SESSION_TIMEOUT_MS = 3_000  # meta's lease on a silent client (short for the test)
DEADLINE_S = 60.0  # bound on any polled condition
FLOCK_FMT = "@hhqqi4x"  # struct flock on Linux x86-64


def short_lease(_index: int, c: Any) -> None:
    c.session_timeout_ms = SESSION_TIMEOUT_MS
    c.session_prune_interval_ms = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("posix_locks"))
    yield from mounted_cluster(base, options=["allow_other"], configure_meta=short_lease)


def second_mount(cluster: LocalCluster, name: str) -> MountProcess:
    mnt = cluster.base_dir.parent / name
    mnt.mkdir(exist_ok=True)
    m = MountProcess(mnt, cluster.address, cluster.base_dir.parent / f"{name}-work")
    m.start()
    return m


@pytest.fixture(scope="module")
def mnt2(cluster: LocalCluster) -> Iterator[Path]:
    m = second_mount(cluster, "mnt2")
    try:
        yield m.mountpoint
    finally:
        m.stop()


@pytest.fixture
def paths(cluster: LocalCluster, mnt2: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """The same new file seen through mount 1 and mount 2."""
    assert cluster.mountpoint is not None
    name = request.node.name
    (cluster.mountpoint / name).write_bytes(b"x" * 4096)
    return cluster.mountpoint / name, mnt2 / name


def holder(path: Path, how: str) -> subprocess.Popen[str]:
    """A process that takes a lock on ``path`` (``how``: Python code on fd ``f``),
    prints "locked" and sleeps until killed."""
    code = (
        "import fcntl, os, sys, time\n"
        f"f = open({str(path)!r}, 'r+b')\n"
        f"{how}\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen([PY3, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "locked"
    return p


def kill(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait(timeout=30)


def eventually(fn: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not fn():
        assert time.monotonic() < deadline, f"not within {DEADLINE_S}s: {what}"
        time.sleep(0.1)


def try_lock(
    path: Path, kind: str, exclusive: bool = True, start: int = 0, length: int = 0
) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "flock":
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        else:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            fcntl.lockf(fd, op | fcntl.LOCK_NB, length, start)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# -- across mounts --------------------------------------------------------------------------


def test_flock_excludes_across_mounts(paths: tuple[Path, Path]) -> None:
    p1, p2 = paths
    h = holder(p1, "fcntl.flock(f, fcntl.LOCK_EX)")
    try:
        assert not try_lock(p2, "flock")
        assert not try_lock(p2, "flock", exclusive=False)
        assert try_lock(p2, "posix")  # flock and POSIX locks do not interact
    finally:
        kill(h)  # its file closes: the flock goes with it
    assert try_lock(p2, "flock")


def test_shared_flocks_coexist(paths: tuple[Path, Path]) -> None:
    p1, p2 = paths
    h = holder(p1, "fcntl.flock(f, fcntl.LOCK_SH)")
    try:
        assert try_lock(p2, "flock", exclusive=False)
        assert not try_lock(p2, "flock")
    finally:
        kill(h)


def test_posix_ranges_and_getlk_across_mounts(paths: tuple[Path, Path]) -> None:
    p1, p2 = paths
    h = holder(p1, "fcntl.lockf(f, fcntl.LOCK_EX, 100, 0)")  # bytes 0..99
    try:
        assert not try_lock(p2, "posix", start=50, length=10)
        assert not try_lock(p2, "posix", exclusive=False, start=99, length=1)
        assert try_lock(p2, "posix", start=100, length=100)
        fd = os.open(p2, os.O_RDWR)
        try:
            probe = struct.pack(FLOCK_FMT, fcntl.F_WRLCK, os.SEEK_SET, 10, 5, 0)
            got = struct.unpack(FLOCK_FMT, fcntl.fcntl(fd, fcntl.F_GETLK, probe))
            assert got[0] == fcntl.F_WRLCK and (got[2], got[3]) == (0, 100)
            assert got[4] == h.pid  # the holder, a process of this machine
            free = struct.pack(FLOCK_FMT, fcntl.F_WRLCK, os.SEEK_SET, 200, 5, 0)
            assert (
                struct.unpack(FLOCK_FMT, fcntl.fcntl(fd, fcntl.F_GETLK, free))[0] == fcntl.F_UNLCK
            )
        finally:
            os.close(fd)
    finally:
        kill(h)
    assert try_lock(p2, "posix", start=0, length=100)


def test_unlocking_the_middle_splits_a_lock(paths: tuple[Path, Path]) -> None:
    p1, p2 = paths
    how = "fcntl.lockf(f, fcntl.LOCK_EX, 300, 0); fcntl.lockf(f, fcntl.LOCK_UN, 100, 100)"
    h = holder(p1, how)
    try:
        assert try_lock(p2, "posix", start=100, length=100)
        assert not try_lock(p2, "posix", start=50, length=60)
        assert not try_lock(p2, "posix", start=190, length=20)
    finally:
        kill(h)


def test_closing_any_descriptor_drops_the_process_locks(paths: tuple[Path, Path]) -> None:
    p1, p2 = paths
    how = "fcntl.lockf(f, fcntl.LOCK_EX); os.close(os.open(f.name, os.O_RDONLY))"
    h = holder(p1, how)  # POSIX: closing another fd of the file releases the lock
    try:
        assert try_lock(p2, "posix")
    finally:
        kill(h)


def test_blocking_lock_waits_and_is_interruptible(paths: tuple[Path, Path]) -> None:
    p1, p2 = paths
    h = holder(p1, "fcntl.lockf(f, fcntl.LOCK_EX)")
    try:
        # A signal ends the wait: EINTR reaches the waiter (its handler raises).
        code = (
            "import fcntl, signal, sys\n"
            "def alarm(*a): raise TimeoutError\n"
            "signal.signal(signal.SIGALRM, alarm)\n"
            f"f = open({str(p2)!r}, 'r+b')\n"
            "signal.alarm(2)\n"
            "try: fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "except TimeoutError: print('interrupted')\n"
            "else: print('locked')\n"
        )
        out = subprocess.run([PY3, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "interrupted", out.stderr
        # A waiter gets the lock once the holder goes.
        waiter = subprocess.Popen(
            [
                PY3,
                "-c",
                f"import fcntl; f = open({str(p2)!r}, 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX); "
                "print('got it')",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting
    finally:
        kill(h)
    out2, _ = waiter.communicate(timeout=60)
    assert out2.strip() == "got it"


def test_killed_mount_frees_its_locks_after_the_lease(
    cluster: LocalCluster, paths: tuple[Path, Path]
) -> None:
    _, p2 = paths
    m3 = second_mount(cluster, "mnt3")
    h = None
    try:
        h = holder(m3.mountpoint / p2.name, "fcntl.lockf(f, fcntl.LOCK_EX)")
        assert not try_lock(p2, "posix")
        os.kill(m3.pid or 0, signal.SIGKILL)  # the holder's mount dies; its lease runs out
        eventually(lambda: try_lock(p2, "posix"), "the dead mount's lock freed")
    finally:
        if h is not None:
            kill(h)
        m3.stop()


# -- the Python API ---------------------------------------------------------------------------


def test_api_locks_exclude_across_clients(cluster: LocalCluster, paths: tuple[Path, Path]) -> None:
    p1, p2 = paths
    assert cluster.mountpoint is not None
    path = "/" + p1.name
    with cluster.client() as a, cluster.client() as b:
        fa, fb = a.open(path, "r+b"), b.open(path, "r+b")
        try:
            fa.lock(exclusive=True, start=0, length=10, blocking=False)
            with pytest.raises(BlockingIOError):
                fb.lock(start=5, length=1, blocking=False)
            with pytest.raises(BlockingIOError):
                fb.lock(start=5, length=1, timeout_s=0.3)
            info = fb.test_lock(start=0, length=1)
            assert info is not None and info.exclusive and info.pid == os.getpid()
            assert (info.start, info.length) == (0, 10)
            assert not try_lock(p2, "posix", start=0, length=1)  # the mounts see it too
            fb.lock(start=10, length=0, blocking=False)  # the rest of the file
            fa.unlock(0, 5)
            fb.lock(start=0, length=5, blocking=False)
            fa.lock(kind="flock", blocking=False)
            with pytest.raises(BlockingIOError):
                fb.lock(kind="flock", blocking=False)
        finally:
            fa.close()  # drops fa's locks
        fb.lock(kind="flock", blocking=False)
        fb.close()
    assert try_lock(p2, "flock") and try_lock(p2, "posix")


def test_api_killed_client_frees_its_locks_after_the_lease(
    cluster: LocalCluster, paths: tuple[Path, Path]
) -> None:
    p1, p2 = paths
    code = (
        "import sys, time, chainfs\n"
        f"fs = chainfs.connect({cluster.address!r})\n"
        f"f = fs.open({'/' + p1.name!r}, 'r+b')\n"
        "f.lock()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        assert not try_lock(p2, "posix")
        time.sleep(2 * SESSION_TIMEOUT_MS / 1000)  # alive: it keeps its lease
        assert not try_lock(p2, "posix")
    finally:
        kill(p)  # kill -9: no unlock, no close
    eventually(lambda: try_lock(p2, "posix"), "the dead client's lock freed")
