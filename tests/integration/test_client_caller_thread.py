"""Namespace calls of the sync FileSystem asked from the calling thread, on a real cluster.

What a user relies on: every namespace call (stat, exists, listdir, scandir,
mkdir, rename, remove, rmdir, links, attributes, xattrs, statfs) answers as it
did through the loop thread, errors with the same errno and path; a change
whose reply the calling thread never got is made once (the loop asks again
with the same request id and gets meta's recorded answer); kill -9 of meta
and a restart cost only the fallback; many threads at once, past the socket
bound, all get right answers; 0 sockets turns the path off; a bad setting is
refused with its name.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chainfs.client.config import ClientConfig
from chainfs.client.sync import FileSystem
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc import meta_client
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import in_threads, module_cluster, poll

pytestmark = pytest.mark.timeout(240)

# Calls the loop makes on its own (session ends after a close, keep-alives).
_BACKGROUND = frozenset({"EndSessions", "KeepAlive"})


SESSION_TIMEOUT_MS = 3_000  # meta's lease on a silent client's sessions (short for the test)


def _short_lease(_index: int, c: Any) -> None:
    c.session_timeout_ms = SESSION_TIMEOUT_MS
    c.session_prune_interval_ms = 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "caller-thread", configure_meta=_short_lease)


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> Iterator[FileSystem]:
    client = cluster.client()
    yield client
    client.close()


_dirs = iter(range(1 << 30))


@pytest.fixture
def d(fs: FileSystem) -> str:
    path = f"/ct{next(_dirs)}"
    fs.mkdir(path)
    return path


def _on_loop(
    fs: FileSystem, monkeypatch: pytest.MonkeyPatch, background: bool = False
) -> list[str]:
    """The meta calls this FileSystem sends through its loop thread from now
    on, by method name (the loop's own background calls left out unless
    ``background``). Each must run there as a loop call: in the loop thread,
    without run_in_caller's mark (else its own calls would block the loop)."""
    meta = fs.aio.io.meta
    sent: list[str] = []
    real = meta._call_on_loop

    async def counted(method: str, request: Any, attempted: Any = None) -> Any:
        assert fs._loop.in_loop_thread() and meta_client._in_caller.get() is None, method
        if background or method not in _BACKGROUND:
            sent.append(method)
        return await real(method, request, attempted)

    monkeypatch.setattr(meta, "_call_on_loop", counted)
    return sent


