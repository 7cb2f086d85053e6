"""The client against a real LocalCluster: bytes round-trip through every API, errors.

One cluster (mgmtd, 3 storage nodes x 2 targets, chains of 3, meta) for the module.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import io
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import chainfs
from chainfs.client.config import ClientConfig
from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster
from tests.conftest import require
from tests.integration.client_fixtures import CHUNK, in_threads, module_cluster, pattern, poll

pytestmark = pytest.mark.timeout(180)

LARGE = 100 * 1024 * 1024  # the large file of the round trip
SIZES = {
    "empty": 0,
    "one": 1,
    "chunk-1": CHUNK - 1,
    "chunk": CHUNK,
    "chunk+1": CHUNK + 1,
    "large": LARGE,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "client-e2e")


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> FileSystem:
    return cluster.client()


@pytest.fixture(scope="module")
def files(fs: FileSystem) -> dict[str, bytes]:
    """Files of the edge sizes, written through the sync client with assorted write sizes."""
    fs.mkdir("/e2e", exist_ok=True)
    out: dict[str, bytes] = {}
    for name, size in SIZES.items():
        data = pattern(size, name)
        path = f"/e2e/{name}.bin"
        with fs.open(path, "wb") as f:
            if size < CHUNK:
                f.write(data)
            else:
                # Uneven pieces so writes straddle chunk boundaries.
                step = 3 * 1024 * 1024 + 7
                for i in range(0, size, step):
                    f.write(data[i : i + step])
        out[path] = data
    return out


def test_sizes_after_write(fs: FileSystem, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        st = fs.stat(path)
        assert st.st_size == len(data), path
        assert stat.S_ISREG(st.st_mode)


def test_sync_read_whole_and_in_pieces(fs: FileSystem, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        with fs.open(path, "rb") as f:
            assert f.read() == data, path
        with fs.open(path, "rb") as f:
            got = bytearray()
            while piece := f.read(1_000_003):
                got += piece
            assert got == data, path
        # readinto a preallocated buffer (the zero-copy path).
        buf = bytearray(len(data) + 10)
        with fs.open(path, "rb") as f:
            n = f.readinto(buf)
        assert n == len(data) and buf[:n] == data, path


def test_sync_random_ranges(fs: FileSystem, files: dict[str, bytes]) -> None:
    path = "/e2e/large.bin"
    data = files[path]
    import random

    rng = random.Random(7)
    with fs.open(path, "rb") as f:
        for _ in range(50):
            off = rng.randrange(0, len(data))
            n = rng.choice([1, 100, CHUNK - 3, CHUNK + 5, 3 * CHUNK])
            f.seek(off)
            assert f.read(n) == data[off : off + n]
        # Relative and end-relative seeks.
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(5)
        f.seek(5, os.SEEK_CUR)
        assert f.tell() == 10
        assert f.read(3) == data[10:13]


def test_read_ranges_in_order_and_into_buffers(fs: FileSystem, files: dict[str, bytes]) -> None:
    large = files["/e2e/large.bin"]
    ranges = [
        ("/e2e/large.bin", CHUNK - 10, 20),  # straddles a chunk boundary
        ("/e2e/one.bin", 0, 1),
        ("/e2e/large.bin", 0, 256 * 1024),
        ("/e2e/chunk+1.bin", CHUNK, 1),
        ("/e2e/empty.bin", 0, 10),  # past the end: empty
        ("/e2e/large.bin", LARGE - 5, 100),  # short at the end
        ("/e2e/chunk.bin", 0, None),  # to the end of the file
    ]
    want = [
        large[CHUNK - 10 : CHUNK + 10],
        files["/e2e/one.bin"],
        large[: 256 * 1024],
        files["/e2e/chunk+1.bin"][CHUNK:],
        b"",
        large[-5:],
        files["/e2e/chunk.bin"],
    ]
    got = fs.read_ranges(ranges)
    assert [bytes(g) for g in got] == want
    bufs = [bytearray(r[2] if r[2] is not None else CHUNK) for r in ranges]
    got2 = fs.read_ranges(ranges, bufs)
    assert [bytes(g) for g in got2] == want
    assert bytes(bufs[0]) == want[0]  # landed in the caller's buffer


def test_many_samples_read_ranges(fs: FileSystem, files: dict[str, bytes]) -> None:
    large = files["/e2e/large.bin"]
    sample = 256 * 1024
    ranges = [("/e2e/large.bin", off, sample) for off in range(0, LARGE - sample, 997 * 1024)]
    got = fs.read_ranges(ranges)
    for (_, off, n), g in zip(ranges, got, strict=True):
        assert g == large[off : off + n]


def test_async_client_round_trip(cluster: LocalCluster, files: dict[str, bytes]) -> None:
    async def main() -> None:
        afs = await chainfs.aio.connect(cluster.address)
        async with afs:
            for path, data in files.items():
                f = await afs.open(path, "rb")
                async with f:
                    assert await f.read() == data, path
            # write through the async client, read back through it
            data = pattern(CHUNK * 2 + 3, "async")
            f = await afs.open("/e2e/async.bin", "wb")
            async with f:
                await f.write(data[:5])
                await f.write(data[5:])
            assert (await afs.stat("/e2e/async.bin")).st_size == len(data)
            assert await afs.read_file("/e2e/async.bin") == data
            got = await afs.read_ranges([("/e2e/async.bin", CHUNK - 1, 3)])
            assert bytes(got[0]) == data[CHUNK - 1 : CHUNK + 2]
            assert "async.bin" in await afs.listdir("/e2e")

    asyncio.run(main())


def test_fsspec_round_trip(cluster: LocalCluster, files: dict[str, bytes]) -> None:
    import fsspec

    cfs = fsspec.filesystem("chainfs", address=cluster.address)
    for path, data in files.items():
        assert cfs.cat_file(path) == data, path
        with cfs.open(path, "rb") as f:
            assert f.read() == data
        assert cfs.info(path)["size"] == len(data)
    large = files["/e2e/large.bin"]
    assert (
        cfs.cat_file("/e2e/large.bin", start=CHUNK - 2, end=CHUNK + 2)
        == large[CHUNK - 2 : CHUNK + 2]
    )
    assert cfs.cat_file("/e2e/large.bin", start=-7) == large[-7:]
    # fsspec's URL form carries the address.
    with fsspec.open(f"chainfs://{cluster.address}/e2e/chunk+1.bin", "rb") as f:
        assert f.read() == files["/e2e/chunk+1.bin"]


def test_pyarrow_round_trip(cluster: LocalCluster, files: dict[str, bytes]) -> None:
    import pyarrow.fs as pafs

    from chainfs.client.fsspec_adapter import ChainFileSystem

    afs = pafs.PyFileSystem(pafs.FSSpecHandler(ChainFileSystem(address=cluster.address)))
    for path, data in files.items():
        with afs.open_input_file(path) as f:
            assert f.size() == len(data)
            assert f.read() == data, path
        with afs.open_input_stream(path) as s:
            assert s.read() == data
    with afs.open_output_stream("/e2e/arrow.bin") as out:
        out.write(files["/e2e/chunk+1.bin"])
    with afs.open_input_file("/e2e/arrow.bin") as f:
        assert f.read_at(10, CHUNK - 5) == files["/e2e/chunk+1.bin"][CHUNK - 5 : CHUNK + 5]


def test_torch_dataset_round_trip(cluster: LocalCluster, files: dict[str, bytes]) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        require("torch", False, "pip install torch (CPU build)")
    from chainfs.client.torch import ChainfsDataset

    paths = list(files)
    ds = ChainfsDataset(cluster.address, paths)
    assert len(ds) == len(paths)
    for i, p in enumerate(paths):
        assert ds[i] == files[p]
    assert ds.__getitems__(list(range(len(paths)))) == [files[p] for p in paths]


def test_text_mode(fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    text = "héllo\nwörld\n" * 1000
    with fs.open("/e2e/text.txt", "w", encoding="utf-8") as f:
        f.write(text)
    with fs.open("/e2e/text.txt", encoding="utf-8") as f:
        assert f.readline() == "héllo\n"
        assert f.read() == text[len("héllo\n") :]
    with fs.open("/e2e/text.txt", "rb") as f:
        assert list(f)[:2] == [b"h\xc3\xa9llo\n", b"w\xc3\xb6rld\n"]


def test_write_modes(fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    p = "/e2e/modes.bin"
    with fs.open(p, "wb") as f:
        f.write(b"0123456789")
    with fs.open(p, "ab") as f:
        f.write(b"ab")
        f.seek(0)
        f.write(b"cd")  # append mode: always at the end
    assert fs.read_file(p) == b"0123456789abcd"
    with fs.open(p, "r+b") as f:
        f.seek(3)
        f.write(b"XY")
        f.seek(0)
        assert f.read() == b"012XY56789abcd"
    with fs.open(p, "w+b") as f:
        assert f.read() == b""  # truncated
        f.write(b"new")
        f.seek(0)
        assert f.read() == b"new"
        f.truncate(1)
    assert fs.read_file(p) == b"n"
    with pytest.raises(FileExistsError):
        fs.open(p, "xb")
    with fs.open("/e2e/fresh-x.bin", "xb") as f:
        f.write(b"x")
    assert fs.read_file("/e2e/fresh-x.bin") == b"x"


def test_holes_read_as_zeros(fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    p = "/e2e/sparse.bin"
    with fs.open(p, "wb") as f:
        f.write(b"head")
        f.seek(3 * CHUNK + 100)
        f.write(b"tail")
    data = fs.read_file(p)
    assert len(data) == 3 * CHUNK + 104
    assert data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:-4] == bytes(len(data) - 8)
    fs.truncate(p, 2 * CHUNK)  # extend-by-truncate and shrink both read as zeros past data
    assert fs.read_file(p) == b"head" + bytes(2 * CHUNK - 4)


def test_overwrite_inside_chunks_keeps_the_rest(fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    p = "/e2e/patch.bin"
    base = pattern(2 * CHUNK + 10, "patch")
    with fs.open(p, "wb") as f:
        f.write(base)
    patch = b"P" * 1000
    with fs.open(p, "r+b") as f:
        f.seek(CHUNK - 500)
        f.write(patch)
    want = base[: CHUNK - 500] + patch + base[CHUNK + 500 :]
    assert fs.read_file(p) == want


def test_file_sees_its_own_pending_writes(fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    with fs.open("/e2e/own.bin", "w+b") as f:
        f.write(b"abc")
        f.seek(0)
        assert f.read() == b"abc"
        f.seek(CHUNK - 1)
        f.write(b"xyz")
        f.seek(CHUNK - 2)
        assert f.read(4) == b"\x00xyz"


def test_namespace_ops(fs: FileSystem) -> None:
    fs.mkdir("/ns/a/b", parents=True)
    fs.mkdir("/ns/a/b", parents=True, exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.mkdir("/ns/a/b", parents=True)
    with pytest.raises(FileNotFoundError):
        fs.mkdir("/ns/missing/x")
    fs.write_file("/ns/a/f", b"data")
    assert fs.listdir("/ns/a") == ["b", "f"]
    entries = {e.name: e for e in fs.scandir("/ns/a")}
    assert entries["b"].is_dir() and entries["f"].is_file()
    assert entries["f"].stat.st_size == 4
    fs.symlink("/ns/a/f", "/ns/link")
    assert fs.readlink("/ns/link") == "/ns/a/f"
    assert stat.S_ISLNK(fs.lstat("/ns/link").st_mode)
    assert fs.stat("/ns/link").st_size == 4
    fs.link("/ns/a/f", "/ns/hard")
    assert fs.stat("/ns/a/f").st_nlink == 2
    fs.rename("/ns/hard", "/ns/moved")
    assert fs.read_file("/ns/moved") == b"data"
    fs.chmod("/ns/moved", 0o640)
    assert stat.S_IMODE(fs.stat("/ns/moved").st_mode) == 0o640
    fs.chown("/ns/moved", 1234, -1)
    st = fs.stat("/ns/moved")
    assert (st.st_uid, st.st_gid) == (1234, 0 if os.getgid() == 0 else st.st_gid)
    fs.utime("/ns/moved", (1_000_000, 2_000_000))
    st = fs.stat("/ns/moved")
    assert (st.st_atime, st.st_mtime) == (1_000_000, 2_000_000)
    fs.utime("/ns/moved", ns=(5, 6))
    assert fs.stat("/ns/moved").st_mtime_ns == 6
    fs.truncate("/ns/moved", 2)
    assert fs.read_file("/ns/a/f") == b"da"  # same inode
    fs.remove("/ns/moved")
    fs.remove("/ns/link")
    assert fs.exists("/ns/a/f") and not fs.exists("/ns/moved")
    with pytest.raises(OSError) as e:
        fs.rmdir("/ns/a")
    assert e.value.errno == errno.ENOTEMPTY
    fs.remove("/ns/a/f")
    fs.rmdir("/ns/a/b")
    fs.rmdir("/ns/a")
    vfs = fs.statfs()
    assert vfs.f_bsize > 0 and vfs.f_blocks >= vfs.f_bfree


def test_concurrent_threads_share_one_filesystem(fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)

    def worker(k: int) -> None:
        data = pattern(CHUNK + k * 1000, f"t{k}")
        fs.write_file(f"/e2e/thread{k}.bin", data)
        assert fs.read_file(f"/e2e/thread{k}.bin") == data

    errors = in_threads(worker, 6)
    assert not errors, errors


def test_concurrent_stats_answer_as_each_alone(cluster: LocalCluster, fs: FileSystem) -> None:
    """Stats issued at once share BatchStat calls (the stat coalescer); each
    caller gets what its own Stat gives: the same inode, or the same errno."""
    fs.mkdir("/e2e/stats", parents=True, exist_ok=True)
    for i in range(40):
        fs.write_file(f"/e2e/stats/f{i}", b"x" * i)
    fs.symlink("f3", "/e2e/stats/link")
    paths = [f"/e2e/stats/f{i}" for i in range(40)]
    paths += ["/e2e/stats/missing", "/e2e/stats/f1/under-a-file", "/e2e/stats/link"]

    async def main() -> None:
        alone = await chainfs.aio.connect(
            cluster.address, config=ClientConfig(meta_stat_coalesce_inflight=0)
        )
        together = await chainfs.aio.connect(cluster.address)
        async with alone, together:

            async def outcome(afs: chainfs.aio.AsyncFileSystem, path: str) -> object:
                try:
                    st = await afs.stat(path)
                except OSError as e:
                    return e.errno
                return (st.st_ino, st.st_size, st.st_mode)

            expected = [await outcome(alone, p) for p in paths]
            for _ in range(3):
                got = await asyncio.gather(*(outcome(together, p) for p in paths))
                assert list(got) == expected
            coalescer = together.io.meta.stat_coalescer
            assert coalescer is not None and coalescer.batches > 0
            assert alone.io.meta.stat_coalescer is None

        assert expected[40:42] == [errno.ENOENT, errno.ENOTDIR]
        assert expected[42] == expected[3]  # stat follows the link

    asyncio.run(main())


def test_concurrent_stats_under_a_meta_with_a_small_batch_bound(tmp_path: object) -> None:
    """Meta's max_batch_stat below the client's batch: BatchStat refuses the
    whole call (E2BIG), which no caller's own Stat would; each still gets its answer."""

    def small_batches(_i: int, c: object) -> None:
        c.max_batch_stat = 2  # type: ignore[attr-defined]

    with LocalCluster(
        tmp_path,  # type: ignore[arg-type]
        storage_nodes=1,
        targets_per_node=1,
        replicas=1,
        configure_meta=small_batches,
    ) as cluster:
        paths = [f"/s/f{i}" for i in range(24)] + ["/s/missing"]

        async def main() -> None:
            afs = await chainfs.aio.connect(cluster.address)
            async with afs:
                await afs.mkdir("/s")
                for p in paths[:-1]:
                    await afs.write_file(p, b"x")

                async def outcome(path: str) -> object:
                    try:
                        return (await afs.stat(path)).st_size
                    except OSError as e:
                        return e.errno

                got = await asyncio.gather(*(outcome(p) for p in paths))
                assert list(got) == [1] * 24 + [errno.ENOENT]
                coalescer = afs.io.meta.stat_coalescer
                assert coalescer is not None and coalescer.batches > 0

        asyncio.run(main())


