"""A LocalCluster through its FUSE mount: shell tools, errnos, file semantics.

One cluster + mount for the module (allow_other, so the permission test can
act as another user). Everything a test checks is what a user relies on:
bytes equal, modes and times kept, the right errno.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.local import LocalCluster
from chainfs.meta_service.config import INODES_TOTAL
from tests.conftest import require, require_binary
from tests.integration.fuse_fixtures import mounted_cluster, run, tree_digest

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

PY3 = "/usr/bin/python3"  # the venv's python lives under /root, out of nobody's reach
MiB = 1024 * 1024
CHUNK = 4 * MiB  # meta's default chunk size


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("fuse_posix"))
    # Small readdir pages so a few hundred entries span several of them.
    yield from mounted_cluster(base, options=["allow_other", "readdir_page_entries=64"])


@pytest.fixture(scope="module")
def mnt(cluster: LocalCluster) -> Path:
    assert cluster.mountpoint is not None
    return cluster.mountpoint


@pytest.fixture
def d(mnt: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory in the mount for one test."""
    p = mnt / request.node.name
    p.mkdir()
    return p


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tree(root: Path) -> None:
    """A source tree with the edge cases: empty, tiny, multi-chunk, nested, links, modes."""
    (root / "a/b/c").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "zero.bin").write_bytes(b"")
    (root / "one.bin").write_bytes(b"x")
    (root / "a/small.txt").write_text("hello chainfs\n" * 100)
    (root / "a/b/multi.bin").write_bytes(pattern(2 * CHUNK + 12345, 1))
    (root / "a/b/c/deep.bin").write_bytes(pattern(70_000, 2))
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o755)
    os.chmod(root / "a/small.txt", 0o600)
    os.symlink("a/small.txt", root / "link-to-small")
    os.symlink("does/not/exist", root / "dangling")
    for i in range(30):
        (root / "a/b" / f"f{i:02d}").write_bytes(pattern(i * 1000, 100 + i))


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(tmp_path_factory.mktemp("fuse_src")) / "tree"
    root.mkdir()
    make_tree(root)
    return root


# -- shell tools ----------------------------------------------------------------


def test_cp_mv_find_du(src: Path, d: Path) -> None:
    run(["cp", "-r", "--preserve=mode", str(src), str(d / "copy")])
    assert tree_digest(d / "copy") == tree_digest(src)
    run(["diff", "-r", "--no-dereference", str(src), str(d / "copy")])
    run(["mv", str(d / "copy"), str(d / "moved")])
    assert not (d / "copy").exists()
    assert tree_digest(d / "moved") == tree_digest(src)
    # mv across directories inside the mount, file and directory
    run(["mv", str(d / "moved/a/b/multi.bin"), str(d / "moved/multi.bin")])
    run(["mv", str(d / "moved/a/b/c"), str(d / "moved/c")])
    assert (d / "moved/multi.bin").read_bytes() == (src / "a/b/multi.bin").read_bytes()
    assert (d / "moved/c/deep.bin").read_bytes() == (src / "a/b/c/deep.bin").read_bytes()
    found = sorted(run(["find", ".", "-type", "f"], cwd=d / "moved").split())
    want = sorted(run(["find", ".", "-type", "f"], cwd=src).split())
    want = [
        "./multi.bin" if w == "./a/b/multi.bin" else w.replace("./a/b/c/", "./c/") for w in want
    ]
    assert found == sorted(want)
    apparent = int(run(["du", "-s", "-b", str(d / "moved")]).split()[0])
    files_total = sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink()
    )
    assert apparent >= files_total
    blocks_kib = int(run(["du", "-s", "-k", str(d / "moved")]).split()[0])
    assert blocks_kib * 1024 >= files_total  # st_blocks covers the data