def _touch(fs: FileSystem, path: str, data: bytes = b"") -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def test_namespace_calls_answer_from_the_calling_thread(
    fs: FileSystem, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(fs, f"{d}/f", b"0123456789")
    on_loop = _on_loop(fs, monkeypatch)

    fs.mkdir(f"{d}/sub")
    fs.makedirs(f"{d}/a/b/c", exist_ok=True)
    fs.mkdir(f"{d}/a/b", parents=True, exist_ok=True)
    assert fs.isdir(f"{d}/a/b/c") and not fs.isfile(f"{d}/a/b/c")
    st = fs.stat(f"{d}/f")
    assert stat_mod.S_ISREG(st.st_mode) and st.st_size == 10
    assert fs.exists(f"{d}/f") and not fs.exists(f"{d}/absent")
    assert not fs.exists(f"{d}/f/below-a-file")  # ENOTDIR is "no" too
    fs.rename(f"{d}/f", f"{d}/g")
    fs.symlink("g", f"{d}/s")
    assert fs.readlink(f"{d}/s") == "g"
    assert stat_mod.S_ISLNK(fs.lstat(f"{d}/s").st_mode)
    assert fs.stat(f"{d}/s").st_ino == fs.stat(f"{d}/g").st_ino
    fs.link(f"{d}/g", f"{d}/h")
    assert fs.stat(f"{d}/h").st_nlink == 2
    fs.chmod(f"{d}/g", 0o640)
    fs.truncate(f"{d}/g", 4)
    fs.utime(f"{d}/g", ns=(1_000_000_000, 2_000_000_000))
    st = fs.stat(f"{d}/g")
    assert (stat_mod.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size) == (
        0o640,
        2_000_000_000,
        4,
    )
    fs.setxattr(f"{d}/g", "user.k", b"v")
    assert fs.getxattr(f"{d}/g", "user.k") == b"v"
    assert fs.listxattr(f"{d}/g") == ["user.k"]
    fs.removexattr(f"{d}/g", "user.k")
    fs.mknod(f"{d}/fifo", 0o600 | stat_mod.S_IFIFO)
    assert stat_mod.S_ISFIFO(fs.lstat(f"{d}/fifo").st_mode)
    assert fs.listdir(d) == ["a", "fifo", "g", "h", "s", "sub"]
    assert [(e.name, e.is_dir()) for e in fs.scandir(d)] == [
        ("a", True),
        ("fifo", False),
        ("g", False),
        ("h", False),
        ("s", False),
        ("sub", True),
    ]
    assert fs.statfs().f_bsize > 0
    for name in ("fifo", "h", "s"):
        fs.remove(f"{d}/{name}")
    fs.rmdir(f"{d}/sub")
    assert on_loop == []
    with fs.open(f"{d}/g", "rb") as f:  # what the calls left is what a read sees
        assert f.read() == b"0123"


def test_write_opens_ask_meta_from_the_calling_thread(
    fs: FileSystem, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creates and other write opens send their Open from the calling thread;
    what is written through them reads back whole, and refusals carry their
    errno. (Read-only opens stay on the loop: they share read sessions there.)"""
    _touch(fs, f"{d}/old", b"0123456789")
    on_loop = _on_loop(fs, monkeypatch)
    data = os.urandom(100_000)
    with fs.open(f"{d}/new", "wb") as f:
        f.write(data)
    fs.open(f"{d}/empty", "xb").close()
    with fs.open(f"{d}/old", "ab") as f:
        f.write(b"+")
    with fs.open(f"{d}/old", "r+b") as f:
        f.seek(2)
        f.write(b"AB")
    with fs.open(f"{d}/text", "w") as t:
        t.write("line\n")
    with pytest.raises(FileExistsError) as exists:
        fs.open(f"{d}/empty", "xb")
    assert (exists.value.errno, exists.value.filename) == (errno.EEXIST, f"{d}/empty")
    with pytest.raises(IsADirectoryError):
        fs.open(d, "wb")
    assert "Open" not in on_loop
    assert fs.read_file(f"{d}/new") == data
    assert fs.read_file(f"{d}/old") == b"01AB456789+"
    assert fs.read_file(f"{d}/empty") == b""
    assert fs.read_file(f"{d}/text") == b"line\n"


def test_a_write_open_from_the_calling_thread_keeps_its_session(
    cluster: LocalCluster, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keep-alives of a session opened from the calling thread run on the
    loop: meta does not take a client that holds a file open past its lease
    for a silent one (it would end the session: the file's chunks would no
    longer be kept for it), and the file then written closes with every byte."""
    with cluster.client() as fs:
        assert fs.exists(d)  # meta known: the open goes from the calling thread
        sent = _on_loop(fs, monkeypatch, background=True)
        f = fs.open(f"{d}/held", "wb")
        time.sleep(2.5 * SESSION_TIMEOUT_MS / 1000)  # a client that only holds the file
        assert "KeepAlive" in sent  # sent by the loop, as a loop call
        pruned = f"session of silent client {fs.aio.io.meta.client_id.hex()} on inode {f.inode}"
        assert pruned not in cluster.metas[0].log_path.read_text(errors="replace")
        data = os.urandom(50_000)
        f.write(data)
        f.close()
        assert fs.read_file(f"{d}/held") == data


def test_errors_from_the_calling_thread_carry_errno_and_path(
    fs: FileSystem, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(fs, f"{d}/f")
    fs.mkdir(f"{d}/full")
    _touch(fs, f"{d}/full/x")
    on_loop = _on_loop(fs, monkeypatch)
    cases: list[tuple[Any, tuple[Any, ...], type[OSError], int, str]] = [
        (fs.stat, (f"{d}/absent",), FileNotFoundError, errno.ENOENT, f"{d}/absent"),
        (fs.mkdir, (f"{d}/f",), FileExistsError, errno.EEXIST, f"{d}/f"),
        (fs.rmdir, (f"{d}/full",), OSError, errno.ENOTEMPTY, f"{d}/full"),
        (fs.listdir, (f"{d}/f",), NotADirectoryError, errno.ENOTDIR, f"{d}/f"),
        (fs.remove, (f"{d}/absent",), FileNotFoundError, errno.ENOENT, f"{d}/absent"),
        (fs.rename, (f"{d}/absent", f"{d}/z"), FileNotFoundError, errno.ENOENT, f"{d}/absent"),
        (fs.getxattr, (f"{d}/f", "user.none"), OSError, errno.ENODATA, f"{d}/f"),
        (fs.mkdir, (f"{d}/f", 0o777, True, True), FileExistsError, errno.EEXIST, f"{d}/f"),
    ]
    for call, args, kind, code, path in cases:
        with pytest.raises(kind) as got:
            call(*args)
        assert (got.value.errno, got.value.filename) == (code, path), (call, args)
    assert on_loop == []
    assert sorted(fs.listdir(d)) == ["f", "full"]  # nothing changed by the refusals


def test_a_change_whose_reply_was_lost_is_made_once(
    fs: FileSystem, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attempt from the calling thread reaches meta and is applied, but
    its reply is taken for lost: the loop sends the same request (same request
    id) and meta answers it from its record. A new request id would be refused
    (EEXIST, ENOENT) or applied twice. The first call carries the session end
    of the create before it (a request of its own in the same send): its reply
    is lost too, and the loop's sender ends that session."""
    _touch(fs, f"{d}/f")
    caller = fs._caller
    assert caller is not None
    real, real_many = caller.sync.request, caller.sync.request_many
    carried: list[int] = []

    def reply_lost(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise ChainfsError(Code.ETIMEDOUT, "test: the reply was lost")

    def replies_lost(requests: Any) -> Any:
        real_many(requests)
        carried.append(len(requests))
        return [ChainfsError(Code.ETIMEDOUT, "test: the reply was lost") for _ in requests]

    monkeypatch.setattr(caller.sync, "request", reply_lost)
    monkeypatch.setattr(caller.sync, "request_many", replies_lost)
    on_loop = _on_loop(fs, monkeypatch)
    fs.mkdir(f"{d}/new")
    fs.rename(f"{d}/f", f"{d}/new/f")
    fs.symlink("f", f"{d}/new/s")
    fs.link(f"{d}/new/f", f"{d}/new/h")
    fs.remove(f"{d}/new/s")
    fs.mkdir(f"{d}/gone")
    fs.rmdir(f"{d}/gone")
    assert on_loop == ["Mkdir", "Rename", "Symlink", "Link", "Unlink", "Mkdir", "Rmdir"]
    assert carried == [2]  # the create's session end went along with the first mkdir
    monkeypatch.undo()
    assert fs.listdir(d) == ["new"]
    assert fs.listdir(f"{d}/new") == ["f", "h"]
    assert fs.stat(f"{d}/new/f").st_nlink == 2


def test_calls_go_on_when_meta_restarts(
    cluster: LocalCluster, fs: FileSystem, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of meta and a restart on a new port while the calling thread
    holds a socket to it: the next call's attempt fails, the loop waits for
    the new meta, every answer is right; later calls ask from the thread again."""
    _touch(fs, f"{d}/f")
    assert fs.exists(f"{d}/f")  # a socket to meta is pooled now
    cluster.kill_meta(0)
    cluster.restart_meta(0)
    on_loop = _on_loop(fs, monkeypatch)
    fs.mkdir(f"{d}/after")
    assert 1 <= len(on_loop) <= 2  # the stale socket; maybe the refused new one
    settled = len(on_loop)
    name = f"{d}/f"
    for i in range(20):
        fs.rename(name, f"{d}/after/f{i}")
        name = f"{d}/after/f{i}"
        assert fs.stat(name).st_size == 0
    assert len(on_loop) == settled
    assert fs.listdir(f"{d}/after") == ["f19"]


def test_many_threads_past_the_socket_bound(cluster: LocalCluster, d: str) -> None:
    """16 threads, 2 sockets: calls past the bound take the loop thread; each
    thread's tree ends as its own calls left it."""
    with cluster.client(config=ClientConfig(meta_sync_connections=2)) as fs:

        def work(k: int) -> None:
            base = f"{d}/t{k}"
            fs.mkdir(base)
            for i in range(15):
                fs.mkdir(f"{base}/x{i}")
                fs.rename(f"{base}/x{i}", f"{base}/y{i}")
                assert fs.isdir(f"{base}/y{i}")
                if i % 3 == 0:
                    fs.rmdir(f"{base}/y{i}")

        assert in_threads(work, 16) == []
        want = sorted(f"y{i}" for i in range(15) if i % 3)
        for k in range(16):
            assert sorted(fs.listdir(f"{d}/t{k}")) == want
        assert fs._caller is not None
        meta_address = str(fs.aio.io.meta._current).removeprefix("frame://")
        assert 1 <= fs._caller.sync.connection_count(meta_address) <= 2


def test_zero_sockets_sends_every_call_through_the_loop(
    cluster: LocalCluster, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with cluster.client(config=ClientConfig(meta_sync_connections=0)) as fs:
        assert fs._caller is None
        on_loop = _on_loop(fs, monkeypatch)
        fs.mkdir(f"{d}/x")
        assert fs.listdir(d) == ["x"]
        with pytest.raises(FileNotFoundError):
            fs.stat(f"{d}/absent")
        assert on_loop == ["Mkdir", "Readdir", "Stat"]


@pytest.mark.parametrize("bad", [-1, 65])
def test_a_bad_socket_bound_is_refused_by_name(bad: int) -> None:
    with pytest.raises(ValueError, match="meta_sync_connections"):
        ClientConfig(meta_sync_connections=bad).validate()


def test_a_forked_child_asks_over_its_own_sockets(cluster: LocalCluster, d: str) -> None:
    """A fork()ed child's calls from the calling thread (a write open first)
    answer right, and the parent's pooled sockets stay usable. In a fresh
    interpreter: this one has gRPC loaded by other tests, whose objects a
    child must not collect (gRPC's finalizers hang after fork)."""
    code = f"""
import os, sys
sys.modules["grpc"] = None  # the client path never needs it
import chainfs
d = {d!r}
fs = chainfs.connect({cluster.address!r})
fs.mkdir(d + "/p")
assert fs.exists(d + "/p")  # a socket of the calling thread is pooled now
pid = os.fork()
if pid == 0:
    code = 1
    try:
        with fs.open(d + "/c.bin", "wb") as f:  # the child's first call: a write open
            f.write(b"from the child")
        fs.mkdir(d + "/c")
        code = 0 if fs.listdir(d) == ["c", "c.bin", "p"] else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
fs.mkdir(d + "/p2")
assert fs.listdir(d) == ["c", "c.bin", "p", "p2"]
assert fs.read_file(d + "/c.bin") == b"from the child"
fs.close()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr


def _removed(fs: FileSystem, ino: int) -> bool:
    """Whether meta has dropped inode ``ino`` (asked by number, as an open by
    inode would): an unlinked file is kept while a session holds it open."""
    try:
        fs._loop.run(fs.aio.io.meta.stat(ino, True))
    except ChainfsError as e:
        assert e.code == Code.ENOENT, e
        return True
    return False


def test_a_close_ends_its_session_along_with_the_next_call(
    cluster: LocalCluster, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create's close queues its session end in the calling thread, with no
    hop to the loop; a read's close queues it on the loop. The next call from
    a caller's thread carries both to meta in the same send. Seen at meta: a
    never-written file is removed by its unlink at once only when no session
    holds it, and the timer that would send the ends (session_end_delay_ms) is
    10 minutes away."""
    with cluster.client(config=ClientConfig(session_end_delay_ms=600_000)) as fs2:
        fs2.stat("/")  # the first call picks a meta server, on the loop
        on_loop = _on_loop(fs2, monkeypatch, background=True)
        f = fs2.open(f"{d}/created", "wb")
        created = f.inode
        f.close()
        fs2.open(f"{d}/read", "wb").close()
        f = fs2.open(f"{d}/read", "rb")  # read opens share read sessions on the loop
        read = f.inode
        f.close()
        fs2.stat(d)  # carries the three ends
        assert [m for m in on_loop if m != "KeepAlive"] == ["Open"]
        fs2.remove(f"{d}/created")
        fs2.remove(f"{d}/read")
        assert _removed(fs2, created) and _removed(fs2, read)


def test_a_session_end_left_unsent_goes_through_the_loop(
    cluster: LocalCluster, d: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ends that rode along a call whose requests got no answer go to the
    loop's sender, which ends them; none is lost (a lost one would hold the
    unlinked file for as long as the client lives). Without any later call,
    the sender ends a created file's session after session_end_delay_ms."""
    with cluster.client(config=ClientConfig(session_end_delay_ms=50)) as fs2:
        caller = fs2._caller
        assert caller is not None
        real_many = caller.sync.request_many

        def replies_lost(requests: Any) -> Any:
            real_many(requests[:1])  # the call is made; the session end never arrives
            return [ChainfsError(Code.ETIMEDOUT, "test: no answer") for _ in requests]

        fs2.stat("/")  # the first call picks a meta server, on the loop
        monkeypatch.setattr(caller.sync, "request_many", replies_lost)
        on_loop = _on_loop(fs2, monkeypatch, background=True)
        f = fs2.open(f"{d}/lost", "wb")
        lost = f.inode
        f.close()
        fs2.stat(d)
        assert on_loop[:1] == ["Stat"]  # the call itself, asked again on the loop
        fs2.remove(f"{d}/lost")  # maybe before the end arrives: then GC drops it after
        poll(lambda: _removed(fs2, lost), "the file whose session end was handed to the loop")
        monkeypatch.undo()
        f = fs2.open(f"{d}/alone", "wb")
        alone = f.inode
        f.close()  # and no call after it: the timer sends the end
        poll(lambda: "EndSessions" in on_loop, "the session end sent by the loop's timer")
        fs2.remove(f"{d}/alone")
        poll(lambda: _removed(fs2, alone), "the file whose session the timer ended")
