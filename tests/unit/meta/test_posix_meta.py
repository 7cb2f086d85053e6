"""Meta's side of special files, fallocate, the setuid drop, and advisory locks."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import pytest

from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.meta_wire import LOCK_EOF
from chainfs.meta_service.background import SessionPruner
from chainfs.meta_service.ops.locks import apply_range
from chainfs.proto import meta_pb2 as pb
from tests.unit.meta.conftest import MetaEnv, start_env, stop_env

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


def rng(type_: int, start: int, end: int) -> pb.LockRange:
    return pb.LockRange(type=type_, start=start, end=end)


def spans(ranges: list[pb.LockRange]) -> list[tuple[int, int, int]]:
    return [(r.type, r.start, r.end) for r in ranges]


async def fails(code: int, aw: object) -> None:
    with pytest.raises(ChainfsError) as ei:
        await aw  # type: ignore[misc]
    assert ei.value.errno == code, ei.value


async def test_special_files_have_type_rdev_and_no_layout(env: MetaEnv) -> None:
    m = env.direct
    dev = os.makedev(8, 1)
    fifo = await m.mknod("/fifo", stat.S_IFIFO | 0o640)
    sock = await m.mknod("/sock", stat.S_IFSOCK | 0o755)
    chr_ = await m.mknod("/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    blk = await m.mknod("/sda1", stat.S_IFBLK | 0o660, dev)
    reg = await m.mknod("/plain", 0o600)
    assert (fifo.type, sock.type, chr_.type, blk.type) == (
        pb.FIFO,
        pb.SOCKET,
        pb.CHAR_DEVICE,
        pb.BLOCK_DEVICE,
    )
    assert reg.type == pb.FILE and len(reg.layout.chains) == 4
    assert not fifo.layout.chains and blk.rdev == dev
    st = await m.stat("/sda1")
    assert st.rdev == dev and st.mode == 0o660
    names = {e.name: e.type async for e in m.iterdir("/")}
    assert names[b"fifo"] == pb.FIFO and names[b"null"] == pb.CHAR_DEVICE
    await fails(errno.EEXIST, m.mknod("/fifo", stat.S_IFIFO | 0o600))
    await fails(errno.EINVAL, m.mknod("/x", stat.S_IFDIR | 0o700))
    await fails(errno.EINVAL, m.mknod("/y", stat.S_IFIFO | 0o600, rdev=5))
    # Meta serves no bytes of a special file.
    await fails(errno.ENXIO, m.open("/fifo", read=True, write=True))


async def test_special_files_take_chmod_chown_link_rename_unlink(env: MetaEnv) -> None:
    m = env.direct
    await m.mknod("/f", stat.S_IFIFO | 0o600)
    assert (await m.chmod("/f", 0o644)).mode == 0o644
    assert (await m.chown("/f", 7, 8)).uid == 7
    assert (await m.link("/f", "/g")).nlink == 2
    await m.rename("/g", "/h")
    await m.unlink("/f")
    assert (await m.stat("/h")).nlink == 1
    await m.unlink("/h")
    await fails(errno.ENOENT, m.stat("/h"))
    assert env.storage.calls == []  # never touched storage


async def test_only_root_makes_devices(env: MetaEnv) -> None:
    await env.direct.mkdir("/pub", 0o777)
    nobody = env.as_user(NOBODY, NOBODY)
    await fails(errno.EPERM, nobody.mknod("/pub/d", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    assert (await nobody.mknod("/pub/p", stat.S_IFIFO | 0o600)).uid == NOBODY


async def test_kill_priv_is_the_only_chmod_a_non_owner_may_send(env: MetaEnv) -> None:
    m = env.direct
    await m.create("/s", 0o6777, write=False)
    nobody = env.as_user(NOBODY, NOBODY)
    await fails(errno.EPERM, nobody.setattr("/s", mode=0o777))  # a plain chmod
    await fails(errno.EPERM, nobody.setattr("/s", mode=0o6755, kill_priv=True))  # not a drop
    assert (await nobody.setattr("/s", mode=0o777, kill_priv=True)).mode == 0o777


async def test_truncate_by_non_root_drops_setuid(env: MetaEnv) -> None:
    m = env.direct
    await m.create("/s", 0o6777, write=False)
    await m.create("/g", 0o2767, write=False)  # setgid without group-exec stays
    nobody = env.as_user(NOBODY, NOBODY)
    assert (await nobody.truncate("/s", 10)).mode == 0o777
    assert (await nobody.truncate("/g", 10)).mode == 0o2767
    await m.chmod("/s", 0o4777)
    assert (await m.truncate("/s", 0)).mode == 0o4777  # root keeps it (CAP_FSETID)


async def test_write_by_non_root_drops_setuid(env: MetaEnv) -> None:
    await env.direct.create("/s", 0o6777, write=False)
    nobody = env.as_user(NOBODY, NOBODY)
    f = await nobody.open("/s", read=False, write=True)
    assert (await nobody.close(f.inode.ino, f.session_id, 5, wrote=True)).mode == 0o777
    await env.direct.chmod("/s", 0o4777)
    f = await env.direct.open("/s", read=False, write=True)
    assert (await env.direct.close(f.inode.ino, f.session_id, 9, wrote=True)).mode == 0o4777


async def test_fallocate_modes(env: MetaEnv) -> None:
    m = env.direct
    await m.create("/f", 0o644, write=False)
    assert (await m.fallocate("/f", 0, 100, 50)).size == 150
    assert (await m.fallocate("/f", 0, 0, 10)).size == 150  # never shrinks
    assert (await m.fallocate("/f", 1, 0, 1000)).size == 150  # KEEP_SIZE
    assert (await m.fallocate("/f", 3, 0, 1000)).size == 150  # PUNCH_HOLE|KEEP_SIZE
    for mode in (2, 8, 16, 32, 64):  # punch without keep-size, collapse, zero, insert, unshare
        await fails(errno.EOPNOTSUPP, m.fallocate("/f", mode, 0, 10))
    await fails(errno.EINVAL, m.fallocate("/f", 0, 0, 0))
    await m.mkdir("/d")
    await fails(errno.ENODEV, m.fallocate("/d", 0, 0, 10))
    assert (await m.stat("/f")).size == 150


def test_apply_range_splits_and_merges() -> None:
    R, W, U = pb.READ, pb.WRITE, pb.UNLOCK
    held = apply_range([], rng(W, 0, 100))
    held = apply_range(held, rng(U, 40, 60))
    assert spans(held) == [(W, 0, 40), (W, 60, 100)]
    held = apply_range(held, rng(R, 30, 70))
    assert spans(held) == [(W, 0, 30), (R, 30, 70), (W, 70, 100)]
    held = apply_range(held, rng(W, 30, 70))
    assert spans(held) == [(W, 0, 100)]
    held = apply_range(held, rng(W, 100, LOCK_EOF))  # adjacent: merged
    assert spans(held) == [(W, 0, LOCK_EOF)]
    assert apply_range(held, rng(U, 0, LOCK_EOF)) == []


async def test_posix_locks_conflict_across_clients(env: MetaEnv) -> None:
    m = env.direct
    ino = (await m.create("/f", 0o666, write=False)).inode.ino
    a = env.as_user(0, 0)
    b = env.as_user(0, 0)
    assert (await a.lock(ino, pb.POSIX, rng(pb.WRITE, 0, 100), owner=1, pid=11)).granted
    denied = await b.lock(ino, pb.POSIX, rng(pb.READ, 50, 60), owner=1, pid=22)
    assert not denied.granted
    assert denied.conflict.pid == 11 and denied.conflict.range.type == pb.WRITE
    assert (await b.lock(ino, pb.POSIX, rng(pb.WRITE, 100, 200), owner=1)).granted
    # F_GETLK names the holder and changes nothing.
    probe = await b.lock(ino, pb.POSIX, rng(pb.READ, 0, 10), owner=1, test=True)
    assert not probe.granted and probe.conflict.pid == 11
    # a unlocks the middle: b may take it, not the rest.
    await a.lock(ino, pb.POSIX, rng(pb.UNLOCK, 40, 60), owner=1)
    assert (await b.lock(ino, pb.POSIX, rng(pb.WRITE, 45, 55), owner=1)).granted
    assert not (await b.lock(ino, pb.POSIX, rng(pb.READ, 30, 41), owner=1)).granted
    # Shared locks coexist; flock and POSIX locks do not interact.
    assert (await a.lock(ino, pb.FLOCK, rng(pb.READ, 0, 0), owner=5)).granted
    assert (await b.lock(ino, pb.FLOCK, rng(pb.READ, 0, 0), owner=5)).granted
    assert not (await b.lock(ino, pb.FLOCK, rng(pb.WRITE, 0, 0), owner=5)).granted
    # The same client, another owner (another open file): conflicts too.
    assert not (await a.lock(ino, pb.POSIX, rng(pb.WRITE, 0, 10), owner=2)).granted


async def test_locks_of_a_silent_client_are_dropped() -> None:
    env = await start_env(session_timeout_ms=300)
    try:
        ino = (await env.direct.create("/f", 0o666, write=False)).inode.ino
        holder = env.as_user(0, 0)
        other = env.as_user(0, 0)
        assert (await holder.lock(ino, pb.POSIX, rng(pb.WRITE, 0, 10), owner=1)).granted
        await holder.aclose()  # stops its keep-alives: as if its process died
        for _ in range(100):
            rsp = await other.lock(ino, pb.POSIX, rng(pb.WRITE, 0, 10), owner=1)
            if rsp.granted:
                break
            await asyncio.sleep(0.05)
        assert rsp.granted
        pruners = [t for t in env.server.tasks if isinstance(t, SessionPruner)]
        assert sum(p.dropped_locks for p in pruners) >= 1
        # A live client's locks stay: it keeps its lease alive while it holds them.
        await asyncio.sleep(1.0)
        assert not (await holder_again(env, ino)).granted
    finally:
        await stop_env(env)


async def holder_again(env: MetaEnv, ino: int) -> pb.LockRsp:
    return await env.as_user(0, 0).lock(ino, pb.POSIX, rng(pb.READ, 0, 1), owner=9, test=True)
