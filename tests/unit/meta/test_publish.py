"""Close with a rename in the same commit (CloseReq.rename_*): the KV cache's put."""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import RENAME_EXCHANGE, RENAME_NOREPLACE
from chainfs.kv import TxnTooOld
from chainfs.meta_service import schema
from chainfs.proto import meta_pb2 as pb
from tests.unit.meta.conftest import MetaEnv

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


async def _sessions(env: MetaEnv) -> list[tuple[bytes, bytes]]:
    return await env.kv.transact(
        lambda tx: tx.get_range(*schema.range_of(schema.INOS)), read_only=True
    )


async def _written_tmp(env: MetaEnv, name: str, size: int) -> tuple[int, bytes]:
    m = env.direct
    await m.mkdir("/c/tmp", 0o755, parents=True)
    await m.mkdir("/c/data", 0o755, parents=True)
    r = await m.create(f"/c/tmp/{name}", exclusive=True)
    lay = r.inode.layout
    env.storage.write(list(lay.chains), lay.chunk_size, r.inode.ino, size)
    return r.inode.ino, r.session_id


async def test_close_publishes_the_file_under_its_new_name_in_one_commit(env: MetaEnv) -> None:
    m = env.direct
    ino, sid = await _written_tmp(env, "t", 5 * MiB + 3)
    env.storage.calls.clear()
    rsp = await m.close_publish(ino, sid, 5 * MiB + 3, "/c/tmp/t", "/c/data/k")
    assert rsp.rename.code == 0 and rsp.inode.size == 5 * MiB + 3
    st = await m.stat("/c/data/k")
    assert st.ino == ino and st.size == 5 * MiB + 3 and not st.never_written
    assert await m.listdir("/c/tmp") == []
    assert await _sessions(env) == []  # the write session ended with it
    assert env.storage.calls == []  # the writer's length is taken: storage not asked


async def test_a_taken_name_refuses_the_rename_but_the_close_commits(env: MetaEnv) -> None:
    m = env.direct
    ino, sid = await _written_tmp(env, "t", 1 * MiB)
    other = await m.create("/c/data/k", write=False)
    rsp = await m.close_publish(ino, sid, 1 * MiB, "/c/tmp/t", "/c/data/k", RENAME_NOREPLACE)
    assert rsp.rename.code == Code.EEXIST and not rsp.HasField("replaced")
    assert (await m.stat("/c/data/k")).ino == other.inode.ino  # unchanged
    st = await m.stat("/c/tmp/t")  # closed under its old name, with its length
    assert st.ino == ino and st.size == 1 * MiB
    assert await _sessions(env) == []
    # The caller may now replace with a plain rename (put with overwrite).
    await m.rename("/c/tmp/t", "/c/data/k")
    assert (await m.stat("/c/data/k")).ino == ino


async def test_rename_flags_zero_replace_the_file_there(env: MetaEnv) -> None:
    m = env.direct
    ino, sid = await _written_tmp(env, "t", 2 * MiB)
    prev = await m.create("/c/data/k", write=False)
    rsp = await m.close_publish(ino, sid, 2 * MiB, "/c/tmp/t", "/c/data/k", flags=0)
    assert rsp.rename.code == 0
    assert rsp.replaced.ino == prev.inode.ino and rsp.replaced.nlink == 0
    assert (await m.stat("/c/data/k")).ino == ino
    with pytest.raises(ChainfsError) as ei:
        await m.stat(prev.inode.ino)
    assert ei.value.errno == errno.ENOENT  # never written: gone at once


async def test_a_retried_publish_gets_the_first_answer(env: MetaEnv) -> None:
    m = env.direct
    ino, sid = await _written_tmp(env, "t", 1 * MiB)
    req = pb.CloseReq(
        req=m.request_info(),
        ino=ino,
        session_id=sid,
        length_hint=1 * MiB,
        wrote=True,
        length_known=True,
        rename_src=pb.PathAt(path=b"/c/tmp/t"),
        rename_dst=pb.PathAt(path=b"/c/data/k"),
        rename_flags=RENAME_NOREPLACE,
    )
    first = await env.ns.close(req)
    again = await env.ns.close(req)  # the answer was lost: the client sends it again
    assert first.rename.code == 0 and again == first  # not "EEXIST" or "ENOENT"
    assert (await m.stat("/c/data/k")).ino == ino


