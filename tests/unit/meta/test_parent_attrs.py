"""Replies of namespace changes carry the changed directories as the change left
them: equal to what a fresh Stat of that directory returns right after, so a
client (the FUSE mount) can answer the directory's getattr without asking."""

from __future__ import annotations

import stat

import pytest

from chainfs.common.rpc.meta_client import RENAME_EXCHANGE, MetaClient
from chainfs.meta_service import schema
from chainfs.proto import meta_pb2 as pb
from tests.unit.meta.conftest import MetaEnv, start_env, stop_env

pytestmark = pytest.mark.timeout(60)


async def same_as_stat(m: MetaClient, got: pb.Inode, path: str) -> pb.Inode:
    """``got`` (from a reply) is exactly what Stat of ``path`` says now."""
    fresh = await m.stat(path, follow=False)
    assert fresh.type == pb.DIRECTORY
    assert got == fresh, f"reply says\n{got}\nstat says\n{fresh}"
    return fresh


async def test_new_names_return_their_directory(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/d")
    before = await m.stat("/d")

    made = await m.mkdir_reply("/d/sub", 0o755)
    parent = await same_as_stat(m, made.parent, "/d")
    assert parent.nlink == before.nlink + 1 and parent.mtime_ns > before.mtime_ns

    opened = await m.create("/d/f")
    assert opened.created and opened.parent is not None
    await same_as_stat(m, opened.parent, "/d")

    linked = await m.link_reply("/d/f", "/d/g")
    await same_as_stat(m, linked.parent, "/d")
    assert linked.inode.nlink == 2

    sym = await m.symlink_reply("f", "/d/s")
    await same_as_stat(m, sym.parent, "/d")

    node = await m.mknod_reply("/d/fifo", stat.S_IFIFO | 0o644)
    assert (await same_as_stat(m, node.parent, "/d")).nlink == before.nlink + 1


async def test_removals_return_their_directory(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/d")
    sub = await m.mkdir("/d/sub")
    await m.create("/d/f", write=False)
    nlink = (await m.stat("/d")).nlink

    unlinked = await m.unlink_reply("/d/f")
    assert (await same_as_stat(m, unlinked.parent, "/d")).nlink == nlink

    removed = await m.rmdir_reply("/d/sub")
    assert removed.ino == sub.ino
    assert (await same_as_stat(m, removed.parent, "/d")).nlink == nlink - 1


async def test_renames_return_both_directories_and_what_they_replaced(env: MetaEnv) -> None:
    m = env.direct
    await m.mkdir("/a")
    await m.mkdir("/b")
    await m.mkdir("/a/dir")
    await m.create("/a/f", write=False)
    a_links, b_links = (await m.stat("/a")).nlink, (await m.stat("/b")).nlink

    # Within one directory: both fields name it.
    within = await m.rename_reply("/a/f", "/a/f2")
    await same_as_stat(m, within.src_parent, "/a")
    await same_as_stat(m, within.dst_parent, "/a")
    assert not within.HasField("replaced")

    # A directory across: its ".." moves, the link counts with it.
    across = await m.rename_reply("/a/dir", "/b/dir")
    assert (await same_as_stat(m, across.src_parent, "/a")).nlink == a_links - 1
    assert (await same_as_stat(m, across.dst_parent, "/b")).nlink == b_links + 1

    # Over an existing file: the replaced inode comes back as left (no name left).
    victim = await m.create("/b/v", write=False)
    await m.create("/a/new", write=False)
    over = await m.rename_reply("/a/new", "/b/v")
    assert over.replaced.ino == victim.inode.ino and over.replaced.nlink == 0
    await same_as_stat(m, over.src_parent, "/a")
    await same_as_stat(m, over.dst_parent, "/b")

    # An exchange replaces nothing.
    await m.create("/a/x", write=False)
    swapped = await m.rename_reply("/a/x", "/b/v", RENAME_EXCHANGE)
    assert not swapped.HasField("replaced")
    await same_as_stat(m, swapped.dst_parent, "/b")


async def test_changes_without_a_new_name_return_no_directory(env: MetaEnv) -> None:
    m = env.direct
    await m.create("/f", write=False)
    again = await m.open("/f", write=True, create=True)  # exists: nothing created
    assert not again.created and again.parent is None
    await m.close(again.inode.ino, again.session_id)
    await m.mkdir("/p")
    existing = await m.mkdir_reply("/p", parents=True)  # mkdir -p of what exists
    assert not existing.HasField("parent")
    made = await m.mkdir_reply("/p/q/r", parents=True)
    await same_as_stat(m, made.parent, "/p/q")
    same = await m.rename_reply("/f", "/f")  # both names one file: POSIX does nothing
    assert same.inode.ino and not same.HasField("src_parent")


async def test_unlink_into_the_trash_returns_the_directory() -> None:
    env = await start_env(trash_retention_ms=60_000)
    try:
        m = env.direct
        await m.mkdir("/d")
        await m.create("/d/f", write=False)
        unlinked = await m.unlink_reply("/d/f")
        await same_as_stat(m, unlinked.parent, "/d")
    finally:
        await stop_env(env)


async def test_a_retried_change_is_answered_without_the_directory(env: MetaEnv) -> None:
    """The answer kept for retries leaves the directory out (it would double
    the record); the replay still names what changed."""
    ns = env.ns
    await env.direct.mkdir("/d")
    req = env.direct.request_info()
    mk = pb.MkdirReq(req=req, at=pb.PathAt(path=b"/d/sub"), mode=0o755)
    first = await ns.mkdir(mk)
    assert first.HasField("parent")
    record = await env.kv.get(schema.idem_key(req.client_id, req.request_id))
    assert record is not None
    assert len(record) == 1 + len(pb.MkdirRsp(inode=first.inode).SerializeToString())
    replay = await ns.mkdir(mk)
    assert replay.inode == first.inode and not replay.HasField("parent")

    rreq = env.direct.request_info()
    rm = pb.RmdirReq(req=rreq, at=pb.PathAt(path=b"/d/sub"))
    removed = await ns.rmdir(rm)
    replay_rm = await ns.rmdir(rm)
    assert replay_rm.ino == removed.ino == first.inode.ino
    assert removed.HasField("parent") and not replay_rm.HasField("parent")