# -- bad input -------------------------------------------------------------------


def test_bad_input_errors(fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    fs.write_file("/e2e/ro.bin", b"abc")
    with fs.open("/e2e/ro.bin", "rb") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(OSError) as e:
            f.seek(-1)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()
    with fs.open("/e2e/ro.bin", "ab") as w, pytest.raises(io.UnsupportedOperation):
        w.read()
    with pytest.raises(ValueError, match="closed"):
        f.read()
    with pytest.raises(ValueError, match="closed"):
        f.seek(0)
    with pytest.raises(IsADirectoryError):
        fs.open("/e2e", "rb")
    with pytest.raises(IsADirectoryError):
        fs.open("/e2e", "wb")
    with pytest.raises(IsADirectoryError):
        fs.read_ranges([("/e2e", 0, 1)])
    with pytest.raises(FileNotFoundError):
        fs.open("/e2e/nope", "rb")
    with pytest.raises(FileNotFoundError):
        fs.read_ranges([("/e2e/nope", 0, 1)])
    with pytest.raises(NotADirectoryError):
        fs.open("/e2e/ro.bin/x", "rb")
    with pytest.raises(NotADirectoryError):
        fs.listdir("/e2e/ro.bin")
    with pytest.raises(FileExistsError):
        fs.mkdir("/e2e")
    with pytest.raises(IsADirectoryError):
        fs.remove("/e2e")
    with pytest.raises(ValueError):
        fs.open("/e2e/ro.bin", "rw")
    with pytest.raises(OSError) as e:
        fs.read_ranges([("/e2e/ro.bin", -1, 1)])
    assert e.value.errno == errno.EINVAL
    assert fs.read_file("/e2e/ro.bin") == b"abc"  # nothing above changed it


def test_empty_and_relative_paths_are_refused(fs: FileSystem) -> None:
    """ "" is ENOENT (as os.stat("")); a relative path is EINVAL: there is no working
    directory to resolve it against, and it must not silently mean the root."""
    fs.mkdir("/e2e", exist_ok=True)
    fs.write_file("/e2e/rel.bin", b"abc")
    with pytest.raises(FileNotFoundError) as nf:
        fs.stat("")
    assert nf.value.errno == errno.ENOENT
    for call in (
        lambda: fs.stat("e2e/rel.bin"),
        lambda: fs.listdir("e2e"),
        lambda: fs.open("e2e/new.bin", "wb"),
        lambda: fs.read_ranges([("e2e/rel.bin", 0, 1)]),
        lambda: fs.remove("e2e/rel.bin"),
        lambda: fs.rename("/e2e/rel.bin", "e2e/moved.bin"),
    ):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL and "absolute" in str(e.value)
    with pytest.raises(FileNotFoundError):
        fs.listdir("")
    assert fs.read_file("/e2e/rel.bin") == b"abc"  # nothing above changed anything
    assert "new.bin" not in fs.listdir("/e2e") and "moved.bin" not in fs.listdir("/e2e")


# -- a trailing slash, as Linux answers it ---------------------------------------
# (op, path, other): each case runs in its own directory holding a file f, an
# empty directory d, symlinks lf -> f and ld -> d, and nothing named nope.
TRAILING_SLASH: list[tuple[str, str, str]] = [
    ("stat", "f/", ""),
    ("stat", "d/", ""),
    ("stat", "lf/", ""),
    ("stat", "ld/", ""),
    ("stat", "nope/", ""),
    ("lstat", "f/", ""),
    ("lstat", "ld/", ""),
    ("exists", "f/", ""),
    ("exists", "d/", ""),
    ("isfile", "f/", ""),
    ("isdir", "ld/", ""),
    ("listdir", "f/", ""),
    ("listdir", "ld/", ""),
    ("read_file", "f/", ""),
    ("read_file", "lf/", ""),
    ("open", "f/", "rb"),
    ("open", "f/", "wb"),
    ("open", "f/", "ab"),
    ("open", "f/", "r+b"),
    ("open", "f/", "xb"),
    ("open", "lf/", "wb"),
    ("open", "d/", "wb"),
    ("open", "new/", "wb"),
    ("open", "new/", "xb"),
    ("open", "new/", "w+b"),
    ("open", "new/", "rb"),
    ("open", "nope/new/", "wb"),
    ("remove", "f/", ""),
    ("remove", "d/", ""),
    ("remove", "lf/", ""),
    ("remove", "ld/", ""),
    ("remove", "nope/", ""),
    ("rmdir", "f/", ""),
    ("rmdir", "d/", ""),
    ("rmdir", "ld/", ""),
    ("mkdir", "m/", ""),
    ("mkdir", "f/", ""),
    ("rename", "f/", "g"),
    ("rename", "f", "g/"),
    ("rename", "f", "d/"),
    ("rename", "d/", "e/"),
    ("rename", "d", "e/"),
    ("rename", "ld/", "e"),
    ("link", "f/", "h"),
    ("link", "f", "h/"),
    ("symlink", "s/", "f"),
    ("symlink", "f/", "d"),
    ("readlink", "lf/", ""),
    ("readlink", "ld/", ""),
    ("truncate", "f/", ""),
    ("truncate", "lf/", ""),
    ("chmod", "f/", ""),
    ("chmod", "ld/", ""),
    ("utime", "f/", ""),
    ("mknod", "p/", ""),
    ("listxattr", "f/", ""),
]


def _slash_case(op: str, root: str, a: str, b: str, fs: FileSystem | None) -> object:
    """One case on the local disk (``fs`` None, ``os``) or on chainfs."""
    p, q = f"{root}/{a}", f"{root}/{b}"
    if op == "open":
        f = open(p, b) if fs is None else fs.open(p, b)  # noqa: SIM115 (closed at once)
        f.close()
        return None
    if op == "read_file":
        if fs is None:
            with open(p, "rb") as f:
                return f.read()
        return fs.read_file(p)
    if op in ("exists", "isfile", "isdir"):
        return getattr(os.path if fs is None else fs, op)(p)
    if op in ("stat", "lstat"):
        return stat.S_IFMT(getattr(os if fs is None else fs, op)(p).st_mode)
    if op in ("rename", "link"):
        return getattr(os if fs is None else fs, op)(p, q)
    if op == "symlink":
        return os.symlink(b, p) if fs is None else fs.symlink(b, p)
    if op == "truncate":
        return os.truncate(p, 1) if fs is None else fs.truncate(p, 1)
    if op == "chmod":
        return os.chmod(p, 0o600) if fs is None else fs.chmod(p, 0o600)
    if op == "mknod":
        return (os if fs is None else fs).mknod(p, stat.S_IFIFO | 0o600)
    if op == "listdir":
        return sorted((os if fs is None else fs).listdir(p))
    return getattr(os if fs is None else fs, op)(p)  # remove rmdir mkdir readlink utime listxattr


def _outcome(call: Callable[[], object]) -> object:
    try:
        return ("ok", call())
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno or 0, e.errno))


