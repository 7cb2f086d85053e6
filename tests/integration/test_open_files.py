"""An open file stays readable after its last name goes (unlink, rename over it)
until it is closed, from the Python client and through the FUSE mount; a client
killed while holding a file open pins its chunks only until its session lease
runs out. Real processes: mgmtd, meta, 3 storage nodes, a FUSE mount, and a
killed client process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.client.config import ClientConfig
from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import pattern, stored_chunks
from tests.integration.fuse_fixtures import (
    force_unmount,
    is_mounted,
    mount_counts,
    require_fuse,
)

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
CHUNK = 4 * MiB  # meta's default chunk size
SIZE = 2 * CHUNK + 12_345  # three chunks, the last one partial
SESSION_TIMEOUT_MS = 3_000  # meta's lease on sessions of a silent client (short for the test)
DEADLINE_S = 60.0  # bound on any polled condition


def short_lease(_index: int, c: Any) -> None:
    """Meta closes the sessions of a silent client after a few seconds."""
    c.session_timeout_ms = SESSION_TIMEOUT_MS
    c.session_prune_interval_ms = 200
    c.gc_interval_ms = 200


def _fuse_available() -> bool:
    try:
        require_fuse()
    except pytest.skip.Exception:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("open-unlink"))
    mnt = base / "mnt"
    mnt.mkdir()
    mount = mnt if _fuse_available() else None
    try:
        with LocalCluster(
            base / "cluster",
            mount=mount,
            mount_options=["attr_timeout_ms=0"],
            configure_meta=short_lease,
        ) as c:
            yield c
            dead = c.dead_processes()
            assert not dead, f"processes died during the tests: {dead}"
    finally:
        if mount is not None:
            force_unmount(mnt)
    assert not is_mounted(mnt)


def poll(pred: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"not reached within {timeout_s:g}s: {what}"
        time.sleep(0.05)


def chunks_of(fs: FileSystem, ino: int, chains: tuple[int, ...]) -> int:
    """Chunks of ``ino`` held by storage (asked at each chain's tail)."""

    async def count() -> int:
        return sum([len(await stored_chunks(fs.aio, c, ino)) for c in set(chains)])

    return fs._loop.run(count())


def no_chunks(fs: FileSystem, ino: int, chains: tuple[int, ...]) -> Callable[[], bool]:
    return lambda: chunks_of(fs, ino, chains) == 0


def write_file(fs: FileSystem, path: str, data: bytes) -> tuple[int, tuple[int, ...]]:
    with fs.open(path, "wb") as f:
        f.write(data)
        ino, chains = f.inode, f._af.layout.chains
    assert chunks_of(fs, ino, chains) == 3
    return ino, chains


def gc_has_run(fs: FileSystem, name: str) -> None:
    """Remove a file nobody has open and wait for its chunks to go: once it is
    collected, GC has run after every earlier removal."""
    ino, chains = write_file(fs, name, pattern(SIZE, name))
    fs.remove(name)
    poll(no_chunks(fs, ino, chains), f"GC of the unopened {name}")


def test_a_closed_read_session_ends_with_the_next_call_to_meta(cluster: LocalCluster) -> None:
    """A read close queues its session end (close does not wait for meta); the
    next call this client makes to meta takes the queued end along, so the
    removed file's chunks go without waiting for session_end_delay_ms."""
    writer = cluster.client()
    reader = cluster.client(config=ClientConfig(session_end_delay_ms=600_000))
    ino, chains = write_file(writer, "/ride-along", pattern(SIZE, "ride-along"))
    f = reader.open("/ride-along", "rb", buffering=0)
    assert f.read(10) == pattern(SIZE, "ride-along")[:10]
    writer.remove("/ride-along")
    f.close()  # the end is queued, held back by the 10-minute delay ...
    gc_has_run(writer, "/control-ride-along")
    assert chunks_of(writer, ino, chains) == 3  # ... so the reader still pins the chunks
    reader.stat("/")  # ... until the next call to meta carries it
    poll(no_chunks(writer, ino, chains), "chunks dropped once the session end rode along")


@pytest.mark.parametrize("how", ["unlink", "rename-over"])
def test_an_open_file_is_read_whole_after_another_client_removes_it(
    cluster: LocalCluster, how: str
) -> None:
    writer, reader = cluster.client(), cluster.client()
    path, data = f"/victim-{how}", pattern(SIZE, how)
    ino, chains = write_file(writer, path, data)
    f = reader.open(path, "rb", buffering=0)
    try:
        assert f.read(100) == data[:100]
        if how == "unlink":
            writer.remove(path)
        else:
            writer.write_file(f"{path}.new", b"replacement")
            writer.rename(f"{path}.new", path)
            assert writer.read_file(path) == b"replacement"
        assert not writer.exists(path) or how == "rename-over"
        gc_has_run(writer, f"/control-{how}")
        assert chunks_of(writer, ino, chains) == 3  # kept for the open file
        f.seek(0)
        assert f.read() == data  # every byte, after GC had its chance
    finally:
        f.close()
    poll(no_chunks(writer, ino, chains), "chunks dropped after the last close")


def test_opens_of_one_file_share_one_read_session(cluster: LocalCluster) -> None:
    fs, other = cluster.client(), cluster.client()
    a, b = pattern(SIZE, "share-a"), pattern(5000, "share-b")
    ino_a, chains_a = write_file(fs, "/share", a)
    f1, f2 = fs.open("/share", "rb"), fs.open("/share", "rb")
    assert fs.aio.io.read_session_opens() == {ino_a: 2}
    other.write_file("/share.new", b)
    other.rename("/share.new", "/share")  # the path now names another file
    f3 = fs.open("/share", "rb")  # gets a session of its own for the new file
    assert f3.inode != ino_a and set(fs.aio.io.read_session_opens()) == {ino_a, f3.inode}
    gc_has_run(other, "/control-share")
    f1.close()
    assert f3.read() == b and f2.read() == a  # the replaced file is kept for f2
    f2.close()
    f3.close()
    poll(no_chunks(fs, ino_a, chains_a), "the replaced file dropped after its last close")
    assert fs.aio.io.read_session_opens() == {} and fs.aio.io.wants_read_session("/share")


def test_an_open_fd_in_the_mount_reads_whole_after_removal(cluster: LocalCluster) -> None:
    require_fuse()
    assert cluster.mountpoint is not None
    fs = cluster.client()
    for remover in ("mount", "other-client"):
        name = f"fuse-victim-{remover}"
        data = pattern(SIZE, name)
        ino, chains = write_file(fs, f"/{name}", data)
        fd = os.open(cluster.mountpoint / name, os.O_RDONLY)
        try:
            assert os.pread(fd, 10, 0) == data[:10]
            if remover == "mount":
                os.unlink(cluster.mountpoint / name)  # rm through the mount itself
            else:
                fs.remove(f"/{name}")
            assert not fs.exists(f"/{name}")
            gc_has_run(fs, f"/fuse-control-{remover}")
            assert chunks_of(fs, ino, chains) == 3
            got = bytearray()
            while len(got) < SIZE:
                piece = os.pread(fd, 1 * MiB, len(got))
                assert piece, f"short read at {len(got)}"
                got += piece
            assert bytes(got) == data
        finally:
            os.close(fd)
        poll(no_chunks(fs, ino, chains), f"chunks of {name} dropped after close")


def test_a_file_written_in_the_mount_is_closed_without_a_close_call(
    cluster: LocalCluster,
) -> None:
    """close(2) reports the length (FUSE flush); the release that follows only
    ends the write session, in the background with the next call to meta: no
    Close RPC per file, other clients read every byte, and the session does
    end (the file's chunks go once another client removes it)."""
    require_fuse()
    proc = cluster.mount_process
    assert cluster.mountpoint is not None and proc is not None
    fs = cluster.client()
    d = cluster.mountpoint / "closed-in-the-background"
    d.mkdir()
    files = {f"f{i}": pattern(100_000 + i, f"bg-{i}") for i in range(8)}
    before = mount_counts(proc)
    for fname, data in files.items():
        with open(d / fname, "wb") as f:
            f.write(data)
    os.stat(d)  # one more call to meta: the queued session ends leave with it at the latest
    spent = mount_counts(proc) - before
    assert spent.meta["Close"] == 0, spent
    assert spent.fuse["release"] == len(files), spent
    for fname, data in files.items():
        assert fs.read_file(f"/closed-in-the-background/{fname}") == data
    with fs.open("/closed-in-the-background/f0", "rb") as f:
        ino, chains = f.inode, f._af.layout.chains
    assert chunks_of(fs, ino, chains) >= 1
    fs.remove("/closed-in-the-background/f0")
    poll(no_chunks(fs, ino, chains), "chunks dropped: the mount's write session ended")


_HOLDER = """
import sys, time
import chainfs
fs = chainfs.connect(sys.argv[1])
f = fs.open(sys.argv[2], "rb")
sys.stdout.write(f.read(16).hex() + "\\n")
sys.stdout.flush()
time.sleep(600)
"""


def test_a_killed_client_pins_chunks_only_until_its_lease_ends(cluster: LocalCluster) -> None:
    fs = cluster.client()
    path, data = "/held-by-killed", pattern(SIZE, "killed")
    ino, chains = write_file(fs, path, data)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, cluster.address, path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == data[:16].hex()  # open, and read
        fs.remove(path)
        gc_has_run(fs, "/control-killed")
        assert chunks_of(fs, ino, chains) == 3  # the live holder keeps them
        holder.kill()  # SIGKILL: no close, no keep-alive any more
        holder.wait(timeout=30)
        poll(
            lambda: chunks_of(fs, ino, chains) == 0,
            "chunks dropped once the killed client's lease ran out",
        )
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)


