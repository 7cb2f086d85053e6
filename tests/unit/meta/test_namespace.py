"""Namespace operations over ``memory://``: semantics, errnos, bad input."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.meta_client import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    MetaClient,
    to_stat_result,
)
from chainfs.kv import Transaction, TxnTooOld
from chainfs.kv import open as kv_open
from chainfs.meta_service import schema
from chainfs.meta_service.alloc import InodeAllocator
from chainfs.meta_service.namespace import Namespace
from chainfs.proto import meta_pb2 as pb
from tests.unit.meta.conftest import MetaEnv, make_config

pytestmark = pytest.mark.timeout(60)


async def kv_dump(env: MetaEnv) -> dict[bytes, bytes]:
    async def fn(tx: Transaction) -> dict[bytes, bytes]:
        return dict(await tx.get_range(b"\x00", b"\xff" * 8))

    return await env.kv.transact(fn, read_only=True)


async def fails(code: int, aw: Awaitable[Any]) -> ChainfsError:
    with pytest.raises(ChainfsError) as ei:
        await aw
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value}"
    return ei.value


async def tree(m: MetaClient, path: str = "/") -> dict[str, tuple[int, int]]:
    """path -> (type, nlink) of everything under ``path``."""
    out: dict[str, tuple[int, int]] = {}

    async def walk(p: str) -> None:
        async for e in m.iterdir(p, with_attrs=True):
            child = f"{p.rstrip('/')}/{e.name.decode()}"
            out[child] = (e.inode.type, e.inode.nlink)
            if e.inode.type == pb.DIRECTORY:
                await walk(child)

    await walk(path)
    return out


# -- formatting and allocation ---------------------------------------------------
async def test_format_is_idempotent_and_safe_when_servers_start_together() -> None:
    kv = kv_open("memory://")
    cfg = make_config()
    fmts = await asyncio.gather(*(Namespace.format(kv, cfg) for _ in range(8)))
    assert len({f.SerializeToString() for f in fmts}) == 1
    root = schema.decode_inode(await kv.get(schema.inode_key(schema.ROOT_INO)) or b"")
    assert root.type == pb.DIRECTORY and root.nlink == 2 and root.mode == cfg.root_mode
    await kv.close()


async def test_allocators_of_several_servers_never_hand_out_an_id_twice() -> None:
    kv = kv_open("memory://")
    fmt = await Namespace.format(kv, make_config(alloc_shards=2, alloc_batch=4))
    allocs = [InodeAllocator(kv, fmt) for _ in range(4)]
    ids = await asyncio.gather(*(a.take() for a in allocs for _ in range(50)))
    assert len(set(ids)) == len(ids) == 200
    assert min(ids) >= fmt.alloc_first_id
    assert sum(a.batches_reserved for a in allocs) * fmt.alloc_batch >= 200
    assert await allocs[0].allocated() == sum(a.batches_reserved for a in allocs) * 4
    await kv.close()


async def test_concurrent_creates_get_distinct_inodes(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/d")
    rs = await asyncio.gather(*(m.create(f"/d/f{i}", write=False) for i in range(100)))
    assert len({r.inode.ino for r in rs}) == 100
    assert sorted(await m.listdir("/d")) == sorted(f"f{i}" for i in range(100))


# -- basic operations ---------------------------------------------------------------
async def test_create_stat_and_layout(env: MetaEnv) -> None:
    m = env.direct
    r = await m.create("/f", 0o640, exclusive=True)
    assert r.created and r.session_id
    i = r.inode
    assert i.type == pb.FILE and i.mode == 0o640 and i.nlink == 1 and i.size == 0
    assert i.layout.chunk_size == env.cfg.default_chunk_size_bytes
    assert i.layout.stripe == len(i.layout.chains) == env.cfg.default_stripe
    assert len(set(i.layout.chains)) == len(i.layout.chains)
    st = to_stat_result(await m.stat("/f"))
    assert st.st_ino == i.ino and st.st_mode == 0o100640 and st.st_nlink == 1
    await fails(errno.EEXIST, m.create("/f", exclusive=True))
    again = await m.create("/f")  # O_CREAT without O_EXCL opens it
    assert again.inode.ino == i.ino and not again.created


async def test_inode_form_and_path_form_agree(env: MetaEnv) -> None:
    m = env.direct
    d = await m.mkdir("/d")
    f = (await m.create((d.ino, "x"), write=False)).inode
    assert (await m.lookup(d.ino, "x")).ino == f.ino
    assert (await m.stat("/d/x")).ino == f.ino
    assert (await m.stat(f.ino)).ino == f.ino
    await m.rename((d.ino, "x"), (schema.ROOT_INO, "y"))
    assert (await m.stat("/y")).ino == f.ino
    await m.unlink((schema.ROOT_INO, "y"))
    await fails(errno.ENOENT, m.stat("/y"))


async def test_mkdir_p(env: MetaEnv) -> None:
    m = env.direct
    leaf = await m.mkdir("/a/b/c", 0o750, parents=True, parents_mode=0o711)
    assert leaf.mode == 0o750
    assert (await m.stat("/a/b")).mode == 0o711
    assert (await m.mkdir("/a/b/c", parents=True)).ino == leaf.ino  # exists: fine
    await m.create("/a/file", write=False)
    await fails(errno.ENOTDIR, m.mkdir("/a/file/x", parents=True))
    await fails(errno.EEXIST, m.mkdir("/a/file", parents=True))
    await fails(errno.EEXIST, m.mkdir("/a/b"))
    assert (await m.stat("/a")).nlink == 3  # . + b + ..


async def test_readdir_pages_in_name_order_with_attributes(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/big")
    names = [f"n{i:05d}" for i in range(2500)]
    for i in range(0, len(names), 250):
        await asyncio.gather(*(m.mkdir(f"/big/{n}") for n in names[i : i + 250]))
    page = await m.readdir("/big", limit=1000, with_attrs=True)
    assert page.more and len(page.entries) == 1000
    assert all(e.inode.ino == e.ino and e.inode.type == pb.DIRECTORY for e in page.entries)
    seen = [e.name.decode() async for e in m.iterdir("/big", page=700)]
    assert seen == names
    assert (await m.stat("/big")).nlink == 2 + len(names)
    await fails(errno.ENOTDIR, m.readdir((await m.create("/f", write=False)).inode.ino))


async def test_unlink_rmdir_and_nlink(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/d")
    await m.mkdir("/d/sub")
    f = (await m.create("/d/f", write=False)).inode
    await m.link("/d/f", "/g")
    assert (await m.stat("/g")).nlink == 2
    await fails(errno.ENOTEMPTY, m.rmdir("/d"))
    await fails(errno.EISDIR, m.unlink("/d/sub"))
    await fails(errno.ENOTDIR, m.rmdir("/d/f"))
    await fails(errno.EPERM, m.link("/d", "/d2"))
    await m.unlink("/d/f")
    assert (await m.stat("/g")).nlink == 1
    assert (await m.stat(f.ino)).nlink == 1
    await m.rmdir("/d/sub")
    assert (await m.stat("/d")).nlink == 2
    await m.rmdir("/d")
    assert (await m.stat("/")).nlink == 2
    await fails(errno.EBUSY, m.rmdir("/"))


async def test_rename_semantics(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/a/b/c", parents=True)
    await m.mkdir("/x")
    f1 = (await m.create("/f1", write=False)).inode
    f2 = (await m.create("/f2", write=False)).inode
    await fails(errno.EINVAL, m.rename("/a", "/a/b/c/a"))  # into its own subtree
    await fails(errno.ENOTEMPTY, m.rename("/a/b/c", "/a"))  # over its own ancestor
    await fails(errno.EISDIR, m.rename("/f1", "/x"))
    await fails(errno.ENOTDIR, m.rename("/x", "/f1"))
    await fails(errno.ENOTEMPTY, m.rename("/x", "/a"))
    await fails(errno.EEXIST, m.rename("/f1", "/f2", RENAME_NOREPLACE))
    await fails(errno.ENOENT, m.rename("/f1", "/nope", RENAME_EXCHANGE))
    await fails(errno.EINVAL, m.rename("/f1", "/f2", RENAME_EXCHANGE | RENAME_NOREPLACE))
    # Over an existing file: the target's inode loses its name.
    await m.rename("/f1", "/f2")
    assert (await m.stat("/f2")).ino == f1.ino
    # ... and, never written and not open, is gone at once (no GC round needed).
    await fails(errno.ENOENT, m.stat(f2.ino))
    # Over an empty directory; the moved directory's parent and nlinks follow.
    await m.mkdir("/a/empty")
    await m.rename("/x", "/a/empty")
    assert (await m.stat("/a")).nlink == 4 and (await m.stat("/")).nlink == 3
    assert (await m.stat("/a/empty/..")).ino == (await m.stat("/a")).ino
    # Exchange a file and a directory across parents.
    await m.rename("/f2", "/a/b", RENAME_EXCHANGE)
    assert (await m.stat("/f2")).type == pb.DIRECTORY
    assert (await m.stat("/a/b")).type == pb.FILE
    assert (await m.stat("/f2/c/..")).ino == (await m.stat("/f2")).ino
    assert (await m.stat("/")).nlink == 4 and (await m.stat("/a")).nlink == 3
    # Same inode under both names (hard links): nothing happens.
    await m.link("/a/b", "/a/b2")
    await m.rename("/a/b", "/a/b2")
    assert sorted(await m.listdir("/a")) == ["b", "b2", "empty"]


async def test_symlinks_and_loops(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/d")
    await m.create("/d/f", write=False)
    await m.symlink("d", "/rel")
    await m.symlink("/d/f", "/abs")
    await m.symlink("loop2", "/loop1")
    await m.symlink("loop1", "/loop2")
    assert (await m.stat("/rel/f")).type == pb.FILE
    assert (await m.stat("/abs")).type == pb.FILE
    assert (await m.lstat("/abs")).type == pb.SYMLINK
    assert (await m.lstat("/abs")).size == len("/d/f")
    assert await m.readlink("/rel") == "d"
    await fails(errno.EINVAL, m.readlink("/d"))
    await fails(errno.ELOOP, m.stat("/loop1"))
    await fails(errno.ELOOP, m.open("/abs", nofollow=True))
    await fails(errno.ENOENT, m.symlink("", "/empty"))
    # A chain of max_symlink_follows links resolves, one more is ELOOP.
    limit = env.cfg.max_symlink_follows
    await m.symlink("d", "/s0")
    for i in range(1, limit + 1):
        await m.symlink(f"s{i - 1}", f"/s{i}")
    assert (await m.stat(f"/s{limit - 1}/f")).type == pb.FILE
    await fails(errno.ELOOP, m.stat(f"/s{limit}/f"))
    # O_CREAT through a dangling symlink creates its target.
    await m.symlink("d/new", "/dangling")
    r = await m.create("/dangling", write=False)
    assert r.created and (await m.stat("/d/new")).ino == r.inode.ino


async def test_setattr(env: MetaEnv) -> None:
    m = env.direct
    f = (await m.create("/f", write=False)).inode
    i = await m.chmod("/f", 0o4755)
    assert i.mode == 0o4755 and i.ctime_ns >= f.ctime_ns
    i = await m.chown("/f", 12, 34)
    assert (i.uid, i.gid) == (12, 34) and i.mode == 0o755  # chown drops setuid
    i = await m.chown("/f", -1, 35)
    assert (i.uid, i.gid) == (12, 35)
    i = await m.utime("/f", (1_000_000_123, 2_000_000_456))
    assert (i.atime_ns, i.mtime_ns) == (1_000_000_123, 2_000_000_456)
    i = await m.utime("/f")
    assert i.mtime_ns > 2_000_000_456
    i = await m.truncate("/f", 10 * 1024 * 1024)
    assert i.size == 10 * 1024 * 1024
    await fails(errno.EISDIR, m.truncate("/", 0))
    await m.symlink("f", "/l")
    await fails(errno.EOPNOTSUPP, m.chmod("/l", 0o700, follow=False))
    assert (await m.chmod("/l", 0o700)).ino == f.ino  # follows by default


async def test_truncate_shrinks_chunks_on_storage(env: MetaEnv) -> None:
    m = env.direct
    await m.set_layout("/", chunk_size=64 * 1024)
    r = await m.create("/f")
    ino, lay = r.inode.ino, r.inode.layout
    env.storage.write(list(lay.chains), lay.chunk_size, ino, 10 * 64 * 1024)
    assert (await m.close(ino, r.session_id, 10 * 64 * 1024, wrote=True)).size == 10 * 64 * 1024  # type: ignore[union-attr]
    await m.truncate("/f", 3 * 64 * 1024 + 100)
    left = env.storage.of(ino)
    assert sorted(i for _, i in left) == [0, 1, 2, 3]
    assert left[(lay.chains[3 % len(lay.chains)], 3)] == 100
    assert (await m.stat("/f")).size == 3 * 64 * 1024 + 100
    await m.truncate("/f", 0)
    assert env.storage.of(ino) == {}


async def test_xattrs(env: MetaEnv) -> None:
    m = env.direct
    await m.create("/f", write=False)
    await m.setxattr("/f", "user.a", b"1")
    await m.setxattr("/f", "user.b", b"")
    assert await m.getxattr("/f", "user.a") == b"1"
    assert await m.getxattr("/f", "user.b") == b""
    assert sorted(await m.listxattr("/f")) == ["user.a", "user.b"]
    await fails(errno.EEXIST, m.setxattr("/f", "user.a", b"2", flags=1))
    await fails(errno.ENODATA, m.setxattr("/f", "user.c", b"2", flags=2))
    await m.setxattr("/f", "user.a", b"2", flags=2)
    assert await m.getxattr("/f", "user.a") == b"2"
    await m.removexattr("/f", "user.a")
    await fails(errno.ENODATA, m.getxattr("/f", "user.a"))
    await fails(errno.ENODATA, m.removexattr("/f", "user.a"))
    await fails(errno.EOPNOTSUPP, m.setxattr("/f", "bogus.a", b""))
    await fails(errno.ERANGE, m.setxattr("/f", "user." + "x" * 300, b""))
    await fails(errno.E2BIG, m.setxattr("/f", "user.big", b"x" * (64 * 1024 + 1)))
    await m.setxattr("/f", "user.max", b"x" * (64 * 1024))


async def test_statfs_and_layouts(env: MetaEnv) -> None:
    m = env.direct
    s = await m.statfs()
    assert s.chains == 8 and s.max_name_bytes == 255 and s.block_size == 4 * 1024 * 1024
    d = await m.mkdir("/d")
    await m.set_layout("/d", chunk_size=1024 * 1024, stripe=2, chains=[3, 5, 7])
    lay = await m.get_layout("/d")
    assert (lay.chunk_size, lay.stripe, list(lay.chains)) == (1024 * 1024, 2, [3, 5, 7])
    sub = await m.mkdir("/d/sub")  # a new directory inherits its parent's layout
    assert sub.layout == lay
    for i in range(20):
        f = (await m.create(f"/d/sub/f{i}", write=False)).inode
        assert f.layout.chunk_size == 1024 * 1024 and f.layout.stripe == 2
        assert set(f.layout.chains) <= {3, 5, 7} and len(set(f.layout.chains)) == 2
    assert (await m.stat(d.ino)).layout == lay
    await fails(errno.EINVAL, m.set_layout("/d", chunk_size=1000))
    await fails(errno.EINVAL, m.set_layout("/d", chunk_size=128 * 1024 * 1024))
    await fails(errno.EINVAL, m.set_layout("/d", chains=[99]))
    await fails(errno.ENOTDIR, m.set_layout("/d/sub/f0", stripe=1))


# -- bad input: precise errno, nothing changed --------------------------------------
BAD_INPUTS: list[tuple[str, int, Callable[[MetaClient, int], Awaitable[Any]]]] = [
    ("NUL in path", errno.EINVAL, lambda m, d: m.mkdir("/d/a\x00b")),
    ("NUL in name", errno.EINVAL, lambda m, d: m.create((d, "a\x00b"))),
    ("'/' in a name", errno.EINVAL, lambda m, d: m.mkdir((d, "a/b"))),
    ("empty path", errno.ENOENT, lambda m, d: m.mkdir("")),
    ("relative path", errno.EINVAL, lambda m, d: m.mkdir("d/x")),
    ("name of 256 bytes", errno.ENAMETOOLONG, lambda m, d: m.create("/d/" + "n" * 256)),
    ("name-form 256 bytes", errno.ENAMETOOLONG, lambda m, d: m.mkdir((d, "n" * 256))),
    ("path of 4096 bytes", errno.ENAMETOOLONG, lambda m, d: m.mkdir("/d" + "/a" * 2047)),
    ("path too deep", errno.ENAMETOOLONG, lambda m, d: m.mkdir("/a" * 600, parents=True)),
    ("mkdir .", errno.EEXIST, lambda m, d: m.mkdir("/d/.")),
    ("mkdir ..", errno.EEXIST, lambda m, d: m.mkdir("/d/..")),
    ("rmdir .", errno.EINVAL, lambda m, d: m.rmdir("/d/.")),
    ("rmdir ..", errno.ENOTEMPTY, lambda m, d: m.rmdir("/d/..")),
    ("unlink .", errno.EISDIR, lambda m, d: m.unlink("/d/.")),
    ("rename .", errno.EBUSY, lambda m, d: m.rename("/d/.", "/e")),
    ("rename to ..", errno.EBUSY, lambda m, d: m.rename("/d/f", "/d/..")),
    ("rename / ", errno.EBUSY, lambda m, d: m.rename("/", "/e")),
    ("rename bad flags", errno.EINVAL, lambda m, d: m.rename("/d/f", "/e", 8)),
    ("mode out of range", errno.EINVAL, lambda m, d: m.mkdir("/d/x", 0o10000)),
    ("create mode out of range", errno.EINVAL, lambda m, d: m.create("/d/x", 0o20000)),
    ("chmod out of range", errno.EINVAL, lambda m, d: m.chmod("/d/f", 0o17777)),
    ("uid out of range", errno.EINVAL, lambda m, d: m.chown("/d/f", 0xFFFFFFFF, None)),
    ("unknown inode", errno.ENOENT, lambda m, d: m.stat(987654321)),
    ("unknown parent inode", errno.ENOENT, lambda m, d: m.mkdir((987654321, "x"))),
    ("file as parent", errno.ENOTDIR, lambda m, d: m.mkdir("/d/f/x")),
    ("missing parent", errno.ENOENT, lambda m, d: m.create("/d/nope/x")),
    ("trailing slash on file", errno.ENOTDIR, lambda m, d: m.stat("/d/f/")),
    ("create with trailing slash", errno.EISDIR, lambda m, d: m.create("/d/new/")),
    ("symlink at trailing slash", errno.ENOENT, lambda m, d: m.symlink("t", "/d/new/")),
    ("symlink target NUL", errno.EINVAL, lambda m, d: m.symlink("a\x00", "/d/s")),
    ("symlink target too long", errno.ENAMETOOLONG, lambda m, d: m.symlink("t" * 4096, "/d/s")),
    ("xattr name empty", errno.ERANGE, lambda m, d: m.setxattr("/d/f", "", b"")),
    ("xattr bad flags", errno.EINVAL, lambda m, d: m.setxattr("/d/f", "user.x", b"", 4)),
    ("system xattr", errno.EOPNOTSUPP, lambda m, d: m.setxattr("/d/f", "system.x", b"")),
    ("truncate too large", errno.EFBIG, lambda m, d: m.truncate("/d/f", 1 << 63)),
    ("readdir of file", errno.ENOTDIR, lambda m, d: m.readdir("/d/f")),
    ("link to missing", errno.ENOENT, lambda m, d: m.link("/d/nope", "/d/x")),
    ("sync unknown inode", errno.ENOENT, lambda m, d: m.sync(987654321, b"", 5, exact=False)),
]


@pytest.mark.parametrize(("what", "code", "op"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_fails_precisely_and_changes_nothing(
    env: MetaEnv, what: str, code: int, op: Callable[[MetaClient, int], Awaitable[Any]]
) -> None:
    m = env.direct
    d = await m.mkdir("/d")
    await m.create("/d/f", write=False)
    before = await kv_dump(env)
    await fails(code, op(m, d.ino))
    assert await kv_dump(env) == before


# -- Linux semantics of special names, checked against a local directory ------------
SPECIAL_CASES: list[tuple[str, str, tuple[str, ...]]] = [
    ("mkdir", "d/.", ()),
    ("mkdir", "d/..", ()),
    ("mkdir", "nope/x", ()),
    ("mkdir", "f/x", ()),
    ("mkdir", "new/", ()),
    ("rmdir", "d/.", ()),
    ("rmdir", "d/..", ()),
    ("rmdir", "f/", ()),
    ("rmdir", "d/", ()),
    ("rmdir", "ld/", ()),
    ("unlink", "d/.", ()),
    ("unlink", "f/", ()),
    ("unlink", "d", ()),
    ("unlink", "nope/", ()),
    ("unlink", "lf", ()),
    ("stat", "f/", ()),
    ("stat", "ld/", ()),
    ("stat", "d/../f", ()),
    ("stat", "ld/../f", ()),
    ("lstat", "ld/", ()),
    ("lstat", "lf/", ()),
    ("rename", "f", ("d/.",)),
    ("rename", "f", ("d/..",)),
    ("rename", "d/.", ("x",)),
    ("rename", "f/", ("x",)),
    ("rename", "f", ("x/",)),
    ("rename", "d", ("x/",)),
    ("rename", "d", ("d/sub/x",)),
    ("rename", "d/sub", ("d",)),
    ("rename", "d", ("d",)),
    ("rename", "f", ("lf",)),
    ("rename", "ld/sub", ("e",)),
    ("link", "f", ("d/.",)),
    ("link", "f", ("x/",)),
    ("link", "d", ("x",)),
    ("link", "lf", ("hl",)),
    ("link", "f/", ("x",)),
    ("symlink", "x/", ("t",)),
    ("symlink", "f", ("t",)),
    ("create", "d/.", ()),
    ("create", "d", ()),
    ("create", "x/", ()),
    ("create", "f/", ()),
    ("create", "d/", ()),
    ("create_excl", "f/", ()),
    ("create_excl", "d/", ()),
    ("create", "dangling", ()),
    ("create_excl", "lf", ()),
    ("create_excl", "dangling", ()),
    ("readlink", "ld/", ()),
    ("readlink", "f", ()),
    ("truncate", "d/.", ()),
    ("listdir", "ld", ()),
    ("listdir", "lf", ()),
]


def _local(op: str, base: Path, a: str, rest: tuple[str, ...]) -> Any:
    # Plain strings: pathlib would drop "." components.
    p = f"{base}/{a}"
    q = [f"{base}/{r}" for r in rest]
    if op == "mkdir":
        return os.mkdir(p)
    if op == "rmdir":
        return os.rmdir(p)
    if op == "unlink":
        return os.unlink(p)
    if op == "stat":
        return stat_summary(os.stat(p).st_mode)
    if op == "lstat":
        return stat_summary(os.lstat(p).st_mode)
    if op == "rename":
        return os.rename(p, q[0])
    if op == "link":
        return os.link(p, q[0], follow_symlinks=False)
    if op == "symlink":
        return os.symlink(rest[0], p)
    if op in ("create", "create_excl"):
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if op == "create_excl" else 0)
        return os.close(os.open(p, flags, 0o644))
    if op == "readlink":
        return os.readlink(p)
    if op == "truncate":
        return os.truncate(p, 0)
    if op == "listdir":
        return sorted(os.listdir(p))
    raise AssertionError(op)


async def _chainfs(op: str, m: MetaClient, a: str, rest: tuple[str, ...]) -> Any:
    p = "/t/" + a
    q = ["/t/" + r for r in rest]
    if op == "mkdir":
        await m.mkdir(p)
        return None
    if op == "rmdir":
        return await m.rmdir(p)
    if op == "unlink":
        return await m.unlink(p)
    if op in ("stat", "lstat"):
        i = await m.stat(p, follow=op == "stat")
        return stat_summary(to_stat_result(i).st_mode)
    if op == "rename":
        await m.rename(p, q[0])
        return None
    if op == "link":
        await m.link(p, q[0])
        return None
    if op == "symlink":
        await m.symlink(rest[0], p)
        return None
    if op in ("create", "create_excl"):
        await m.create(p, 0o644, exclusive=op == "create_excl", write=False)
        return None
    if op == "readlink":
        return await m.readlink(p)
    if op == "truncate":
        await m.truncate(p, 0)
        return None
    if op == "listdir":
        return sorted(await m.listdir(p))
    raise AssertionError(op)


def stat_summary(mode: int) -> int:
    return mode & 0o170000


@pytest.mark.parametrize(("op", "a", "rest"), SPECIAL_CASES)
async def test_special_names_match_linux(
    env: MetaEnv, tmp_path: Path, op: str, a: str, rest: tuple[str, ...]
) -> None:
    """Build the same small tree on both sides; the operation must agree."""
    m = env.direct
    base = tmp_path / "t"
    await m.mkdir("/t")
    os.mkdir(base)
    for name in ("d", "d/sub"):
        await m.mkdir(f"/t/{name}")
        os.mkdir(base / name)
    await m.create("/t/f", write=False)
    (base / "f").touch()
    for target, name in (("d", "ld"), ("f", "lf"), ("nope/x", "dangling")):
        await m.symlink(target, f"/t/{name}")
        os.symlink(target, base / name)

    try:
        want: tuple[str, Any] = ("ok", _local(op, base, a, rest))
    except OSError as e:
        want = ("err", errno.errorcode[e.errno or 0])
    try:
        got: tuple[str, Any] = ("ok", await _chainfs(op, m, a, rest))
    except ChainfsError as e:
        got = ("err", errno.errorcode[e.errno or 0])
    assert got == want


async def test_directory_times_follow_entry_changes_and_utimes(env: MetaEnv) -> None:
    m = env.direct
    d0 = await m.mkdir("/d")
    await asyncio.sleep(0.002)
    await m.create("/d/f", write=False)
    d1 = await m.stat("/d")
    assert d1.mtime_ns > d0.mtime_ns and d1.ctime_ns == d1.mtime_ns
    listed = [e.inode async for e in m.iterdir("/", with_attrs=True) if e.name == b"d"]
    assert listed[0].mtime_ns == d1.mtime_ns
    d2 = await m.utime("/d", (5_000_000_000, 6_000_000_000))
    assert d2.mtime_ns == 6_000_000_000 == (await m.stat("/d")).mtime_ns
    await m.unlink("/d/f")
    d3 = await m.stat("/d")
    assert d3.mtime_ns > d1.mtime_ns and d3.ctime_ns >= d3.mtime_ns
    d4 = await m.chmod("/d", 0o700)  # an attribute change moves ctime only
    assert d4.mtime_ns == d3.mtime_ns and d4.ctime_ns >= d3.ctime_ns


async def test_batch_stat_reruns_a_transaction_whose_snapshot_is_too_old(
    env: MetaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of a snapshot the store no longer has (TXN_TOO_OLD: etcd's history
    compacted by another meta server's store) re-runs the whole transaction, as
    KVStore.transact does; BatchStat must not hand it back as one path's answer."""
    m = env.direct
    ino = (await m.mkdir("/d")).ino
    snap = await env.kv._begin()
    snap.close()
    real_get = type(snap).get
    too_old = [1]

    async def get(self: Any, key: bytes) -> bytes | None:
        if too_old[0]:
            too_old[0] -= 1
            raise TxnTooOld("etcd revision compacted")
        return await real_get(self, key)

    monkeypatch.setattr(type(snap), "get", get)
    got = await m.batch_stat(["/d", "/d"])
    assert not too_old[0]
    assert [g if isinstance(g, ChainfsError) else g.ino for g in got] == [ino, ino]