def _local_tree(root: Path) -> dict[str, object]:
    tree: dict[str, object] = {}
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            p = Path(dirpath, n)
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            what = os.readlink(p) if p.is_symlink() else st.st_size if stat.S_ISREG(kind) else 0
            tree[str(p.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), what)
    return tree


def _chainfs_tree(fs: FileSystem, root: str, rel: str = "") -> dict[str, object]:
    tree: dict[str, object] = {}
    for e in fs.scandir(f"{root}/{rel}" if rel else root):
        name = f"{rel}/{e.name}" if rel else e.name
        kind = stat.S_IFMT(e.stat.st_mode)
        what = (
            fs.readlink(f"{root}/{name}")
            if stat.S_ISLNK(kind)
            else e.stat.st_size
            if stat.S_ISREG(kind)
            else 0
        )
        tree[name] = (kind, stat.S_IMODE(e.stat.st_mode), what)
        if stat.S_ISDIR(kind):
            tree.update(_chainfs_tree(fs, root, name))
    return tree


@pytest.mark.parametrize(
    ("op", "a", "b"), TRAILING_SLASH, ids=[" ".join(c) for c in TRAILING_SLASH]
)
def test_trailing_slash_answers_as_linux_and_changes_what_linux_changes(
    fs: FileSystem, tmp_path: Path, op: str, a: str, b: str
) -> None:
    """A path ending in / names a directory or nothing: ``open("/f/", "wb")`` of
    a file must not truncate it, ``open("/new/", "wb")`` must not make a file.
    The local disk is the oracle for the answer (errno) and for what changed."""
    case = f"/e2e-slash/{op}-{a}-{b}".replace("/", "_").replace("_e2e-slash_", "/e2e-slash/")
    fs.mkdir(case, parents=True)
    for root, make in ((str(tmp_path), None), (case, fs)):
        with (open if make is None else make.open)(f"{root}/f", "wb") as f:
            f.write(b"data")
        (os if make is None else make).mkdir(f"{root}/d")
        for link, target in (("lf", "f"), ("ld", "d")):
            (os if make is None else make).symlink(target, f"{root}/{link}")
        (os if make is None else make).chmod(f"{root}/f", 0o644)
        (os if make is None else make).chmod(f"{root}/d", 0o755)
    local = _outcome(lambda: _slash_case(op, str(tmp_path), a, b, None))
    remote = _outcome(lambda: _slash_case(op, case, a, b, fs))
    assert remote == local
    assert _chainfs_tree(fs, case) == _local_tree(tmp_path)