def test_ln_ln_s_chmod(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"data")
    run(["ln", str(f), str(d / "hard")])
    run(["ln", "-s", "f", str(d / "soft")])
    assert os.stat(f).st_nlink == 2
    assert os.stat(d / "hard").st_ino == os.stat(f).st_ino
    assert os.readlink(d / "soft") == "f"
    assert (d / "soft").read_bytes() == b"data"
    assert os.lstat(d / "soft").st_size == 1  # a symlink's size is its target's length
    run(["chmod", "640", str(f)])
    assert stat.S_IMODE(os.stat(d / "hard").st_mode) == 0o640
    run(["chmod", "u+x,g-r", str(f)])
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o700
    os.unlink(f)
    assert (d / "hard").read_bytes() == b"data"
    assert os.stat(d / "hard").st_nlink == 1
    with pytest.raises(FileNotFoundError):
        (d / "soft").read_bytes()  # dangling now


def test_tar_round_trip(src: Path, d: Path, tmp_path: Path) -> None:
    # local -> tar -> extract into the mount
    run(["tar", "cf", str(tmp_path / "in.tar"), "-C", str(src.parent), src.name])
    run(["tar", "xpf", str(tmp_path / "in.tar"), "-C", str(d)])
    assert tree_digest(d / src.name) == tree_digest(src)
    for p in src.rglob("*"):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(src)
            assert os.stat(d / src.name / rel).st_mtime_ns // 10**9 == p.stat().st_mtime_ns // 10**9
    # mount -> tar -> extract locally
    run(["tar", "cf", str(tmp_path / "out.tar"), "-C", str(d), src.name])
    out = tmp_path / "out"
    out.mkdir()
    run(["tar", "xpf", str(tmp_path / "out.tar"), "-C", str(out)])
    assert tree_digest(out / src.name) == tree_digest(src)


def test_rsync_in_and_out(src: Path, d: Path, tmp_path: Path) -> None:
    require_binary("rsync")
    run(["rsync", "-a", f"{src}/", f"{d}/r/"])
    assert tree_digest(d / "r") == tree_digest(src)
    # a second run finds nothing to do: sizes, mtimes, modes, links were kept
    itemized = run(["rsync", "-a", "-i", f"{src}/", f"{d}/r/"])
    assert itemized.strip() == "", itemized
    # change one file in the mount; rsync with checksums brings it back out
    (d / "r/a/b/f05").write_bytes(b"changed")
    run(["rsync", "-a", "--checksum", f"{d}/r/", f"{tmp_path}/back/"])
    back = tree_digest(tmp_path / "back")
    assert back["a/b/f05"][2] == b"changed"
    run(["rsync", "-a", "--delete", f"{src}/", f"{d}/r/"])
    assert tree_digest(d / "r") == tree_digest(src)


# -- errnos ------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


def renameat2(src: Path, dst: Path, flags: int) -> None:
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def expect_errno(code: int, fn: object, *args: object) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno == code, f"{fn}{args}: {info.value!r}, expected {errno.errorcode[code]}"


def test_write_past_the_largest_file_is_efbig_and_the_file_stays_usable(d: Path) -> None:
    path = d / "far"
    path.write_bytes(b"head")
    fd = os.open(path, os.O_WRONLY)
    try:
        # Past what a 4 MiB-chunk layout addresses (2**32 chunks), within the kernel's limit.
        expect_errno(errno.EFBIG, os.pwrite, fd, b"x", 2**60)
        assert os.pwrite(fd, b"HE", 0) == 2  # the refused write did not poison the file
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"HEad"


