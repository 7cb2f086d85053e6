"""Special files, the setuid drop and fallocate, through an ``allow_other``
mount (acting as uid 65534 too) and through the Python API."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.client.sync import FileSystem
from chainfs.common.rpc.meta_wire import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from chainfs.local import LocalCluster
from tests.conftest import require
from tests.integration.client_fixtures import stored_chunks
from tests.integration.fuse_fixtures import mounted_cluster

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

NOBODY = 65534
CHUNK = 64 * 1024  # the layout of the API test directory: small chunks, many of them
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("posix_special"))
    yield from mounted_cluster(base, options=["allow_other"])


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> Iterator[FileSystem]:
    with cluster.client() as fs:
        yield fs


@pytest.fixture
def d(cluster: LocalCluster, request: pytest.FixtureRequest) -> Path:
    assert cluster.mountpoint is not None
    path = cluster.mountpoint / request.node.name
    path.mkdir(mode=0o777)
    os.chmod(path, 0o777)
    return path


def as_nobody(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    require("setpriv", shutil.which("setpriv") is not None, "setpriv (util-linux) runs as nobody")
    ids = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    return subprocess.run(
        [*ids, *cmd], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# -- special files through the mount ------------------------------------------------------


def test_mknod_types_and_rdev(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o640)
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(d / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 17))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "sock"))
    kinds = {
        "fifo": stat.S_ISFIFO,
        "null": stat.S_ISCHR,
        "disk": stat.S_ISBLK,
        "sock": stat.S_ISSOCK,
    }
    for name, is_kind in kinds.items():
        assert is_kind(os.lstat(d / name).st_mode), name
    assert os.stat(d / "null").st_rdev == os.makedev(1, 3)
    assert os.stat(d / "disk").st_rdev == os.makedev(8, 17)
    assert stat.S_IMODE(os.stat(d / "fifo").st_mode) == 0o640
    # A listing says the types too (ls -l's first column).
    listing = {e.name: e for e in os.scandir(d)}
    assert not listing["fifo"].is_file() and not listing["sock"].is_dir()
    assert stat.S_ISCHR(listing["null"].stat(follow_symlinks=False).st_mode)
    # Only root makes device nodes.
    out = as_nobody(["mknod", "dev2", "c", "1", "3"], d)
    assert out.returncode != 0 and "not permitted" in out.stderr


def test_special_files_chmod_chown_link_rename_unlink(d: Path) -> None:
    os.mkfifo(d / "p", 0o600)
    os.chmod(d / "p", 0o644)
    os.chown(d / "p", NOBODY, NOBODY)
    os.link(d / "p", d / "q")
    os.rename(d / "q", d / "r")
    st = os.stat(d / "r")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert (st.st_uid, st.st_nlink) == (NOBODY, 2)
    os.unlink(d / "p")
    assert os.stat(d / "r").st_nlink == 1
    os.unlink(d / "r")
    assert os.listdir(d) == []


def test_fifo_between_two_processes(d: Path) -> None:
    os.mkfifo(d / "pipe", 0o666)
    reader = subprocess.Popen(["cat", str(d / "pipe")], stdout=subprocess.PIPE)
    try:
        with open(d / "pipe", "wb") as w:
            w.write(b"through the fifo\n" * 1000)
        out, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
    assert out == b"through the fifo\n" * 1000


# -- setuid drop ---------------------------------------------------------------------------


def test_write_by_other_user_drops_setuid(d: Path) -> None:
    f = d / "suid"
    f.write_bytes(b"root's")
    os.chmod(f, 0o4777)
    out = as_nobody(["sh", "-c", "printf nobody >> suid"], d)
    assert out.returncode == 0, out.stderr
    assert f.read_bytes() == b"root'snobody"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o777
    # The owner (root, CAP_FSETID) writes and keeps the bit.
    os.chmod(f, 0o6777)
    with open(f, "ab") as w:
        w.write(b"!")
    assert f.read_bytes() == b"root'snobody!"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o6777
    # A truncate by another user drops setuid and (group-exec set) setgid.
    out = as_nobody(["truncate", "-s", "3", "suid"], d)
    assert out.returncode == 0, out.stderr
    assert os.stat(f).st_size == 3 and stat.S_IMODE(os.stat(f).st_mode) == 0o777
    # An explicit chmod by another user is still refused.
    os.chmod(f, 0o4777)
    out = as_nobody(["chmod", "0777", "suid"], d)
    assert out.returncode != 0 and stat.S_IMODE(os.stat(f).st_mode) == 0o4777


# -- fallocate ------------------------------------------------------------------------------


def test_posix_fallocate_through_the_mount(d: Path) -> None:
    fd = os.open(d / "pre", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 300_000)
        assert os.fstat(fd).st_size == 300_000
        assert os.pread(fd, 300_000, 0) == bytes(300_000)
    finally:
        os.close(fd)
    assert os.stat(d / "pre").st_size == 300_000


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_fallocate_through_the_mount(d: Path) -> None:
    f = d / "fa"
    data = os.urandom(3 * CHUNK)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDWR)
    try:
        _fallocate(fd, 0, 0, 5 * CHUNK)
        assert os.fstat(fd).st_size == 5 * CHUNK
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 9 * CHUNK)
        assert os.fstat(fd).st_size == 5 * CHUNK
        _fallocate(fd, PUNCH, 100, 1000)
        for mode in (0x08, 0x10, 0x20):  # collapse, zero and insert range
            with pytest.raises(OSError) as ei:
                _fallocate(fd, mode, 0, CHUNK)
            assert ei.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    want = data[:100] + bytes(1000) + data[1100:] + bytes(2 * CHUNK)
    assert f.read_bytes() == want
    assert os.stat(f).st_size == 5 * CHUNK  # the refused modes changed nothing
    # The fallocate tool: a new file of a given length.
    subprocess.run(["fallocate", "-l", "1M", str(d / "new")], check=True, timeout=60)
    assert os.stat(d / "new").st_size == 1 << 20


def test_fallocate_api_modes(fs: FileSystem, d: Path, cluster: LocalCluster) -> None:
    assert cluster.mountpoint is not None
    base = "/" + str(d.relative_to(cluster.mountpoint))
    path = f"{base}/f"
    fs.write_file(path, b"")
    fs.fallocate(path, 1000, 5000)
    assert fs.stat(path).st_size == 6000 and fs.read_file(path) == bytes(6000)
    fs.fallocate(path, 0, 100_000, FALLOC_FL_KEEP_SIZE)
    assert fs.stat(path).st_size == 6000
    for bad in (FALLOC_FL_PUNCH_HOLE, 0x08, 0x10, 0x20):
        with pytest.raises(OSError) as ei:
            fs.fallocate(path, 0, 10, bad)
        assert ei.value.errno == errno.EOPNOTSUPP
    assert fs.stat(path).st_size == 6000  # nothing changed


def test_punch_hole_zeroes_and_drops_whole_chunks(
    fs: FileSystem, d: Path, cluster: LocalCluster
) -> None:
    assert cluster.mountpoint is not None
    base = "/" + str(d.relative_to(cluster.mountpoint))
    fs._loop.run(fs.aio.io.meta.set_layout(base, chunk_size=CHUNK, stripe=2))
    path = f"{base}/holes"
    data = bytes(range(256)) * (6 * CHUNK // 256)  # six chunks
    fs.write_file(path, data)
    start, end = CHUNK // 2, 4 * CHUNK + 100  # half of chunk 0, chunks 1-3, a bit of chunk 4
    with fs.open(path, "r+b") as f:
        f.fallocate(start, end - start, PUNCH)
    got = fs.read_file(path)
    assert len(got) == len(data)
    assert got[:start] == data[:start]
    assert got[start:end] == bytes(end - start)
    assert got[end:] == data[end:]
    # Chunks 1..3 are gone from storage; 0 and 4 were zeroed in place.
    ino = fs.stat(path).st_ino
    chains = list(fs._loop.run(fs.aio.io.meta.stat(path)).layout.chains)
    stored: set[int] = set()
    for chain in chains:
        stored |= {m.chunk.index for m in fs._loop.run(stored_chunks(fs.aio, chain, ino))}
    assert stored == {0, 4, 5}
    # The mount reads the same bytes.
    assert (d / "holes").read_bytes() == got


def test_mknod_api(fs: FileSystem, d: Path, cluster: LocalCluster) -> None:
    assert cluster.mountpoint is not None
    base = "/" + str(d.relative_to(cluster.mountpoint))
    fs.mknod(f"{base}/p", stat.S_IFIFO | 0o600)
    fs.mknod(f"{base}/c", stat.S_IFCHR | 0o600, os.makedev(4, 5))
    st = fs.stat(f"{base}/c")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(4, 5)
    assert stat.S_ISFIFO(os.stat(d / "p").st_mode)  # the mount sees it
    with pytest.raises(OSError) as ei:
        fs.open(f"{base}/p", "rb")
    assert ei.value.errno == errno.ENXIO