@pytest.mark.parametrize("offset", [2**62, 2**64 + 5])
def test_write_past_the_largest_file_is_efbig_and_changes_nothing(
    fs: FileSystem, offset: int
) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    path = f"/e2e/efbig-{offset}.bin"
    fs.write_file(path, b"head")
    with fs.open(path, "r+b") as f:
        f.seek(offset)
        with pytest.raises(OSError) as e:
            f.write(b"abc")
        assert e.value.errno == errno.EFBIG
        with pytest.raises(OSError) as e:
            f.truncate(offset)
        assert e.value.errno == errno.EFBIG
        assert f.tell() == offset
    assert fs.read_file(path) == b"head" and fs.stat(path).st_size == 4


def test_closed_filesystem(cluster: LocalCluster) -> None:
    fs2 = chainfs.connect(cluster.address)
    fs2.mkdir("/e2e", exist_ok=True)
    f = fs2.open("/e2e/closed-fs.bin", "wb")
    f.write(b"pending")
    fs2.close()  # flushes and closes its open files
    fs2.close()  # idempotent
    assert f.closed
    with pytest.raises(ValueError, match="closed"):
        fs2.stat("/")
    with chainfs.connect(cluster.address) as fs3:
        assert fs3.read_file("/e2e/closed-fs.bin") == b"pending"