def test_errnos(d: Path) -> None:
    (d / "dir/sub").mkdir(parents=True)
    (d / "file").write_bytes(b"x")
    expect_errno(errno.ENOENT, os.stat, d / "missing")
    expect_errno(errno.ENOENT, open, d / "missing/x", "rb")
    expect_errno(errno.EEXIST, os.mkdir, d / "dir")
    expect_errno(errno.EEXIST, os.open, d / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.ENOTEMPTY, os.rmdir, d / "dir")
    expect_errno(errno.EISDIR, open, d / "dir", "wb")
    expect_errno(errno.EISDIR, os.unlink, d / "dir")
    expect_errno(errno.ENOTDIR, os.rmdir, d / "file")
    expect_errno(errno.ENOTDIR, os.stat, d / "file/x")
    expect_errno(errno.ENOTDIR, os.rename, d / "dir", d / "file")
    expect_errno(errno.EISDIR, os.rename, d / "file", d / "dir")
    expect_errno(errno.EINVAL, os.rename, d / "dir", d / "dir/sub/inside")
    expect_errno(errno.ENAMETOOLONG, os.mkdir, d / ("n" * 256))
    expect_errno(errno.ENODATA, os.getxattr, d / "file", "user.missing")
    expect_errno(errno.EOPNOTSUPP, os.getxattr, d / "file", "system.posix_acl_access")
    expect_errno(errno.EEXIST, os.link, d / "file", d / "file")
    expect_errno(errno.EPERM, os.link, d / "dir", d / "dirlink")
    # unsupported operations: an errno, never a hang
    fd = os.open(d / "file", os.O_RDWR)
    try:
        # fallocate(2) with FALLOC_FL_ZERO_RANGE (modes 0, KEEP_SIZE and PUNCH_HOLE work)
        rc = _libc.fallocate64(fd, 0x10, ctypes.c_int64(0), ctypes.c_int64(4096))
        assert rc == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    # the mount still answers afterwards
    assert (d / "file").read_bytes() == b"x"


def test_rename_flags(d: Path) -> None:
    RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    (d / "sub").mkdir()
    expect_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    renameat2(d / "a", d / "b", RENAME_EXCHANGE)
    assert (d / "a").read_bytes() == b"B" and (d / "b").read_bytes() == b"A"
    renameat2(d / "a", d / "sub", RENAME_EXCHANGE)  # file <-> directory
    assert (d / "sub").read_bytes() == b"B" and (d / "a").is_dir()
    expect_errno(errno.ENOENT, renameat2, d / "a", d / "nothere", RENAME_EXCHANGE)
    renameat2(d / "b", d / "c", RENAME_NOREPLACE)
    assert (d / "c").read_bytes() == b"A" and not (d / "b").exists()
    # plain rename replaces a file atomically
    (d / "new").write_bytes(b"new")
    os.rename(d / "new", d / "c")
    assert (d / "c").read_bytes() == b"new"


# -- file semantics ------------------------------------------------------------------


