"""Model-based test: random namespace operations on chainfs and on a local
directory (the oracle) must give the same results, the same errnos and the
same trees.

Each hypothesis example works in a fresh directory (``/mN`` in chainfs,
``tmp/mN`` locally). Paths are made of a few names (and ``.``), so operations
collide often: renames over existing files and directories, into their own
subtree, links, symlinks (relative targets without ``..``, so both trees stay
comparable), loops. This runs as root, so permission checks are left to
test_permissions.py.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.meta_client import RENAME_EXCHANGE, RENAME_NOREPLACE, mode_bits
from tests.unit.meta.conftest import MetaEnv, start_env, stop_env
from tests.unit.meta.loop_thread import LoopThread

NAMES = ["a", "b", "c"]
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100

Outcome = tuple[str, Any]
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


UMASK = umask()

components = st.sampled_from([*NAMES, *NAMES, "."])
random_paths = st.lists(components, min_size=1, max_size=3)
existing = Bundle("existing")  # paths that were created at some point (may be gone since)
rel_paths = st.one_of(
    existing.map(list),
    existing.flatmap(lambda p: st.sampled_from(NAMES).map(lambda n: [*p, n])),
    random_paths,
)
link_targets = st.lists(st.sampled_from([*NAMES, "."]), min_size=1, max_size=3).map("/".join)
modes = st.sampled_from([0o755, 0o700, 0o644, 0o600, 0o1777, 0o2755, 0o000])
sizes = st.integers(min_value=0, max_value=3 * 1024 * 1024)
xattr_names = st.sampled_from(["user.a", "user.b"])


class Harness:
    """Runs one operation on both sides and compares what came out."""

    def __init__(self, lt: LoopThread, env: MetaEnv, base: Path) -> None:
        self.lt = lt
        self.env = env
        self.base = base
        self.counter = itertools.count()


class NamespaceMachine(RuleBasedStateMachine):
    h: Harness

    def __init__(self) -> None:
        super().__init__()
        n = next(self.h.counter)
        self.croot = f"/m{n}"
        self.oroot = self.h.base / f"m{n}"
        self.oroot.mkdir()
        self.last = ""
        self.h.lt.run(self.h.env.direct.mkdir(self.croot, 0o777 & ~UMASK))
        os.chmod(self.oroot, 0o777 & ~UMASK)

    # -- running both sides -------------------------------------------------
    def c(self, rel: list[str]) -> str:
        return self.croot + "/" + "/".join(rel)

    def o(self, rel: list[str]) -> str:
        return str(self.oroot) + "/" + "/".join(rel)

    def both(
        self,
        what: str,
        chainfs: Callable[[], Any],
        oracle: Callable[[], Any],
        summarize: Callable[[Any], Any] = lambda _: None,
        osummarize: Callable[[Any], Any] | None = None,
    ) -> None:
        try:
            got: Outcome = ("ok", summarize(self.h.lt.run(chainfs())))
        except ChainfsError as e:
            got = ("err", errno.errorcode.get(e.errno, e.errno))
        try:
            want: Outcome = ("ok", (osummarize or summarize)(oracle()))
        except OSError as e:
            assert e.errno is not None
            want = ("err", errno.errorcode.get(e.errno, e.errno))
        assert got == want, f"{what}: chainfs {got} != local {want}"
        self.last = "ok" if want[0] == "ok" else want[1]
        OUTCOMES[(what.split()[0], str(want[1]) if want[0] == "err" else "ok")] += 1

    @property
    def m(self) -> Any:
        return self.h.env.direct

    # -- rules --------------------------------------------------------------
    @initialize(target=existing)
    def seed(self) -> Any:
        for p, is_dir in ((["a"], True), (["b"], False), (["a", "c"], True)):
            if is_dir:
                self.mkdir(p, 0o755)
            else:
                self.create(p, False, False)
        return multiple(("a",), ("b",), ("a", "c"))

    def made(self, p: list[str]) -> Any:
        """The rule's result for the `existing` bundle."""
        return tuple(p) if self.last == "ok" else multiple()

    @rule(target=existing, p=rel_paths, mode=modes)
    def mkdir(self, p: list[str], mode: int) -> Any:
        self.both(
            f"mkdir {p} {mode:o}",
            lambda: self.m.mkdir(self.c(p), mode & ~UMASK),
            lambda: os.mkdir(self.o(p), mode),
        )
        return self.made(p)

    @rule(target=existing, p=rel_paths, exclusive=st.booleans(), truncate=st.booleans())
    def create(self, p: list[str], exclusive: bool, truncate: bool) -> Any:
        async def chainfs() -> None:
            r = await self.m.create(self.c(p), 0o644 & ~UMASK, exclusive, truncate)
            await self.m.close(r.inode.ino, r.session_id, 0, wrote=False)

        def oracle() -> None:
            flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else 0)
            flags |= os.O_TRUNC if truncate else 0
            os.close(os.open(self.o(p), flags, 0o644))

        self.both(f"create {p} excl={exclusive} trunc={truncate}", chainfs, oracle)
        return self.made(p)

    @rule(p=rel_paths, n=st.integers(min_value=1, max_value=5 * 1024 * 1024))
    def append(self, p: list[str], n: int) -> None:
        """Append n bytes: the client writes chunks, then closes with a length hint."""
        env = self.h.env

        async def chainfs() -> None:
            r = await self.m.open(self.c(p), read=False, write=True)
            end = r.inode.size + n
            lay = r.inode.layout
            env.storage.write(list(lay.chains), lay.chunk_size, r.inode.ino, end)
            await self.m.close(r.inode.ino, r.session_id, end, wrote=True)

        def oracle() -> None:
            fd = os.open(self.o(p), os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"x" * n)
            finally:
                os.close(fd)

        self.both(f"append {p} {n}", chainfs, oracle)

    @rule(p=rel_paths)
    def unlink(self, p: list[str]) -> None:
        self.both(f"unlink {p}", lambda: self.m.unlink(self.c(p)), lambda: os.unlink(self.o(p)))

    @rule(p=rel_paths)
    def rmdir(self, p: list[str]) -> None:
        self.both(f"rmdir {p}", lambda: self.m.rmdir(self.c(p)), lambda: os.rmdir(self.o(p)))

    @rule(
        target=existing,
        src=rel_paths,
        dst=rel_paths,
        flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]),
    )
    def rename(self, src: list[str], dst: list[str], flags: int) -> Any:
        self.both(
            f"rename {src} {dst} flags={flags}",
            lambda: self.m.rename(self.c(src), self.c(dst), flags),
            lambda: renameat2(self.o(src), self.o(dst), flags),
        )
        return self.made(dst)

    @rule(target=existing, src=rel_paths, dst=rel_paths)
    def link(self, src: list[str], dst: list[str]) -> Any:
        self.both(
            f"link {src} {dst}",
            lambda: self.m.link(self.c(src), self.c(dst)),
            lambda: os.link(self.o(src), self.o(dst), follow_symlinks=False),
        )
        return self.made(dst)

    @rule(target=existing, link_to=link_targets, p=rel_paths)
    def symlink(self, link_to: str, p: list[str]) -> Any:
        self.both(
            f"symlink {link_to!r} {p}",
            lambda: self.m.symlink(link_to, self.c(p)),
            lambda: os.symlink(link_to, self.o(p)),
        )
        return self.made(p)

    @rule(p=rel_paths)
    def readlink(self, p: list[str]) -> None:
        self.both(
            f"readlink {p}",
            lambda: self.m.readlink(self.c(p)),
            lambda: os.readlink(self.o(p)),
            summarize=lambda t: t,
        )

    @rule(p=rel_paths, mode=modes)
    def chmod(self, p: list[str], mode: int) -> None:
        self.both(
            f"chmod {p} {mode:o}",
            lambda: self.m.chmod(self.c(p), mode),
            lambda: os.chmod(self.o(p), mode),
        )

    @rule(p=rel_paths, size=sizes)
    def truncate(self, p: list[str], size: int) -> None:
        self.both(
            f"truncate {p} {size}",
            lambda: self.m.truncate(self.c(p), size),
            lambda: os.truncate(self.o(p), size),
        )

    @rule(p=rel_paths, follow=st.booleans())
    def stat(self, p: list[str], follow: bool) -> None:
        self.both(
            f"stat {p} follow={follow}",
            lambda: self.m.stat(self.c(p), follow),
            lambda: os.stat(self.o(p), follow_symlinks=follow),
            summarize=lambda i: _summary(mode_bits(i), i.nlink, i.size),
            osummarize=lambda s: _summary(s.st_mode, s.st_nlink, s.st_size),
        )

    @rule(p=rel_paths)
    def listdir(self, p: list[str]) -> None:
        self.both(
            f"listdir {p}",
            lambda: self.m.listdir(self.c(p)),
            lambda: os.listdir(self.o(p)),
            summarize=sorted,
        )

    @rule(
        p=rel_paths,
        name=xattr_names,
        value=st.binary(max_size=8),
        flags=st.sampled_from([0, 0, 1, 2]),
    )
    def setxattr(self, p: list[str], name: str, value: bytes, flags: int) -> None:
        self.both(
            f"setxattr {p} {name} flags={flags}",
            lambda: self.m.setxattr(self.c(p), name, value, flags),
            lambda: os.setxattr(self.o(p), name, value, flags),
        )

    @rule(p=rel_paths, name=xattr_names)
    def getxattr(self, p: list[str], name: str) -> None:
        self.both(
            f"getxattr {p} {name}",
            lambda: self.m.getxattr(self.c(p), name),
            lambda: os.getxattr(self.o(p), name),
            summarize=bytes,
        )

    @rule(p=rel_paths, name=xattr_names)
    def removexattr(self, p: list[str], name: str) -> None:
        self.both(
            f"removexattr {p} {name}",
            lambda: self.m.removexattr(self.c(p), name),
            lambda: os.removexattr(self.o(p), name),
        )

    @rule(p=rel_paths)
    def listxattr(self, p: list[str]) -> None:
        self.both(
            f"listxattr {p}",
            lambda: self.m.listxattr(self.c(p)),
            lambda: os.listxattr(self.o(p)),
            summarize=lambda names: sorted(n for n in names if n.startswith("user.")),
        )

    # -- the whole tree -----------------------------------------------------
    @invariant()
    def trees_equal(self) -> None:
        got = self.h.lt.run(chainfs_tree(self.m, self.croot))
        want = local_tree(self.oroot)
        assert got == want