def _busy_until_closed(
    fs: FileSystem,
    tag: str,
    data: bytes,
    done: list[str],
    errors: list[BaseException],
    k: int,
) -> None:
    """Calls of one kind (by ``k``) until one fails; each call that returned is
    noted in ``done`` (a written file by its path), the failure in ``errors``."""
    try:
        for i in range(10**6):
            if k % 4 == 0:
                fs.stat("/e2e/close-race/big")
                done.append("stat")
            elif k % 4 == 1:
                assert fs.read_file("/e2e/close-race/big") == data
                done.append("read")
            elif k % 4 == 2:
                path = f"/e2e/close-race/w{tag}-{k}-{i}"
                with fs.open(path, "wb") as f:
                    f.write(data[: CHUNK + 1])
                done.append(path)
            else:
                fs.listdir("/e2e/close-race")
                done.append("listdir")
    except (ValueError, OSError) as e:
        errors.append(e)


def _each_kind_done(done: list[str]) -> bool:
    kinds = ("stat", "read", "/e2e/close-race/w", "listdir")
    return all(any(d.startswith(k) for d in done) for k in kinds)


def test_close_while_threads_are_in_calls_ends_each_call(cluster: LocalCluster) -> None:
    """Other threads in stats, reads, writes and listings when the FileSystem
    closes: each call ends (ValueError for the closed FileSystem, or an OSError),
    none waits for ever, and every file whose close returned reads back whole."""
    data = pattern(2 * CHUNK, "close-race")
    with chainfs.connect(cluster.address) as setup:
        setup.mkdir("/e2e/close-race", parents=True, exist_ok=True)
        setup.write_file("/e2e/close-race/big", data)
    written: list[str] = []
    for rnd in range(3):
        fs2 = chainfs.connect(cluster.address)
        done: list[str] = []
        errors: list[BaseException] = []
        work = functools.partial(_busy_until_closed, fs2, f"r{rnd}", data, done, errors)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        # Close once every kind of call has gone through at least once (more
        # are under way by then), later in each round.
        poll(functools.partial(_each_kind_done, done), "a call of each kind")
        time.sleep(0.1 * rnd)
        fs2.close()
        for t in threads:
            t.join(60)
        assert not [t for t in threads if t.is_alive()], f"round {rnd}: calls left waiting"
        assert len(errors) == len(threads), errors  # each ended by the close, none otherwise
        written += [d for d in done if d.startswith("/")]
    with chainfs.connect(cluster.address) as check:
        for path in written:
            assert check.read_file(path) == data[: CHUNK + 1], path