# -- buffering ---------------------------------------------------------------------
def fetched(fs: FileSystem, read: Callable[[], bytes]) -> tuple[bytes, int]:
    """What ``read`` returned and how many bytes the client asked of storage for it."""
    before = fs.aio.storage_read_bytes
    got = read()
    return got, fs.aio.storage_read_bytes - before


@pytest.fixture(scope="module")
def big(cluster: LocalCluster) -> tuple[FileSystem, str, bytes]:
    fs = cluster.client()
    path, data = "/buffering.bin", pattern(SIZE, "buffering")
    write_file(fs, path, data)
    return fs, path, data


def test_unbuffered_reads_fetch_exactly_what_they_ask(
    big: tuple[FileSystem, str, bytes],
) -> None:
    fs, path, data = big
    with fs.open(path, "rb", buffering=0) as f:
        for offset in (0, 123_457, CHUNK - 2048, SIZE - 4096, 7 * 4096):
            f.seek(offset)
            got, cost = fetched(fs, lambda: f.read(4096))
            assert got == data[offset : offset + 4096]
            assert cost == 4096  # a 4 KiB random read costs 4 KiB (one crosses a chunk)
        f.seek(SIZE - 100)
        got, cost = fetched(fs, lambda: f.read(4096))
        assert got == data[-100:] and cost == 100  # clamped at the end of the file
        f.seek(10)
        b = bytearray(5000)
        assert f.readinto(b) == 5000 and bytes(b) == data[10:5010]
        f.seek(0)
        assert f.readline() == data[: data.index(b"\n") + 1]


