"""Permission checks for non-root callers (uid/gid/groups in RequestInfo)."""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError
from chainfs.proto import meta_pb2 as pb
from tests.unit.meta.conftest import MetaEnv

pytestmark = pytest.mark.timeout(60)

ALICE, BOB = 1001, 1002
STAFF, OTHERS = 100, 200


async def denied(code: int, aw: Awaitable[Any]) -> None:
    with pytest.raises(ChainfsError) as ei:
        await aw
    assert ei.value.errno == code, ei.value


async def test_mode_bits_owner_group_other(env: MetaEnv) -> None:
    root = env.direct
    await root.mkdir("/home", 0o755)
    await root.mkdir("/home/alice", 0o750)
    await root.chown("/home/alice", ALICE, STAFF)
    alice = env.as_user(ALICE, STAFF)
    bob_staff = env.as_user(BOB, OTHERS, (STAFF,))
    eve = env.as_user(4242, 4242)

    await alice.create("/home/alice/f", 0o640, write=False)
    assert (await alice.stat("/home/alice/f")).uid == ALICE
    await bob_staff.stat("/home/alice/f")  # group r-x on the directory
    await denied(errno.EACCES, bob_staff.create("/home/alice/g", write=False))  # no group w
    await denied(errno.EACCES, eve.stat("/home/alice/f"))  # no search permission
    await denied(errno.EACCES, eve.readdir("/home/alice"))
    await denied(errno.EACCES, bob_staff.open("/home/alice/f", read=False, write=True))
    await bob_staff.open("/home/alice/f", read=True)  # group r on the file
    await denied(errno.EACCES, bob_staff.truncate("/home/alice/f", 0))
    await denied(errno.EACCES, eve.mkdir("/home/x"))
    await denied(errno.EACCES, alice.unlink("/home/alice"))  # needs w on /home (EACCES first)
    # Root bypasses all of it.
    await root.create("/home/alice/r", write=False)


async def test_owner_only_attribute_changes(env: MetaEnv) -> None:
    root = env.direct
    await root.mkdir("/pub", 0o777)
    alice = env.as_user(ALICE, STAFF, (OTHERS,))
    bob = env.as_user(BOB, BOB)
    f = (await alice.create("/pub/f", 0o666, write=False)).inode
    await denied(errno.EPERM, bob.chmod("/pub/f", 0o777))
    await denied(errno.EPERM, bob.chown("/pub/f", None, BOB))
    await denied(errno.EPERM, alice.chown("/pub/f", BOB, None))  # only root gives files away
    await denied(errno.EPERM, alice.chown("/pub/f", None, 4242))  # not her group
    assert (await alice.chown("/pub/f", None, OTHERS)).gid == OTHERS  # a group of hers
    await denied(errno.EPERM, bob.utime("/pub/f", (1, 2)))  # explicit times: owner only
    await bob.utime("/pub/f")  # "now": write permission is enough
    await root.chown("/pub/f", BOB, None)
    assert (await root.stat(f.ino)).uid == BOB
    # chmod by a non-member of the file's group drops setgid.
    g = await alice.create("/pub/g", 0o644, write=False)
    await root.chown("/pub/g", None, 4242)
    assert (await alice.chmod("/pub/g", 0o2755)).mode == 0o755
    await denied(errno.EPERM, bob.set_layout("/pub", stripe=2))
    assert g.inode.ino


async def test_sticky_directory(env: MetaEnv) -> None:
    root = env.direct
    await root.mkdir("/tmp", 0o1777)
    alice = env.as_user(ALICE, ALICE)
    bob = env.as_user(BOB, BOB)
    await alice.create("/tmp/a", 0o666, write=False)
    await alice.mkdir("/tmp/ad", 0o777)
    await bob.create("/tmp/b", 0o666, write=False)
    await denied(errno.EPERM, bob.unlink("/tmp/a"))
    await denied(errno.EPERM, bob.rmdir("/tmp/ad"))
    await denied(errno.EPERM, bob.rename("/tmp/a", "/tmp/mine"))
    await denied(errno.EPERM, bob.rename("/tmp/b", "/tmp/a"))  # replacing alice's file
    await bob.rename("/tmp/b", "/tmp/b2")
    await alice.unlink("/tmp/a")
    await root.rmdir("/tmp/ad")  # root may


async def test_setgid_directory_passes_its_group_on(env: MetaEnv) -> None:
    root = env.direct
    await root.mkdir("/proj", 0o2775)
    assert not (await root.stat("/proj")).mode & 0o2000  # mkdir(2) ignores setgid in mode
    await root.chown("/proj", 0, STAFF)
    await root.chmod("/proj", 0o2775)
    alice = env.as_user(ALICE, ALICE, (STAFF,))
    f = (await alice.create("/proj/f", 0o664, write=False)).inode
    d = await alice.mkdir("/proj/d", 0o775)
    assert f.gid == STAFF and d.gid == STAFF
    assert d.mode & 0o2000 and not f.mode & 0o2000


async def test_moving_a_directory_needs_write_on_it(env: MetaEnv) -> None:
    root = env.direct
    await root.mkdir("/a", 0o777)
    await root.mkdir("/b", 0o777)
    await root.mkdir("/a/d", 0o555)
    await root.chown("/a/d", ALICE, ALICE)
    alice = env.as_user(ALICE, ALICE)
    await alice.rename("/a/d", "/a/e")  # same parent: '..' does not change
    await denied(errno.EACCES, alice.rename("/a/e", "/b/e"))


async def test_xattr_permissions(env: MetaEnv) -> None:
    root = env.direct
    await root.mkdir("/x", 0o777)
    alice = env.as_user(ALICE, ALICE)
    bob = env.as_user(BOB, BOB)
    await alice.create("/x/f", 0o644, write=False)
    await alice.setxattr("/x/f", "user.a", b"1")
    assert await bob.getxattr("/x/f", "user.a") == b"1"
    await denied(errno.EACCES, bob.setxattr("/x/f", "user.b", b"1"))
    await denied(errno.EACCES, bob.removexattr("/x/f", "user.a"))
    await denied(errno.EPERM, alice.setxattr("/x/f", "trusted.t", b"1"))
    await root.setxattr("/x/f", "trusted.t", b"1")
    assert await alice.listxattr("/x/f") == ["user.a"]  # trusted.* hidden
    assert sorted(await root.listxattr("/x/f")) == ["trusted.t", "user.a"]
    await denied(errno.ENODATA, alice.getxattr("/x/f", "trusted.t"))
    await alice.symlink("f", "/x/l")
    await denied(errno.EPERM, alice.setxattr("/x/l", "user.a", b"1", follow=False))


async def test_root_needs_an_exec_bit_only_for_files(env: MetaEnv) -> None:
    from chainfs.meta_service import perm

    f = pb.Inode(type=pb.FILE, mode=0o600, uid=5)
    d = pb.Inode(type=pb.DIRECTORY, mode=0o000, uid=5)
    assert not perm.allowed(f, perm.X, perm.ROOT)
    assert perm.allowed(f, perm.R | perm.W, perm.ROOT)
    assert perm.allowed(d, perm.X | perm.W, perm.ROOT)