def _summary(mode: int, nlink: int, size: int) -> tuple[int, int, int | None]:
    # A directory's size is file-system specific.
    return (mode, nlink, None if stat.S_ISDIR(mode) else size)


def _canonical_links(entries: dict[str, tuple[Any, ...]], inos: dict[str, int]) -> dict[str, Any]:
    """Replace inode numbers by the first path (in order) sharing that inode."""
    first: dict[int, str] = {}
    out: dict[str, Any] = {}
    for path in sorted(entries):
        ino = inos[path]
        first.setdefault(ino, path)
        out[path] = (*entries[path], first[ino])
    return out


async def chainfs_tree(m: Any, root: str) -> dict[str, Any]:
    entries: dict[str, tuple[Any, ...]] = {}
    inos: dict[str, int] = {}

    async def walk(ino: int, rel: str) -> None:
        async for e in m.iterdir(ino, with_attrs=True):
            i = e.inode
            path = f"{rel}/{e.name.decode()}"
            entries[path] = (*_summary(mode_bits(i), i.nlink, i.size), i.symlink_target.decode())
            inos[path] = i.ino
            if stat.S_ISDIR(mode_bits(i)):
                await walk(i.ino, path)

    top = await m.stat(root, follow=False)
    await walk(top.ino, "")
    return _canonical_links(entries, inos)


def local_tree(root: Path) -> dict[str, Any]:
    entries: dict[str, tuple[Any, ...]] = {}
    inos: dict[str, int] = {}

    def walk(d: Path, rel: str) -> None:
        for name in os.listdir(d):
            p = d / name
            s = os.lstat(p)
            path = f"{rel}/{name}"
            target = os.readlink(p) if stat.S_ISLNK(s.st_mode) else ""
            entries[path] = (*_summary(s.st_mode, s.st_nlink, s.st_size), target)
            inos[path] = s.st_ino
            if stat.S_ISDIR(s.st_mode):
                walk(p, path)

    walk(root, "")
    return _canonical_links(entries, inos)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    lt = LoopThread()
    env = lt.run(start_env())
    try:
        yield Harness(lt, env, tmp_path)
    finally:
        lt.run(stop_env(env))
        lt.close()


@pytest.mark.timeout(240)
def test_namespace_matches_local_directory(harness: Harness) -> None:
    NamespaceMachine.h = harness
    run_state_machine_as_test(
        NamespaceMachine,
        settings=settings(
            max_examples=int(os.environ.get("CHAINFS_MODEL_EXAMPLES", "150")),
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