def test_a_buffer_of_n_bytes(big: tuple[FileSystem, str, bytes]) -> None:
    fs, path, data = big
    n = 256 * 1024
    with fs.open(path, "rb", buffering=n) as f:
        f.seek(1_000_000)
        got, cost = fetched(fs, lambda: f.read(4096))
        assert got == data[1_000_000:1_004_096] and cost == n
        got, cost = fetched(fs, lambda: f.read(100_000))  # inside the buffer: no fetch
        assert got == data[1_004_096:1_104_096] and cost == 0
        got, cost = fetched(fs, lambda: f.read(n + 1))  # larger than the buffer: direct
        assert got == data[1_104_096 : 1_104_096 + n + 1] and cost <= n + 1


def test_default_buffer_adapts_small_random_and_growing_sequential(
    big: tuple[FileSystem, str, bytes],
) -> None:
    fs, path, data = big
    cfg = fs.config
    with fs.open(path, "rb") as f:
        for offset in (3 * 4096 * 41, CHUNK + 12_288, 77_777):
            f.seek(offset)
            got, cost = fetched(fs, lambda: f.read(4096))
            assert got == data[offset : offset + 4096]
            assert cost == cfg.read_ahead_min_bytes  # a random read: no 1 MiB fetch
        f.seek(0)
        refills: list[int] = []
        pos = 0
        while pos < 4 * cfg.read_buffer_bytes:
            got, cost = fetched(fs, lambda: f.read(4096))
            assert got == data[pos : pos + 4096]
            pos += 4096
            if cost:
                refills.append(cost)
        assert refills[0] <= 2 * cfg.read_ahead_min_bytes
        assert max(refills) >= cfg.read_buffer_bytes  # grew: sequential reads fetch ahead
        # Read-ahead keeps whole chunks in flight, bounded per file by read_ahead_bytes.
        assert sum(refills) <= pos + cfg.read_buffer_bytes + cfg.read_ahead_bytes


def test_buffering_arguments_follow_builtin_open(
    cluster: LocalCluster, big: tuple[FileSystem, str, bytes]
) -> None:
    fs, path, _ = big
    with pytest.raises(ValueError, match="unbuffered text"):
        fs.open(path, "r", buffering=0)
    with pytest.warns(RuntimeWarning, match="line buffering"):
        fs.open(path, "rb", buffering=1).close()
    with pytest.raises(ValueError):
        fs.open(path, "rb", buffering=-2)
    with fs.open("/lines.txt", "w", buffering=1) as t:
        assert t.line_buffering
        t.write("one\n")
    assert fs.read_file("/lines.txt") == b"one\n"
    # Unbuffered write: on storage when write() returns, before flush or close.
    with fs.open("/unbuffered.bin", "wb", buffering=0) as w:
        assert w.write(b"0123456789") == 10
        lay = w._af.layout

        async def lengths() -> list[int]:
            out = []
            for c in set(lay.chains):
                out += [m.length for m in await stored_chunks(fs.aio, c, w.inode)]
            return out

        assert fs._loop.run(lengths()) == [10]
    assert fs.read_file("/unbuffered.bin") == b"0123456789"


def test_closing_the_client_sends_queued_session_ends_at_once(cluster: LocalCluster) -> None:
    """A FileSystem closed with session ends queued (held back by a long
    session_end_delay_ms) sends them at once instead of waiting out the delay."""
    writer = cluster.client()
    reader = cluster.client(config=ClientConfig(session_end_delay_ms=600_000))
    ino, chains = write_file(writer, "/closing", pattern(SIZE, "closing"))
    f = reader.open("/closing", "rb", buffering=0)
    f.read(10)
    writer.remove("/closing")
    f.close()  # the end is queued behind the 10-minute delay
    started = time.monotonic()
    reader.close()
    assert time.monotonic() - started < DEADLINE_S  # not the 600 s delay
    poll(no_chunks(writer, ino, chains), "chunks dropped once the client closed")
