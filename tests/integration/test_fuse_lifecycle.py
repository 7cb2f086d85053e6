"""The mount's life: `chainfs mount` in the background, `fusermount3 -u`, SIGTERM with
unflushed writes, and the cluster going away and coming back under a mount.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.local import LocalCluster
from tests.integration.fuse_fixtures import force_unmount, is_mounted, mounted_cluster, poll

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

MiB = 1024 * 1024
# Small bound on a request while the cluster is unreachable: EIO after this.
CLUSTER_TIMEOUT_MS = 3000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("fuse_life"))
    yield from mounted_cluster(
        base, options=[f"cluster_timeout_ms={CLUSTER_TIMEOUT_MS}", "attr_timeout_ms=0"]
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class CliMount:
    """`chainfs mount MNT --address A` in the background; cleaned up whatever happens."""

    def __init__(self, cluster: LocalCluster, mnt: Path, *options: str) -> None:
        mnt.mkdir(parents=True, exist_ok=True)
        self.mnt = mnt
        cmd = [sys.executable, "-m", "chainfs", "mount", str(mnt), "--address", cluster.address]
        cmd += ["--log-file", str(mnt.parent / f"{mnt.name}.log")]
        for o in options:
            cmd += ["-o", o]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        m = re.search(r"pid (\d+)", out.stdout)
        assert m, out.stdout
        self.pid = int(m.group(1))  # the mount process the command started for us
        assert is_mounted(mnt)

    def close(self) -> None:
        force_unmount(self.mnt)
        if pid_alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            try:
                poll(lambda: not pid_alive(self.pid), 20, "the mount process to exit")
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)


def test_background_mount_then_fusermount_u(cluster: LocalCluster, tmp_path: Path) -> None:
    m = CliMount(cluster, tmp_path / "mnt2")
    try:
        data = os.urandom(3 * MiB + 5)
        (m.mnt / "via-cli-mount").write_bytes(data)
        assert (cluster.mountpoint / "via-cli-mount").read_bytes() == data  # type: ignore[operator]
        subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True, timeout=30)
        poll(lambda: not pid_alive(m.pid), 30, "the mount process to exit after fusermount3 -u")
        assert not is_mounted(m.mnt)
        log = (m.mnt.parent / "mnt2.log").read_text()
        assert "unmounted" in log and "Traceback" not in log, log[-3000:]
    finally:
        m.close()


def test_bad_options_are_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt3"
    mnt.mkdir()
    cmd = [sys.executable, "-m", "chainfs", "mount", str(mnt), "--address", cluster.address]
    for bad in ("no_such_option", "attr_timeout_ms=soon", "max_requests=0"):
        out = subprocess.run([*cmd, "-o", bad], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and not is_mounted(mnt), (bad, out.stdout, out.stderr)
        assert bad.split("=")[0] in out.stderr, out.stderr
    # an unreachable cluster: a clear error, nothing left mounted
    out = subprocess.run(
        [*cmd[:-1], "127.0.0.1:9", "-o", "cluster_timeout_ms=1000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and not is_mounted(mnt), out.stdout + out.stderr
    force_unmount(mnt)


def test_sigterm_pushes_buffered_writes(cluster: LocalCluster, tmp_path: Path) -> None:
    m = CliMount(cluster, tmp_path / "mnt4")
    try:
        data = os.urandom(5 * MiB + 123)
        fd = os.open(m.mnt / "unflushed", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)  # held in the mount's write-back buffers: no close yet
            os.kill(m.pid, signal.SIGTERM)
            poll(lambda: not pid_alive(m.pid), 60, "the mount process to exit on SIGTERM")
            assert not is_mounted(m.mnt)
        finally:
            try:
                os.close(fd)
            except OSError as e:
                assert e.errno in (errno.ENOTCONN, errno.EIO, errno.ENODEV)
        fs = cluster.client()
        with fs.open("/unflushed", "rb") as f:
            assert f.read() == data
    finally:
        m.close()


def test_cluster_loss_answers_eio_then_recovers(cluster: LocalCluster) -> None:
    mnt = cluster.mountpoint
    assert mnt is not None
    fs = cluster.client()
    data = os.urandom(2 * MiB)
    with fs.open("/survivor", "wb") as f:  # never read through the mount: not in its cache
        f.write(data)
    assert os.stat(mnt / "survivor").st_size == len(data)

    # storage gone: reads fail with EIO (bounded), the mount stays up, and
    # buffered writes that cannot reach storage fail the close: never a silent loss
    fd = os.open(mnt / "doomed", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x" * MiB)  # less than a chunk: still in the mount's buffer
    for i in range(cluster.n_storage):
        cluster.kill_storage(i)
    with pytest.raises(OSError) as info:
        os.close(fd)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError) as info:
        (mnt / "survivor").read_bytes()
    assert info.value.errno == errno.EIO
    assert os.stat(mnt / "survivor").st_size == len(data)  # meta still answers
    for i in range(cluster.n_storage):
        cluster.restart_storage(i)

    def readable() -> bool:
        try:
            return (mnt / "survivor").read_bytes() == data
        except OSError:
            return False

    poll(readable, 120, "reads through the mount after storage came back", interval_s=0.5)

    # meta gone: namespace calls fail with EIO, then work again once it is back
    assert cluster.meta is not None
    cluster.meta.stop()
    with pytest.raises(OSError) as info:
        os.stat(mnt / "never-looked-up")
    assert info.value.errno == errno.EIO
    cluster.meta.start()

    def writable() -> bool:
        try:
            (mnt / "after-meta").write_bytes(b"back")
            return (mnt / "after-meta").read_bytes() == b"back"
        except OSError:
            return False

    poll(writable, 60, "namespace calls through the mount after meta came back", interval_s=0.5)


def test_mount_exits_with_its_parent(cluster: LocalCluster, tmp_path: Path) -> None:
    """--exit-with-parent (what LocalCluster uses): a starter that dies takes the mount along."""
    mnt = tmp_path / "mnt5"
    mnt.mkdir()
    ready = tmp_path / "ready.json"
    starter = (
        "import os, subprocess, sys, time\n"
        f"cmd = [sys.executable, '-m', 'chainfs', 'mount', {str(mnt)!r}, '--address',"
        f" {cluster.address!r}, '--foreground', '--exit-with-parent',"
        f" '--ready-file', {str(ready)!r}]\n"
        "p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"while not os.path.exists({str(ready)!r}) and p.poll() is None: time.sleep(0.05)\n"
        "print(p.pid, flush=True)\n"
        "os._exit(0)  # dies without stopping its child\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", starter], capture_output=True, text=True, timeout=90
        )
        pid = int(out.stdout.strip())
        poll(lambda: not pid_alive(pid), 30, "the orphaned mount process to exit")
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
