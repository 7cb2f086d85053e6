"""What clients of one cluster see of each other's changes (docs/consistency.md).

One cluster with its FUSE mount (A, absent names cached for 1 s), a second
mount (B, another process, defaults) and Python clients: this mount's own
changes are seen at once, other clients' after at most TIMEOUT_S (the
entry/attr/negative timeouts), and a file closed by one client is read whole
by an open() on another at once (close-to-open).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chainfs.client.sync import FileSystem
from chainfs.fuse_mount.config import MountConfig
from chainfs.local import LocalCluster
from chainfs.local.process import MountProcess
from tests.conftest import require
from tests.integration.fuse_fixtures import (
    force_unmount,
    is_mounted,
    mount_counts,
    mounted_cluster,
)

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

_DEFAULTS = MountConfig()
# Mount A also caches absent names (off by default), so that bound is tested too.
_NEGATIVE_MS = 1000
# The documented bound for other clients' changes, plus the kernel's jiffy rounding.
TIMEOUT_S = max(_DEFAULTS.attr_timeout_ms, _DEFAULTS.entry_timeout_ms, _NEGATIVE_MS) / 1000
_SLACK_S = 0.3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("fuse_consistency"))
    yield from mounted_cluster(base, options=[f"negative_timeout_ms={_NEGATIVE_MS}"])


@pytest.fixture(scope="module")
def mnt_a(cluster: LocalCluster) -> Path:
    assert cluster.mountpoint is not None
    return cluster.mountpoint


@pytest.fixture(scope="module")
def mnt_b(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = Path(tmp_path_factory.mktemp("second_mount"))
    mnt = base / "mnt"
    mnt.mkdir()
    proc = MountProcess(mnt, cluster.address, base / "proc")
    try:
        proc.start()
        assert is_mounted(mnt)
        yield mnt
    finally:
        proc.stop()
        force_unmount(mnt)


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> FileSystem:
    return cluster.client()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return "/" + request.node.name.replace("[", "-").replace("]", "")


def _size(path: Path) -> int:
    return os.stat(path).st_size


def _absent(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def _eventually(check: Callable[[], bool], what: str) -> float:
    """Seconds until ``check`` holds; fails when that takes longer than the timeout."""
    start = time.monotonic()
    while not check():
        waited = time.monotonic() - start
        assert waited < TIMEOUT_S + _SLACK_S, f"{what}: not seen after {waited:.2f}s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_lookups_at_once_share_meta_calls_and_answer_as_each_alone(
    cluster: LocalCluster, mnt_a: Path, fs: FileSystem, name: str
) -> None:
    """Lookups from many threads at once may go to meta together (BatchStat,
    the client's stat coalescer); each stat sees its own file's attributes,
    and an absent name is ENOENT, as with one lookup at a time."""
    proc = cluster.mount_process
    assert proc is not None
    fs.mkdir(name)
    files = 256
    for i in range(files):
        fs.write_file(f"{name}/f{i}", b"y" * (i % 17))  # through the client: nothing in A
    expected = {f"f{i}": (fs.stat(f"{name}/f{i}").st_ino, i % 17) for i in range(files)}
    d = mnt_a / name.lstrip("/")
    threads = 16
    start = threading.Barrier(threads)

    def stat_share(k: int) -> tuple[dict[str, tuple[int, int]], bool]:
        start.wait()  # all at once, so that lookups overlap
        mine = list(expected)[k::threads]
        got = {n: (os.stat(d / n).st_ino, _size(d / n)) for n in mine}
        return got, _absent(d / f"missing{k}")

    before = mount_counts(proc)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(stat_share, range(threads)))
    got = {n: v for part, _ in results for n, v in part.items()}
    assert got == expected
    missing = [absent for _, absent in results]
    assert all(missing)
    spent = mount_counts(proc) - before
    # Every first lookup asked meta, alone or in a BatchStat with others (how
    # many overlap is up to the scheduler; the client test checks that they do).
    assert spent.meta["StatPaths"] >= len(expected), spent


def test_own_changes_are_seen_at_once(mnt_a: Path, name: str) -> None:
    d = mnt_a / name.lstrip("/")
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"")
    assert os.listdir(d) == ["f"] and _size(f) == 0  # both now cached
    fd = os.open(f, os.O_WRONLY)
    os.write(fd, b"x" * 100)
    assert _size(f) == 100  # while still open
    os.close(fd)
    assert _size(f) == 100 and os.listdir(d) == ["f"]
    os.truncate(f, 10)
    assert _size(f) == 10
    os.chmod(f, 0o600)
    assert os.stat(f).st_mode & 0o7777 == 0o600
    os.rename(f, d / "g")
    assert _absent(f) and _size(d / "g") == 10 and os.listdir(d) == ["g"]
    (d / "h").write_bytes(b"hello")
    assert sorted(os.listdir(d)) == ["g", "h"]
    os.unlink(d / "g")
    assert _absent(d / "g") and os.listdir(d) == ["h"]


def test_absent_names_are_answered_from_the_name_list_while_other_directories_change(
    cluster: LocalCluster, mnt_a: Path, name: str
) -> None:
    """With negative_timeout_ms set, lookups of absent names in a directory are
    answered from the mount's list of its names, also while other programs
    change other directories through the same mount (a list is dropped only
    for a change of its own directory), and a name created in it through the
    mount is found at once. Whether a change elsewhere lands during the fetch
    is up to the scheduler here; tests/unit/test_fuse_names.py places it there."""
    proc = cluster.mount_process
    assert proc is not None
    d, busy = mnt_a / name.lstrip("/"), mnt_a / (name.lstrip("/") + "-busy")
    d.mkdir()
    busy.mkdir()
    for i in range(2000):  # a listing that takes meta milliseconds
        os.mknod(d / f"present{i}")
    stop = threading.Event()

    def churn(k: int) -> None:  # creates and unlinks in another directory, all along
        i = 0
        while not stop.is_set():
            p = busy / f"f{k}-{i % 8}"
            os.mknod(p)
            p.unlink()
            i += 1

    churners = [threading.Thread(target=churn, args=(k,)) for k in range(3)]
    for t in churners:
        t.start()
    try:
        # The list the mount kept since it made d expires; the next is fetched
        # from meta while the churn goes on.
        time.sleep(_NEGATIVE_MS / 1000 + 0.2)
        t0 = time.monotonic()
        assert not (d / "absent-first").exists()  # meta answers it, and lists d
    finally:
        stop.set()
        for t in churners:
            t.join()
    # The churn is over (its own lookups in busy are meta calls too): every
    # call counted from here on is for d.
    before = mount_counts(proc)
    absent = [not (d / f"absent{i}").exists() for i in range(50)]
    elapsed = time.monotonic() - t0
    spent = mount_counts(proc) - before
    assert all(absent) and all((d / f"present{i}").exists() for i in range(2000))
    # The list fetched during the churn answers them all (fetched again, with
    # one lookup at meta, once per negative_timeout_ms since the first).
    relists = int(elapsed * 1000 / _NEGATIVE_MS)
    assert spent.fuse["lookup"] >= len(absent), spent  # the kernel asked the mount
    assert spent.meta["Readdir"] <= relists, (spent, elapsed)
    assert spent.meta["StatPaths"] <= relists, (spent, elapsed)
    (d / "new").write_bytes(b"z")  # created through this mount: found at once
    assert (d / "new").exists() and not (d / "absent-again").exists()


def test_directory_attributes_after_own_changes_come_without_a_stat(
    cluster: LocalCluster, mnt_a: Path, fs: FileSystem, name: str
) -> None:
    """After each change through the mount the kernel asks for the changed
    directory's attributes again; the mount answers from meta's reply to the
    change (no Stat), and what it answers is what meta says."""
    proc = cluster.mount_process
    assert proc is not None
    d, other = mnt_a / name.lstrip("/"), mnt_a / (name.lstrip("/") + "-other")
    d.mkdir()
    other.mkdir()
    os.stat(d)

    def same_as_meta(path: Path, nlink: int) -> None:
        mine, theirs = os.stat(path), fs.stat("/" + str(path.relative_to(mnt_a)))
        assert (mine.st_nlink, mine.st_mtime_ns, mine.st_ctime_ns) == (
            theirs.st_nlink,
            theirs.st_mtime_ns,
            theirs.st_ctime_ns,
        ), path
        assert mine.st_nlink == nlink, path

    changes: list[tuple[Callable[[], object], list[tuple[Path, int]]]] = [
        (lambda: os.close(os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o644)), [(d, 2)]),
        (lambda: os.mkdir(d / "sub"), [(d, 3)]),
        (lambda: os.rename(d / "f", d / "g"), [(d, 3)]),
        (lambda: os.rename(d / "sub", other / "sub"), [(d, 2), (other, 3)]),
        (lambda: os.link(d / "g", other / "g2"), [(other, 3)]),
        (lambda: os.symlink("g", d / "s"), [(d, 2)]),
        (lambda: os.unlink(d / "g"), [(d, 2)]),
        (lambda: os.rmdir(other / "sub"), [(other, 2)]),
    ]
    before = mount_counts(proc)
    for change, dirs in changes:
        change()
        for path, nlink in dirs:
            same_as_meta(path, nlink)
    spent = mount_counts(proc) - before
    # Every stat of a changed directory was answered from the change's reply...
    assert spent.local["getattr"] >= len(changes), spent
    # ...so meta saw fewer Stats than the kernel sent lookups and getattrs (one each before).
    assert spent.meta["StatPaths"] <= spent.fuse["lookup"] + spent.fuse["getattr"] - len(changes)

    # Another client's change to a directory this mount knows shows within the timeout.
    fs.mkdir(f"{name}/theirs")
    _eventually(lambda: os.stat(d).st_nlink == 3, "a subdirectory made elsewhere")
    same_as_meta(d, 3)


def test_file_attributes_after_own_changes_come_without_a_stat(
    cluster: LocalCluster, mnt_a: Path, fs: FileSystem, name: str
) -> None:
    """After close(2) of a file written here, and around a chown, the kernel
    asks for the file's attributes again; the mount answers from meta's replies
    to its own length report and setattrs (no Stat), and what it answers is
    what meta says. Another client's change still shows within the timeout."""
    proc = cluster.mount_process
    assert proc is not None
    d = mnt_a / name.lstrip("/")
    d.mkdir()
    f, theirs = d / "f", f"{name}/f"

    def same_as_meta() -> os.stat_result:
        mine, meta = os.stat(f), fs.stat(theirs)
        assert (mine.st_size, mine.st_mode, mine.st_nlink, mine.st_uid, mine.st_gid) == (
            meta.st_size,
            meta.st_mode,
            meta.st_nlink,
            meta.st_uid,
            meta.st_gid,
        )
        assert (mine.st_mtime_ns, mine.st_ctime_ns) == (meta.st_mtime_ns, meta.st_ctime_ns)
        return mine

    before = mount_counts(proc)
    with open(f, "wb") as out:
        out.write(b"x" * 5000)
    assert os.stat(f).st_size == 5000  # the write dropped the kernel's attributes
    os.chown(f, os.getuid(), os.getgid())  # the kernel reads the mode first (setuid drop)
    os.chmod(f, 0o640)
    os.utime(f, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    spent = mount_counts(proc) - before
    mine = same_as_meta()
    assert (mine.st_size, mine.st_mode & 0o7777) == (5000, 0o640)
    assert mine.st_mtime_ns == 1_600_000_000_123_456_789
    assert spent.local["getattr"] >= 2, spent  # after the write, and the chown's
    assert spent.meta["StatPaths"] <= 1, spent  # at most the new name's lookup

    fs.chmod(theirs, 0o604)
    _eventually(lambda: os.stat(f).st_mode & 0o7777 == 0o604, "a chmod made elsewhere")
    same_as_meta()


def test_a_listing_repeated_after_a_write_shows_the_new_length(mnt_a: Path, name: str) -> None:
    d = mnt_a / name.lstrip("/")
    d.mkdir()
    for i in range(20):
        (d / f"e{i}").write_bytes(b"")
    assert len(os.listdir(d)) == 20  # fetched once, kept by the mount
    assert len(os.listdir(d)) == 20
    (d / "e7").write_bytes(b"y" * 4321)
    entries = {e.name: e.stat().st_size for e in os.scandir(d)}
    assert entries["e7"] == 4321
    assert _size(d / "e7") == 4321


def test_close_to_open_sees_another_clients_bytes_at_once(
    mnt_a: Path, fs: FileSystem, name: str
) -> None:
    p = mnt_a / name.lstrip("/")
    fs.write_file(name, b"v1")
    _eventually(lambda: not _absent(p), "a name created elsewhere")  # may be cached as absent
    assert p.read_bytes() == b"v1"  # length 2 now cached in the kernel
    data = os.urandom(50_000)
    fs.write_file(name, data)  # closed: meta has the new length
    assert p.read_bytes() == data


def test_another_clients_changes_show_within_the_timeout(
    mnt_a: Path, fs: FileSystem, name: str
) -> None:
    d = mnt_a / name.lstrip("/")
    fs.mkdir(name)
    fs.write_file(f"{name}/old", b"12345")
    assert os.listdir(d) == ["old"] and _size(d / "old") == 5 and _absent(d / "new")
    fs.write_file(f"{name}/new", b"abc")  # a name the kernel has cached as absent
    fs.chmod(f"{name}/old", 0o640)
    _eventually(lambda: not _absent(d / "new"), "a name created elsewhere")
    _eventually(lambda: os.stat(d / "old").st_mode & 0o777 == 0o640, "a chmod elsewhere")
    _eventually(lambda: sorted(os.listdir(d)) == ["new", "old"], "the listing")
    fs.rename(f"{name}/old", f"{name}/renamed")
    fs.remove(f"{name}/new")
    _eventually(lambda: _absent(d / "old") and _absent(d / "new"), "names removed elsewhere")
    _eventually(lambda: os.listdir(d) == ["renamed"], "the listing after rename")
    assert _size(d / "renamed") == 5


# -- races between two mounts and a Python client ------------------------------------

_OPS_PER_ACTOR = 120
_CONTESTED = 40


class _Actor:
    """Runs seeded create/rename/unlink on its own names; the model is what it got acked."""

    def __init__(self, tag: str, seed: int, ops: dict[str, Callable[..., None]]) -> None:
        self.tag = tag
        self.rng = random.Random(seed)
        self.ops = ops
        self.names: set[str] = set()  # the actor's names that exist, per its acks
        self.won: set[str] = set()  # contested names this actor created

    def step(self) -> None:
        pool = [f"{self.tag}{i}" for i in range(12)]
        kind = self.rng.choice(["create", "create", "rename", "unlink"])
        a, b = self.rng.choice(pool), self.rng.choice(pool)
        if kind == "create":
            if self._expect(a not in self.names, self.ops["create"], a):
                self.names.add(a)
        elif kind == "rename":
            if self._expect(a in self.names, self.ops["rename"], a, b):
                self.names.discard(a)
                self.names.add(b)
        elif self._expect(a in self.names, self.ops["unlink"], a):
            self.names.discard(a)

    @staticmethod
    def _expect(succeeds: bool, fn: Callable[..., None], *args: str) -> bool:
        """Run one operation; its outcome must be the model's. True when acknowledged."""
        try:
            fn(*args)
        except FileExistsError:
            assert not succeeds, f"{fn.__name__}{args}: EEXIST for a name that is not there"
            return False
        except FileNotFoundError:
            assert not succeeds, f"{fn.__name__}{args}: ENOENT for a name that is there"
            return False
        assert succeeds, f"{fn.__name__}{args}: acknowledged, but the model says it fails"
        return True

    def claim(self, order: list[int]) -> None:
        for i in order:
            try:
                self.ops["create"](f"c{i}")
            except FileExistsError:
                continue
            self.won.add(f"c{i}")

    def run(self, order: list[int]) -> None:
        for k in range(_OPS_PER_ACTOR):
            self.step()
            if k == _OPS_PER_ACTOR // 2:
                self.claim(order)


def _mount_ops(d: Path) -> dict[str, Callable[..., None]]:
    def create(n: str) -> None:
        os.close(os.open(d / n, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    def rename(a: str, b: str) -> None:
        os.rename(d / a, d / b)

    def unlink(n: str) -> None:
        os.unlink(d / n)

    return {"create": create, "rename": rename, "unlink": unlink}


def _client_ops(fs: FileSystem, d: str) -> dict[str, Callable[..., None]]:
    def create(n: str) -> None:
        fs.open(f"{d}/{n}", "xb").close()

    def rename(a: str, b: str) -> None:
        fs.rename(f"{d}/{a}", f"{d}/{b}")

    def unlink(n: str) -> None:
        fs.remove(f"{d}/{n}")

    return {"create": create, "rename": rename, "unlink": unlink}


@pytest.mark.parametrize("seed", [7, 1234])
def test_racing_creates_renames_unlinks_lose_and_duplicate_nothing(
    mnt_a: Path, mnt_b: Path, fs: FileSystem, name: str, seed: int
) -> None:
    fs.mkdir(name)
    rel = name.lstrip("/")
    actors = [
        _Actor("a", seed, _mount_ops(mnt_a / rel)),
        _Actor("b", seed + 1, _mount_ops(mnt_b / rel)),
        _Actor("p", seed + 2, _client_ops(fs, name)),
    ]
    orders = [random.Random(seed + 10 + i).sample(range(_CONTESTED), _CONTESTED) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for f in [pool.submit(a.run, o) for a, o in zip(actors, orders, strict=True)]:
            f.result()
    winners = [c for a in actors for c in a.won]
    assert sorted(winners) == sorted(f"c{i}" for i in range(_CONTESTED)), "one winner per name"
    expected = sorted(set(winners).union(*(a.names for a in actors)))
    time.sleep(TIMEOUT_S + _SLACK_S)
    for seen, where in (
        (sorted(os.listdir(mnt_a / rel)), "mount A"),
        (sorted(os.listdir(mnt_b / rel)), "mount B"),
        (sorted(fs.listdir(name)), "the client"),
    ):
        assert seen == expected, f"{where} lists {seen}, acknowledged ops give {expected}"
    for n in expected:
        assert not _absent(mnt_a / rel / n) and not _absent(mnt_b / rel / n)


def test_stat_of_a_removed_name_answers_enoent(mnt_a: Path, fs: FileSystem, name: str) -> None:
    fs.write_file(name, b"z")
    p = mnt_a / name.lstrip("/")
    assert _size(p) == 1
    os.unlink(p)
    with pytest.raises(OSError) as e:
        os.stat(p)
    assert e.value.errno == errno.ENOENT


_BLOCK = 4096


def _direct_reads(path: Path, offsets: list[int], threads: int) -> dict[int, bytes]:
    """4 KiB O_DIRECT reads of ``path`` at ``offsets``, ``threads`` at a time (one open)."""
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:

        def one(off: int) -> tuple[int, bytes]:
            buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT wants
            try:
                n = os.preadv(fd, [buf], off)
                return off, bytes(buf[:n])
            finally:
                buf.close()

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            return dict(pool.map(one, offsets))
    finally:
        os.close(fd)


def test_concurrent_o_direct_reads_return_the_bytes_written(
    mnt_a: Path, fs: FileSystem, name: str
) -> None:
    data = os.urandom(6 * 1024 * 1024 + 1000)  # a short last block, past a chunk or more
    fs.write_file(name, data)
    p = mnt_a / name.lstrip("/")
    _eventually(lambda: not _absent(p), "a name created elsewhere")
    rng = random.Random(14)
    offsets = [rng.randrange(0, len(data) // _BLOCK + 1) * _BLOCK for _ in range(1500)]
    got = _direct_reads(p, offsets, threads=16)
    for off in offsets:
        assert got[off] == data[off : off + _BLOCK], off


_WRITER = """
import os, sys
path, progress, generations, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for gen in range(1, generations + 1):
    with open(path, "r+b") as f:
        for off in range(0, size, 1 << 20):
            f.write(bytes([gen]) * min(1 << 20, size - off))
    # closed: every later open must see this generation (or a newer one) everywhere
    with open(progress + ".tmp", "w") as f:
        f.write(str(gen))
    os.replace(progress + ".tmp", progress)
"""


def test_direct_reads_racing_a_writer_process_see_close_to_open(
    mnt_a: Path, name: str, tmp_path: Path
) -> None:
    """Each 4 KiB block read after an open holds one generation, never older than
    the last generation whose close returned before that open."""
    size = 3 * 1024 * 1024
    p = mnt_a / name.lstrip("/")
    p.write_bytes(bytes(size))
    progress = tmp_path / "progress"
    progress.write_text("0")
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(p), str(progress), "12", str(size)]
    )
    rng = random.Random(7)
    rounds = 0
    try:
        while True:
            done = writer.poll() is not None
            closed_gen = int(progress.read_text())
            offsets = [rng.randrange(0, size // _BLOCK) * _BLOCK for _ in range(64)]
            for off, block in _direct_reads(p, offsets, threads=16).items():
                assert len(block) == _BLOCK, off
                assert block == bytes([block[0]]) * _BLOCK, f"block at {off} mixes generations"
                assert block[0] >= closed_gen, (off, block[0], closed_gen)
            rounds += 1
            if done:
                break
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert rounds >= 2
    assert _direct_reads(p, [0, size - _BLOCK], threads=2)[0] == bytes([12]) * _BLOCK


def test_the_kernel_keeps_max_background_requests_in_flight(mnt_a: Path) -> None:
    """Async direct reads at queue depth 16 all reach the mount (the kernel's
    default bound is 12); read through the FUSE control file system."""
    from chainfs.fuse_mount.mount import mount_device

    dev = mount_device(str(mnt_a))
    assert dev is not None
    with _fusectl() as connections:
        ctl = connections / dev.split(":")[1]
        want = MountConfig().max_background
        assert int((ctl / "max_background").read_text()) == want
        assert int((ctl / "congestion_threshold").read_text()) == want * 3 // 4


@contextlib.contextmanager
def _fusectl() -> Iterator[Path]:
    """/sys/fs/fuse/connections, with the FUSE control file system mounted
    there for the block (and unmounted after) when nobody had mounted it."""
    connections = Path("/sys/fs/fuse/connections")
    if any(connections.iterdir()) or is_mounted(connections):
        yield connections
        return
    done = subprocess.run(
        ["mount", "-t", "fusectl", "fusectl", str(connections)], capture_output=True, text=True
    )
    require("fusectl", done.returncode == 0, f"mount -t fusectl failed: {done.stderr.strip()}")
    try:
        yield connections
    finally:
        subprocess.run(["umount", str(connections)], check=True, timeout=60)