def test_connect_without_address_uses_chainfs_address(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAINFS_ADDRESS", cluster.address)
    with chainfs.connect() as fs2:
        assert fs2.address == cluster.address and fs2.isdir("/")

    async def aio() -> str:
        afs = await chainfs.aio.connect()
        try:
            assert await afs.isdir("/")
            return afs.address
        finally:
            await afs.close()

    assert asyncio.run(aio()) == cluster.address
    monkeypatch.delenv("CHAINFS_ADDRESS")
    with pytest.raises(ValueError, match="CHAINFS_ADDRESS"):
        chainfs.connect()
    with pytest.raises(ValueError, match="CHAINFS_ADDRESS"):
        asyncio.run(aio())
    # A token the cluster does not know is refused at connect, not at first use.
    with pytest.raises(PermissionError, match="unknown or revoked token"):
        chainfs.connect(cluster.address, token="cfs_" + "x" * 43)


def test_unreachable_address_fails_fast_naming_it() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConnectionError) as e:
        chainfs.connect(addr, config=ClientConfig(connect_timeout_ms=500))
    assert addr in str(e.value)

    async def aio() -> None:
        await chainfs.aio.connect(addr, config=ClientConfig(connect_timeout_ms=500))

    with pytest.raises(ConnectionError, match=addr):
        asyncio.run(aio())


