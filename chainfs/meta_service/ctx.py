"""One namespace transaction: cached inode reads, path resolution, small writes.

A :class:`Ctx` wraps one KV transaction attempt. Every read goes into the
transaction's read set, so any concurrent change to what an operation looked
at (an entry on its path, a parent, the target) makes its commit conflict and
re-run: operations are serializable.

Path resolution follows Linux: components are looked up one by one, each
directory needs search (x) permission, symlinks in the middle are always
followed, the last one only when asked, ``.`` and ``..`` are resolved
physically, a trailing slash requires a directory, more than
``max_symlink_follows`` symlinks give ELOOP.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.meta_service import perm, schema
from chainfs.meta_service.config import NAME_MAX, PATH_MAX, MetaConfig
from chainfs.meta_service.perm import Caller
from chainfs.proto import meta_pb2 as pb

FILE = pb.FILE
DIRECTORY = pb.DIRECTORY
SYMLINK = pb.SYMLINK


class Last(Enum):
    """What the last component of a path is (Linux's LAST_NORM/DOT/DOTDOT/ROOT)."""

    NORM = 1  # a name
    DOT = 2  # "."
    DOTDOT = 3  # ".."
    ROOT = 4  # the path is "/"
    SELF = 5  # inode form with an empty name: the inode itself


@dataclass(frozen=True, slots=True)
class ParsedPath:
    start: int  # inode the walk starts at
    comps: tuple[bytes, ...]
    slash: bool  # ends with '/'
    self_ref: bool  # inode form, empty name


def parse(at: pb.PathAt, cfg: MetaConfig) -> ParsedPath:
    """Validate a PathAt before any KV access (bad input changes nothing)."""
    path = at.path
    if b"\x00" in path:
        raise ChainfsError(Code.EINVAL, "NUL byte in path")
    if len(path) >= PATH_MAX:
        raise ChainfsError(Code.ENAMETOOLONG, f"path longer than {PATH_MAX - 1} bytes")
    if at.parent:
        if not path:
            return ParsedPath(at.parent, (), False, True)
        if b"/" in path:
            raise ChainfsError(Code.EINVAL, f"name {path!r} contains '/'")
        if len(path) > NAME_MAX:
            raise ChainfsError(Code.ENAMETOOLONG, f"name longer than {NAME_MAX} bytes")
        return ParsedPath(at.parent, (path,), False, False)
    if not path:
        raise ChainfsError(Code.ENOENT, "empty path")
    if not path.startswith(b"/"):
        raise ChainfsError(Code.EINVAL, f"path {path!r} is not absolute (and no parent inode)")
    comps = tuple(c for c in path.split(b"/") if c)
    for c in comps:
        if len(c) > NAME_MAX:
            raise ChainfsError(Code.ENAMETOOLONG, f"component longer than {NAME_MAX} bytes")
    if len(comps) > cfg.max_path_depth:
        raise ChainfsError(
            Code.ENAMETOOLONG, f"path has {len(comps)} components (limit {cfg.max_path_depth})"
        )
    return ParsedPath(schema.ROOT_INO, comps, bool(comps) and path.endswith(b"/"), False)


def split_target(target: bytes) -> tuple[bool, list[bytes], bool]:
    """A symlink target as (absolute, components, trailing slash)."""
    comps = [c for c in target.split(b"/") if c]
    return target.startswith(b"/"), comps, bool(comps) and target.endswith(b"/")


@dataclass(slots=True)
class Target:
    """Where a path leads: the directory holding the last name, and what it names."""

    parent_ino: int  # 0 for ROOT / SELF
    name: bytes
    kind: Last
    slash: bool
    inode: pb.Inode | None  # None: no such entry (yet)

    @property
    def exists(self) -> bool:
        return self.inode is not None


class PathHints:
    """Entries (directory, name) -> inode that walks found, kept across
    transactions to guess which keys a path will read, so a store with round
    trips fetches them all at once. Only a guess: a walk reads every key it
    uses in its own transaction, and a stale hint costs a wasted fetch."""

    def __init__(self, max_entries: int = 65_536) -> None:
        self.max_entries = max_entries
        self._ino: dict[tuple[int, bytes], int] = {}

    def note(self, parent: int, name: bytes, ino: int | None) -> None:
        if ino is None:
            self._ino.pop((parent, name), None)
            return
        if len(self._ino) >= self.max_entries:
            self._ino.clear()  # bounded; refills from the next walks
        self._ino[(parent, name)] = ino

    def walk(self, p: ParsedPath) -> tuple[list[bytes], int | None]:
        """The keys a walk of ``p`` likely reads (the start inode, then each
        entry and the inode it names, as far as the hints reach) and the inode
        ``p`` likely names (None if the hints do not reach its last component)."""
        cur = p.start
        out = [schema.inode_key(cur)]
        for name in p.comps:
            if name in (b".", b".."):
                return out, None
            out.append(schema.dent_key(cur, name))
            ino = self._ino.get((cur, name))
            if ino is None:
                return out, None
            out.append(schema.inode_key(ino))
            cur = ino
        return out, cur


class Ctx:
    """State of one attempt of one namespace transaction."""

    def __init__(
        self, tx: Transaction, caller: Caller, cfg: MetaConfig, hints: PathHints | None = None
    ) -> None:
        self.tx = tx
        self.caller = caller
        self.cfg = cfg
        self.hints = hints
        self.now_ns = time.time_ns()
        self.now_ms = self.now_ns // 1_000_000
        self._inodes: dict[int, pb.Inode] = {}

    # -- inodes -------------------------------------------------------------
    async def inode(self, ino: int) -> pb.Inode:
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        raw = await self.tx.get(schema.inode_key(ino))
        if raw is None:
            raise ChainfsError(Code.ENOENT, f"no inode {ino}")
        inode = schema.decode_inode(raw)
        self._inodes[ino] = inode
        return inode

    async def read_inodes(self, inos: Iterable[int], directories: Iterable[int] = ()) -> None:
        """Read the inodes ``inos`` and the entry-change times of
        ``directories`` together, in one round trip where reads are round
        trips; ``inode`` and ``dir_times`` then find them. What a missing
        inode means is left to ``inode``."""
        todo = [ino for ino in dict.fromkeys(inos) if ino not in self._inodes]
        keys = [schema.inode_key(ino) for ino in todo]
        keys += [schema.dir_times_key(ino) for ino in dict.fromkeys(directories)]
        values = await self.tx.get_many(keys)
        for ino, raw in zip(todo, values, strict=False):
            if raw is not None:
                self._inodes[ino] = schema.decode_inode(raw)

    def put(self, inode: pb.Inode) -> None:
        assert inode.ino > 0 and inode.type != pb.INODE_TYPE_UNSPECIFIED, inode
        self._inodes[inode.ino] = inode
        self.tx.set(schema.inode_key(inode.ino), schema.encode_inode(inode))

    async def drop(self, ino: int) -> None:
        """Delete an inode record and its xattrs."""
        assert ino != schema.ROOT_INO
        self._inodes.pop(ino, None)
        self.tx.clear(schema.inode_key(ino))
        await schema.count_inodes(self.tx, ino, -1)
        self.tx.clear(schema.dir_times_key(ino))
        self.tx.clear_range(*schema.range_of(schema.xattr_prefix(ino)))

    async def drop_file(self, ino: int) -> None:
        """Delete a file's inode record and its xattrs: a range delete only when
        it has any (each range tombstone slows later reads of the store)."""
        self._inodes.pop(ino, None)
        self.tx.clear(schema.inode_key(ino))
        await schema.count_inodes(self.tx, ino, -1)
        xattrs = schema.range_of(schema.xattr_prefix(ino))
        if await self.tx.get_range(*xattrs, limit=1):
            self.tx.clear_range(*xattrs)

    def touch_dir(self, d: pb.Inode) -> None:
        """Entries of ``d`` changed: its mtime and ctime become now.

        Written to ``DMTM|d`` without reading it (a blind write), not into the
        inode: so creates and removals of different names in one directory never
        conflict with each other. :meth:`dir_times` folds it into the inode."""
        self.tx.set(schema.dir_times_key(d.ino), schema.encode_counter(self.now_ns))
        d.mtime_ns = d.ctime_ns = self.now_ns  # this transaction's view

    async def dir_times(self, inode: pb.Inode) -> pb.Inode:
        """A directory's inode with its entry-change time folded in."""
        if inode.type == DIRECTORY:
            raw = await self.tx.get(schema.dir_times_key(inode.ino))
            if raw is not None:
                t = schema.decode_counter(raw)
                inode.mtime_ns = t
                inode.ctime_ns = max(inode.ctime_ns, t)
        return inode

    def set_dir_mtime(self, d: pb.Inode) -> None:
        """An explicit mtime on a directory (utimes) replaces the entry-change time."""
        assert d.type == DIRECTORY
        self.tx.clear(schema.dir_times_key(d.ino))

    # -- entries ------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> tuple[int, int] | None:
        raw = await self.tx.get(schema.dent_key(parent, name))
        ent = None if raw is None else schema.decode_dent(raw)
        if self.hints is not None:
            self.hints.note(parent, name, None if ent is None else ent[0])
        return ent

    def set_entry(self, parent: int, name: bytes, ino: int, type_: int) -> None:
        self.tx.set(schema.dent_key(parent, name), schema.encode_dent(ino, type_))
        if self.hints is not None:
            self.hints.note(parent, name, ino)

    def clear_entry(self, parent: int, name: bytes) -> None:
        self.tx.clear(schema.dent_key(parent, name))
        if self.hints is not None:
            self.hints.note(parent, name, None)

    async def is_empty_dir(self, ino: int) -> bool:
        rows = await self.tx.get_range(*schema.range_of(schema.dent_prefix(ino)), limit=1)
        return not rows

    async def has_sessions(self, ino: int) -> bool:
        rows = await self.tx.get_range(*schema.range_of(schema.session_prefix(ino)), limit=1)
        return bool(rows)

    # -- resolution ---------------------------------------------------------
    async def _search(self, d: pb.Inode) -> None:
        if d.type != DIRECTORY:
            raise ChainfsError(Code.ENOTDIR, f"inode {d.ino} is not a directory")
        if not self.caller.is_root:
            perm.check(d, perm.X, self.caller, f"search directory {d.ino}")

    async def resolve(self, p: ParsedPath, follow_last: bool) -> Target:
        """Walk ``p``. ``follow_last``: a symlink named by the last component is
        followed (stat, open) rather than returned (lstat, unlink, rename)."""
        start = await self.inode(p.start)
        if p.self_ref:
            return Target(0, b"", Last.SELF, False, start)
        return await self.walk(start, list(p.comps), p.slash, follow_last)

    async def walk(
        self, start: pb.Inode, comps: list[bytes], slash: bool, follow_last: bool
    ) -> Target:
        links = 0
        cur = start
        pending = deque(comps)
        if not pending:
            if cur.ino == schema.ROOT_INO:
                return Target(0, b"", Last.ROOT, slash, cur)
            raise AssertionError("walk without components from a non-root directory")
        while pending:
            name = pending.popleft()
            last = not pending
            await self._search(cur)
            if name == b".":
                if last:
                    return Target(cur.ino, name, Last.DOT, slash, cur)
                continue
            if name == b"..":
                up = cur if cur.ino == schema.ROOT_INO else await self.inode(cur.parent)
                if last:
                    return Target(cur.ino, name, Last.DOTDOT, slash, up)
                cur = up
                continue
            ent = await self.lookup(cur.ino, name)
            if ent is None:
                if last:
                    return Target(cur.ino, name, Last.NORM, slash, None)
                raise ChainfsError(Code.ENOENT, f"no entry {name!r} in directory {cur.ino}")
            ino, dtype = ent
            if dtype == SYMLINK and (not last or follow_last):
                links += 1
                if links > self.cfg.max_symlink_follows:
                    raise ChainfsError(Code.ELOOP, "too many levels of symbolic links")
                link = await self.inode(ino)
                absolute, tcomps, tslash = split_target(link.symlink_target)
                if absolute:
                    cur = await self.inode(schema.ROOT_INO)
                if last:
                    slash = slash or tslash
                pending.extendleft(reversed(tcomps))
                if not pending:  # the link points at "/"
                    return Target(0, b"", Last.ROOT, slash, cur)
                continue
            child = await self.inode(ino)
            if last:
                return Target(cur.ino, name, Last.NORM, slash, child)
            cur = child
        raise AssertionError("unreachable: the loop returns at the last component")

    async def is_ancestor(self, anc: int, ino: int) -> bool:
        """Whether directory ``anc`` is ``ino`` or one of its ancestors. Reads
        every directory on the way up, so a concurrent move conflicts."""
        cur = ino
        for _ in range(1 << 20):
            if cur == anc:
                return True
            if cur == schema.ROOT_INO:
                return False
            cur = (await self.inode(cur)).parent
        raise ChainfsError(Code.EIO, f"directory {ino}: parent chain does not reach the root")
