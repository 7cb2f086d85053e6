"""The mount's lists of a directory's names (negative_timeout_ms > 0), with meta
replaced by a fake whose Readdir waits for the test: a change that lands while
a list is fetched is placed exactly, which the mount tests cannot do."""

from __future__ import annotations

import asyncio
import errno
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import pytest

from chainfs.client.chunk_io import ChunkIO
from chainfs.client.config import ClientConfig
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import UserInfo
from chainfs.fuse_mount import ops_base
from chainfs.fuse_mount.config import MountConfig
from chainfs.fuse_mount.ops import ChainfsOperations
from chainfs.proto import meta_pb2 as mt

ROOT = 1


class FakeMeta:
    """Directories of names; Readdir of a directory in ``held`` waits for ``release``."""

    def __init__(self) -> None:
        self.dirs: dict[int, set[bytes]] = {ROOT: set()}
        self.calls: dict[str, int] = {}
        self.held: set[int] = set()
        self.listing = asyncio.Event()  # a held Readdir has started
        self.release = asyncio.Event()
        self._next_ino = 100

    async def call(self, method: str, request: Any) -> Any:
        raise AssertionError(f"unexpected RPC {method}")

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _dir(self, ino: int) -> mt.Inode:
        return mt.Inode(ino=ino, type=mt.DIRECTORY, mode=0o755, nlink=2, parent=ROOT)

    async def lookup(self, parent: int, name: bytes, user: UserInfo | None = None) -> mt.Inode:
        self._count("lookup")
        await asyncio.sleep(0)
        if name not in self.dirs[parent]:
            raise ChainfsError(Code.ENOENT, f"{name!r} not in {parent}")
        return self._dir(self._next_ino)

    async def readdir(
        self,
        at: int,
        after: bytes = b"",
        limit: int = 0,
        with_attrs: bool = False,
        user: UserInfo | None = None,
    ) -> mt.ReaddirRsp:
        self._count("readdir")
        names = sorted(self.dirs[at])  # what meta lists: the state when the call arrives
        if at in self.held:
            self.listing.set()
            await self.release.wait()
        entries = [mt.DirEntry(name=n, ino=1000 + i) for i, n in enumerate(names)]
        return mt.ReaddirRsp(entries=entries, dir_ino=at)

    async def mkdir_reply(
        self, at: tuple[int, bytes], mode: int = 0o777, user: UserInfo | None = None
    ) -> mt.MkdirRsp:
        self._count("mkdir")
        await asyncio.sleep(0)
        parent, name = at
        self.dirs[parent].add(name)
        self._next_ino += 1
        self.dirs[self._next_ino] = set()
        return mt.MkdirRsp(inode=self._dir(self._next_ino), parent=self._dir(parent))


def _ops(meta: FakeMeta) -> ChainfsOperations:
    io = SimpleNamespace(meta=meta, config=ClientConfig())
    cfg = MountConfig(negative_timeout_ms=60_000, max_requests=4)
    return ChainfsOperations(cast(ChunkIO, io), cfg)


CTX = cast(pyfuse3.RequestContext, SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022))


async def _absent(ops: ChainfsOperations, parent: int, name: bytes) -> None:
    """The mount says ``name`` is not in ``parent`` (a negative entry)."""
    try:
        entry = await ops.lookup(parent, name, CTX)
    except pyfuse3.FUSEError as e:
        assert e.errno == errno.ENOENT
        return
    assert entry.st_ino == 0, entry


async def _dir_with_a_held_listing(meta: FakeMeta, ops: ChainfsOperations) -> tuple[int, int]:
    d = (await ops.mkdir(ROOT, b"d", 0o755, CTX)).st_ino
    other = (await ops.mkdir(ROOT, b"other", 0o755, CTX)).st_ino
    ops._names.clear()  # forget the lists the mount made with the directories
    meta.dirs[d].update({b"a", b"b"})
    meta.held.add(d)
    return d, other


async def _first_absent_lookup_fetches_the_list(
    meta: FakeMeta, ops: ChainfsOperations, d: int
) -> asyncio.Task[None]:
    task = asyncio.create_task(_absent(ops, d, b"missing1"))
    await asyncio.wait_for(meta.listing.wait(), 5)
    return task


async def test_a_change_elsewhere_during_the_fetch_keeps_the_list() -> None:
    meta = FakeMeta()
    ops = _ops(meta)
    d, other = await _dir_with_a_held_listing(meta, ops)
    fetch = await _first_absent_lookup_fetches_the_list(meta, ops, d)
    await ops.mkdir(other, b"x", 0o755, CTX)  # lands while d is being listed
    meta.release.set()
    await fetch
    lookups = meta.calls["lookup"]
    for i in range(20):
        await _absent(ops, d, f"missing{i + 2}".encode())
    assert meta.calls["lookup"] == lookups, "answered from d's list, not by meta"
    assert meta.calls["readdir"] == 1


async def test_a_change_of_the_directory_during_the_fetch_drops_the_list() -> None:
    meta = FakeMeta()
    ops = _ops(meta)
    d, _ = await _dir_with_a_held_listing(meta, ops)
    fetch = await _first_absent_lookup_fetches_the_list(meta, ops, d)
    await ops.mkdir(d, b"new", 0o755, CTX)  # after meta listed d: the list misses it
    meta.release.set()
    await fetch
    assert d not in ops._names
    entry = await ops.lookup(d, b"new", CTX)  # meta says it exists
    assert entry.st_ino != 0


async def test_changes_in_more_directories_than_are_tracked_drop_the_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-directory change numbers are bounded; a directory pushed out
    counts as changed, so a fetch overlapping it is not kept."""
    monkeypatch.setattr(ops_base, "_CHANGED_DIRS", 4)
    meta = FakeMeta()
    ops = _ops(meta)
    d, other = await _dir_with_a_held_listing(meta, ops)
    meta.release.set()
    meta.held.clear()
    fetch = asyncio.create_task(_absent(ops, d, b"missing1"))
    await fetch
    assert d in ops._names  # a quiet fetch is kept
    ops._names.clear()
    meta.release.clear()
    meta.listing.clear()
    meta.held.add(d)
    fetch = await _first_absent_lookup_fetches_the_list(meta, ops, d)
    subdirs = [(await ops.mkdir(other, f"s{i}".encode(), 0o755, CTX)).st_ino for i in range(5)]
    for s in subdirs:
        await ops.mkdir(s, b"y", 0o755, CTX)
    meta.release.set()
    await fetch
    assert d not in ops._names
