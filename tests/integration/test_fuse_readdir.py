"""Listing big directories through the FUSE mount, where the kernel mixes
READDIRPLUS (start of a listing, ``ls -l``) and plain READDIR requests over one
directory handle: every name exactly once, the right types and attributes,
seekdir/rewinddir, and changes seen as docs/consistency.md says.

Small meta pages (64 entries) so a listing spans many of them, and each kind
of request is answered both while pages are fetched and from a kept listing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chainfs.client.sync import FileSystem
from chainfs.fuse_mount.config import MountConfig
from chainfs.local import LocalCluster
from tests.integration.fuse_fixtures import mount_counts, mounted_cluster

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

_DEFAULTS = MountConfig()
TIMEOUT_S = max(_DEFAULTS.attr_timeout_ms, _DEFAULTS.entry_timeout_ms) / 1000
_SLACK_S = 0.3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("fuse_readdir"))
    yield from mounted_cluster(base, options=["readdir_page_entries=64"])


@pytest.fixture(scope="module")
def mnt(cluster: LocalCluster) -> Path:
    assert cluster.mountpoint is not None
    return cluster.mountpoint


numbers: dict[str, int] = {}  # name -> i, of the entries of `big`


@pytest.fixture(scope="module")
def big(mnt: Path) -> tuple[Path, dict[str, str]]:
    """3,000 entries (files, directories, symlinks), names of 1 to 255 bytes;
    name -> kind. The i-th is a symlink to target-i or a file of i % 50 bytes."""
    d = mnt / "big"
    d.mkdir()
    kinds: dict[str, str] = {}
    numbers.clear()
    for i in range(3000):
        if i % 3 == 0:
            name = f"{i}"
        elif i % 3 == 1:
            name = f"{i:06d}-" + "n" * (i % 200)
        else:
            name = f"{i:06d}".ljust(253, "x") + "é"  # 255 bytes in UTF-8
        assert len(name.encode()) <= 255
        numbers[name] = i
        if i % 10 == 0:
            (d / name).mkdir()
            kinds[name] = "dir"
        elif i % 10 == 1:
            (d / name).symlink_to("target-" + str(i))
            kinds[name] = "link"
        else:
            (d / name).write_bytes(b"x" * (i % 50))
            kinds[name] = "file"
    assert max(len(n.encode()) for n in kinds) == 255
    return d, kinds


def _kind(e: os.DirEntry[str]) -> str:
    # From d_type only (no stat): the kernel passes the type each entry was listed with.
    if e.is_symlink():
        return "link"
    return "dir" if e.is_dir(follow_symlinks=False) else "file"


def test_a_big_listing_has_every_name_once_with_its_type(
    cluster: LocalCluster, big: tuple[Path, dict[str, str]]
) -> None:
    d, kinds = big
    proc = cluster.mount_process
    assert proc is not None
    before = mount_counts(proc)
    for _ in range(3):  # fetched from meta, then from the kept listing
        names = os.listdir(d)
        assert len(names) == len(kinds) and set(names) == set(kinds)
        entries = list(os.scandir(d))
        assert len(entries) == len(kinds)
        assert {e.name: _kind(e) for e in entries} == kinds
    spent = mount_counts(proc) - before
    assert spent.fuse["readdir_plain"] > 0, spent.fuse  # the kernel asked plain READDIR


def test_ls_l_gives_each_entrys_attributes(big: tuple[Path, dict[str, str]]) -> None:
    d, kinds = big
    for _ in range(2):
        for e in os.scandir(d):
            st = e.stat(follow_symlinks=False)
            kind = kinds[e.name]
            if kind == "dir":
                assert stat.S_ISDIR(st.st_mode)
            elif kind == "link":
                assert stat.S_ISLNK(st.st_mode)
                assert os.readlink(e.path) == f"target-{numbers[e.name]}"
            else:
                assert stat.S_ISREG(st.st_mode)
                assert st.st_size == numbers[e.name] % 50
            assert st.st_ino == e.inode()


def test_a_listing_stopped_halfway_then_listed_again(big: tuple[Path, dict[str, str]]) -> None:
    d, kinds = big
    for stop_after in (1, 700, 2999):
        with os.scandir(d) as it:
            seen = [next(it).name for _ in range(stop_after)]
        assert len(set(seen)) == stop_after and set(seen) <= set(kinds)
        assert sorted(os.listdir(d)) == sorted(kinds)


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir64.restype = ctypes.POINTER(_Dirent)
    libc.readdir64.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.rewinddir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    return libc


def test_seekdir_and_rewinddir(big: tuple[Path, dict[str, str]]) -> None:
    d, kinds = big
    libc = _libc()
    dirp = libc.opendir(str(d).encode())
    assert dirp

    def read(n: int | None) -> list[str]:
        out: list[str] = []
        while n is None or len(out) < n:
            ent = libc.readdir64(dirp)
            if not ent:
                break
            out.append(ent.contents.d_name.decode())
        return out

    try:
        first = read(1500)
        mark = libc.telldir(dirp)
        rest = read(None)
        listed = [n for n in first + rest if n not in (".", "..")]
        assert sorted(listed) == sorted(kinds)
        libc.seekdir(dirp, mark)
        assert read(None) == rest
        libc.rewinddir(dirp)
        assert read(None) == first + rest
    finally:
        libc.closedir(dirp)


def test_this_mounts_changes_show_in_the_next_listing(mnt: Path) -> None:
    d = mnt / "changing"
    d.mkdir()
    names = {f"entry-{i:04d}" for i in range(1000)}
    for n in names:
        (d / n).write_bytes(b"")
    assert set(os.listdir(d)) == names
    assert set(os.listdir(d)) == names  # now kept by the mount
    (d / "new").write_bytes(b"")
    names.add("new")
    assert set(os.listdir(d)) == names
    (d / "entry-0500").unlink()
    names.discard("entry-0500")
    assert set(os.listdir(d)) == names
    (d / "entry-0001").rename(d / "renamed")
    names.discard("entry-0001")
    names.add("renamed")
    assert set(os.listdir(d)) == names
    assert {e.name for e in os.scandir(d)} == names


def _eventually(check: Callable[[], bool], what: str) -> None:
    start = time.monotonic()
    while not check():
        waited = time.monotonic() - start
        assert waited < TIMEOUT_S + _SLACK_S, f"{what}: not seen after {waited:.2f}s"
        time.sleep(0.05)


def test_another_clients_changes_show_within_the_timeout(mnt: Path, cluster: LocalCluster) -> None:
    fs: FileSystem = cluster.client()
    fs.mkdir("/elsewhere")
    names = {f"f{i:04d}" for i in range(800)}
    for n in names:
        fs.write_file(f"/elsewhere/{n}", b"")
    d = mnt / "elsewhere"
    _eventually(lambda: set(os.listdir(d)) == names, "the listing")
    assert set(os.listdir(d)) == names  # kept by the mount
    fs.write_file("/elsewhere/added", b"")
    fs.remove("/elsewhere/f0007")
    names = (names | {"added"}) - {"f0007"}
    _eventually(lambda: set(os.listdir(d)) == names, "another client's changes")
    _eventually(lambda: {e.name for e in os.scandir(d)} == names, "the same by scandir")