def test_random_writes_holes_truncate_append(d: Path) -> None:
    size = 3 * CHUNK + 999
    model = bytearray(size)
    rng = random.Random(7)
    with open(d / "f", "wb") as f:
        f.truncate(size)
    fd = os.open(d / "f", os.O_RDWR)
    try:
        for _ in range(60):
            off = rng.randrange(size)
            n = rng.choice([1, 100, 4096, 65536, CHUNK // 2 + 3])
            data = rng.randbytes(min(n, size - off))
            assert os.pwrite(fd, data, off) == len(data)
            model[off : off + len(data)] = data
            if rng.random() < 0.2:  # reads in between see the writes
                at = rng.randrange(size)
                assert os.pread(fd, 8192, at) == bytes(model[at : at + 8192])
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (d / "f").read_bytes() == bytes(model)
    # shrink, then grow: the cut part reads back as zeros
    os.truncate(d / "f", CHUNK + 10)
    os.truncate(d / "f", 2 * CHUNK)
    got = (d / "f").read_bytes()
    assert got == bytes(model[: CHUNK + 10]) + bytes(CHUNK - 10)
    # sparse file: write far out, the gap is zeros
    with open(d / "sparse", "wb") as f:
        f.seek(5 * CHUNK + 17)
        f.write(b"end")
    assert os.stat(d / "sparse").st_size == 5 * CHUNK + 20
    with open(d / "sparse", "rb") as f:
        f.seek(CHUNK - 5)
        assert f.read(10) == bytes(10)
        f.seek(5 * CHUNK + 17)
        assert f.read() == b"end"
    # O_APPEND from two descriptors
    with open(d / "log", "ab") as a, open(d / "log", "ab") as b:
        for i in range(20):
            (a if i % 2 else b).write(f"line {i}\n".encode())
            (a if i % 2 else b).flush()
    assert (d / "log").read_text() == "".join(f"line {i}\n" for i in range(20))


def test_mmap_and_exec(d: Path) -> None:
    import mmap

    (d / "m").write_bytes(b"a" * 3 * CHUNK)
    with open(d / "m", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[CHUNK - 2 : CHUNK + 3] = b"HELLO"  # across a chunk boundary
        m.flush()
    data = (d / "m").read_bytes()
    assert data[CHUNK - 2 : CHUNK + 3] == b"HELLO" and len(data) == 3 * CHUNK
    assert data.count(b"a") == 3 * CHUNK - 5
    shutil.copy2("/bin/echo", d / "echo")
    assert run([str(d / "echo"), "ran from chainfs"]).strip() == "ran from chainfs"


def test_unlink_and_replace_while_open(d: Path) -> None:
    data = pattern(CHUNK + 5000, 3)
    (d / "f").write_bytes(data)
    with open(d / "f", "rb") as f:
        os.unlink(d / "f")
        assert not (d / "f").exists()
        assert f.read() == data  # POSIX: the open file lives on
    (d / "g").write_bytes(data)
    with open(d / "g", "rb") as f:
        (d / "h").write_bytes(b"other")
        os.rename(d / "h", d / "g")  # replaces the open file's name
        assert f.read() == data
    assert (d / "g").read_bytes() == b"other"
    # write-open, unlinked, written, read back through the same descriptor
    fd = os.open(d / "w", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.unlink(d / "w")
        os.write(fd, data)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_times_and_attrs(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"abc")
    os.utime(f, ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(f)
    assert st.st_atime_ns == 1_000_000_000_123 and st.st_mtime_ns == 2_000_000_000_456
    # futimens before close (cp -p does this) survives the close
    fd = os.open(d / "g", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"x" * 1000)
    os.utime(fd, ns=(3_000_000_000_000, 4_000_000_000_000))
    os.close(fd)
    assert os.stat(d / "g").st_mtime_ns == 4_000_000_000_000
    assert os.stat(d / "g").st_size == 1000
    # writing updates mtime to about now
    before = os.stat(f).st_mtime_ns
    with open(f, "ab") as fh:
        fh.write(b"more")
    assert os.stat(f).st_mtime_ns > before
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.setxattr(f, "user.k", b"v1")
    os.setxattr(f, "user.k2", b"")
    assert os.getxattr(f, "user.k") == b"v1"
    assert sorted(os.listxattr(f)) == ["user.k", "user.k2"]
    expect_errno(errno.EEXIST, os.setxattr, f, "user.k", b"v", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, f, "user.nope", b"v", os.XATTR_REPLACE)
    os.setxattr(f, "user.k", b"v2", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.k") == b"v2"
    os.removexattr(f, "user.k")
    expect_errno(errno.ENODATA, os.removexattr, f, "user.k")
    assert os.listxattr(f) == ["user.k2"]
    # security.* is not stored by default (tools cache the EOPNOTSUPP per mount)
    expect_errno(errno.EOPNOTSUPP, os.setxattr, f, "security.selinux", b"label")
    expect_errno(errno.EOPNOTSUPP, os.getxattr, f, "security.capability")
    sv = os.statvfs(d)
    assert sv.f_blocks > 0 and sv.f_bsize > 0 and sv.f_namemax == 255
    # df -i: meta's count of inodes in use against its fixed total. The exact
    # count is checked in test_inode_count.py on a cluster of its own: here,
    # GC of files earlier tests unlinked lowers it at any moment.
    assert sv.f_files == INODES_TOTAL
    assert 1 <= sv.f_files - sv.f_ffree < sv.f_files


def test_permissions_use_caller_identity(d: Path) -> None:
    require("python3", os.access(PY3, os.X_OK), f"{PY3} runs the probe as user nobody")
    os.chmod(d, 0o777)
    (d / "root-only").write_bytes(b"secret")
    os.chmod(d / "root-only", 0o600)
    os.mkdir(d / "closed", 0o700)
    nobody = 65534

    def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY3, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            user=nobody,
            group=nobody,
            extra_groups=[],
            cwd=d,
        )

    probe = (
        "import errno, os\n"
        "def t(f):\n"
        "    try: f(); return 'ok'\n"
        "    except OSError as e: return errno.errorcode[e.errno]\n"
        "print(t(lambda: open('root-only','rb').read()),"
        " t(lambda: open('root-only','ab')),"
        " t(lambda: os.chmod('root-only', 0o777)),"
        " t(lambda: os.listdir('closed')),"
        " t(lambda: open('mine','wb').write(b'x')),"
        " t(lambda: os.chown('mine', 0, 0)))\n"
    )
    out = as_nobody(probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EACCES", "EACCES", "EPERM", "EACCES", "ok", "EPERM"]
    st = os.stat(d / "mine")
    assert (st.st_uid, st.st_gid) == (nobody, nobody)  # created as the caller


# -- visibility and concurrency -------------------------------------------------------------


def test_visible_to_other_clients(cluster: LocalCluster, d: Path) -> None:
    fs = cluster.client()
    rel = "/" + str(d.relative_to(cluster.mountpoint))  # type: ignore[arg-type]
    data = pattern(2 * CHUNK + 77, 4)
    with open(d / "from-mount", "wb") as f:
        f.write(data)
    # close-to-open: once close() returned, another client sees all of it
    with fs.open(f"{rel}/from-mount", "rb") as g:
        assert g.read() == data
    with fs.open(f"{rel}/from-api", "wb") as g:
        g.write(data[::-1])
    assert (d / "from-api").read_bytes() == data[::-1]
    # overwritten by another client: a new open through the mount sees the new bytes
    (d / "from-mount").read_bytes()  # cached in the kernel now
    with fs.open(f"{rel}/from-mount", "r+b") as g:
        g.write(b"Z" * 100)
    expected = b"Z" * 100 + data[100:]
    assert (d / "from-mount").read_bytes() == expected


def test_parallel_readers_and_big_listing(cluster: LocalCluster, d: Path) -> None:
    fs = cluster.client()
    rel = "/" + str(d.relative_to(cluster.mountpoint))  # type: ignore[arg-type]
    big = pattern(6 * CHUNK + 1234, 5)
    with fs.open(f"{rel}/big", "wb") as f:
        f.write(big)
    digests = {}
    for i in range(8):
        blob = pattern(300_000 + i, 200 + i)
        with fs.open(f"{rel}/small{i}", "wb") as f:
            f.write(blob)
        digests[f"small{i}"] = hashlib.sha256(blob).hexdigest()

    def read_range(k: int) -> bool:
        span = len(big) // 8
        with open(d / "big", "rb") as f:
            f.seek(k * span)
            return f.read(span) == big[k * span : (k + 1) * span]

    def read_small(name: str) -> bool:
        return hashlib.sha256((d / name).read_bytes()).hexdigest() == digests[name]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ranges = list(pool.map(read_range, range(8)))
        smalls = list(pool.map(read_small, sorted(digests)))
    assert all(ranges) and all(smalls)
    # a listing of several readdir pages (64 entries), with attributes (ls -l)
    names = {f"e{i:05d}" for i in range(300)}
    fs.mkdir(f"{rel}/many")
    for name in sorted(names):
        with fs.open(f"{rel}/many/{name}", "wb"):
            pass
    assert set(os.listdir(d / "many")) == names
    listing = run(["ls", "-la", str(d / "many")]).splitlines()
    assert len([ln for ln in listing if ln.endswith(tuple(names))]) == len(names)
    assert any(ln.endswith(" .") for ln in listing) and any(ln.endswith(" ..") for ln in listing)
    shutil.rmtree(d / "many")
    assert not (d / "many").exists()