def test_flush_makes_writes_visible_to_other_clients(cluster: LocalCluster, fs: FileSystem) -> None:
    fs.mkdir("/e2e", exist_ok=True)
    with chainfs.connect(cluster.address) as other, fs.open("/e2e/flushed.bin", "wb") as f:
        f.write(b"first part;")
        f.flush()
        assert other.read_file("/e2e/flushed.bin") == b"first part;"
        f.write(pattern(CHUNK, "flush"))
        f.fsync()
        assert other.stat("/e2e/flushed.bin").st_size == len(b"first part;") + CHUNK


def test_process_exit_without_close_is_clean_and_flushes(cluster: LocalCluster) -> None:
    # A script that never closes its connection or its file: like a builtin
    # file, pending writes are flushed at exit, and the exit is clean (the
    # loop thread with gRPC inside used to crash interpreter finalization).
    import subprocess
    import sys

    fs = chainfs.connect(cluster.address)
    fs.mkdir("/e2e/exit", parents=True, exist_ok=True)
    script = (
        "import sys, chainfs\n"
        "fs = chainfs.connect(sys.argv[1])\n"
        "fs.read_file('/e2e/exit/seed')\n"
        "f = fs.open(f'/e2e/exit/out-{sys.argv[2]}', 'wb')\n"
        "f.write(b'left open %s' % sys.argv[2].encode())\n"
    )
    fs.write_file("/e2e/exit/seed", b"seed")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, cluster.address, str(i)], stderr=subprocess.PIPE
        )
        for i in range(6)
    ]
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode(errors="replace")
        assert fs.read_file(f"/e2e/exit/out-{i}") == b"left open %d" % i
    fs.close()


def test_read_ranges_over_long_paths_beyond_one_request(fs: FileSystem) -> None:
    """300 files whose paths are near PATH_MAX: their names alone (1.2 MB) are
    more than meta takes in one request header (1 MiB), so the stats that
    read_ranges makes go as several calls and every range still reads back."""
    deep = "/" + "/".join(f"{i:02d}" + "d" * 248 for i in range(15))  # 3,765 bytes
    fs.makedirs(deep)
    paths = [f"{deep}/{i:03d}" + "f" * 197 for i in range(300)]
    assert min(len(p) for p in paths) > 3_960
    for i, p in enumerate(paths):
        fs.write_file(p, pattern(100 + i, p))
    got = fs.read_ranges([(p, 1, 50) for p in paths])
    assert [bytes(g) for g in got] == [pattern(100 + i, p)[1:51] for i, p in enumerate(paths)]