async def test_a_temp_file_removed_under_the_writer_is_refused_and_collected(
    env: MetaEnv,
) -> None:
    m = env.direct
    ino, sid = await _written_tmp(env, "t", 1 * MiB)
    await m.unlink("/c/tmp/t")  # a cleaner took it (a writer thought dead)
    await m.create("/c/tmp/t", write=False)  # and the name was taken again
    rsp = await m.close_publish(ino, sid, 1 * MiB, "/c/tmp/t", "/c/data/k")
    assert rsp.rename.code == Code.ENOENT
    assert await m.listdir("/c/data") == []
    assert await _sessions(env) == []
    deadline = time.monotonic() + 10
    while env.storage.of(ino):  # its chunks go through GC, then the inode
        assert time.monotonic() < deadline, "GC did not drop the chunks"
        await asyncio.sleep(0.01)


async def test_a_rename_into_a_directory_the_caller_may_not_write_is_refused(
    env: MetaEnv,
) -> None:
    await env.direct.mkdir("/c/tmp", 0o777, parents=True)
    await env.direct.mkdir("/c/data", 0o755, parents=True)  # root's, not writable by 1000
    user = env.as_user(1000, 1000)
    r = await user.create("/c/tmp/t", exclusive=True)
    rsp = await user.close_publish(r.inode.ino, r.session_id, 0, "/c/tmp/t", "/c/data/k")
    assert rsp.rename.code == Code.EACCES
    assert (await user.stat("/c/tmp/t")).ino == r.inode.ino
    assert await _sessions(env) == []


async def test_bad_publish_requests_change_nothing(env: MetaEnv) -> None:
    m = env.direct
    ino, sid = await _written_tmp(env, "t", 1 * MiB)
    base = dict(
        ino=ino,
        session_id=sid,
        length_hint=1 * MiB,
        wrote=True,
        length_known=True,
        rename_src=pb.PathAt(path=b"/c/tmp/t"),
        rename_dst=pb.PathAt(path=b"/c/data/k"),
    )
    bad = [
        {"rename_flags": RENAME_EXCHANGE},
        {"rename_flags": 0x80},
        {"rename_dst": None},
        {"session_id": b""},
    ]
    for change in bad:
        fields = {**base, **change}
        req = pb.CloseReq(
            req=m.request_info(), **{k: v for k, v in fields.items() if v is not None}
        )
        with pytest.raises(ChainfsError) as ei:
            await env.ns.close(req)
        assert ei.value.errno == errno.EINVAL, change
    assert await _sessions(env) != []  # still open
    assert (await m.stat("/c/tmp/t")).size == 0
    assert await m.listdir("/c/data") == []


async def test_a_snapshot_too_old_in_the_rename_reruns_the_close(
    env: MetaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TXN_TOO_OLD (etcd's history compacted by another meta server's store) while
    the rename resolves its names re-runs the whole close, as KVStore.transact
    does: it is no refusal of the rename (which then would not happen while the
    close commits)."""
    m = env.direct
    ino, sid = await _written_tmp(env, "t", 1 * MiB)
    snap = await env.kv._begin()
    snap.close()
    real_get = type(snap).get
    too_old = [1]

    async def get(self: Any, key: bytes) -> bytes | None:
        if too_old[0] and key.startswith(schema.DENT):
            too_old[0] -= 1
            raise TxnTooOld("etcd revision compacted")
        return await real_get(self, key)

    monkeypatch.setattr(type(snap), "get", get)
    rsp = await m.close_publish(ino, sid, 1 * MiB, "/c/tmp/t", "/c/data/k")
    assert not too_old[0]
    assert rsp.rename.code == 0, rsp.rename
    assert (await m.stat("/c/data/k")).ino == ino
