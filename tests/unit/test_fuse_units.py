"""FUSE mount pieces that need no kernel: -o parsing, read-ahead, access checks,
the directory attributes kept for getattr."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.common.dataplane.buffers import BufferPool
from chainfs.common.rpc.meta_client import UserInfo
from chainfs.fuse_mount.config import MountConfig, apply_options
from chainfs.fuse_mount.readahead import ReadAhead
from chainfs.fuse_mount.state import DirAttrCache, permitted
from chainfs.proto import meta_pb2 as mt

MiB = 1024 * 1024


def test_options_apply_and_validate() -> None:
    cfg = MountConfig()
    apply_options(cfg, "attr_timeout_ms=250,allow_other,ro,direct_io,nodefault_permissions")
    apply_options(cfg, "max-requests=128, noatime")
    assert cfg.attr_timeout_ms == 250 and cfg.allow_other and cfg.direct_io
    assert not cfg.default_permissions and cfg.max_requests == 128
    assert cfg.mount_flags == ["ro", "noatime"]
    cfg.validate()
    opts = cfg.fuse_options()
    assert {"allow_other", "ro", "noatime", "subtype=chainfs"} <= opts
    assert "default_permissions" not in opts


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ("bogus", "unknown option"),
        ("attr_timeout_ms=soon", "integer"),
        ("attr_timeout_ms", "needs a value"),
        ("allow_other=maybe", "true or false"),
        ("mount_flags=ro", "unknown option"),
    ],
)
def test_bad_options_name_the_problem(options: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        apply_options(MountConfig(), options)


@pytest.mark.parametrize("field", ["max_requests", "cluster_timeout_ms", "readdir_page_entries"])
def test_validate_rejects_zero(field: str) -> None:
    cfg = MountConfig()
    setattr(cfg, field, 0)
    with pytest.raises(ValueError, match=field):
        cfg.validate()


@pytest.mark.parametrize("value", [-1, 1025])
def test_validate_bounds_max_background(value: int) -> None:
    cfg = MountConfig(max_background=value)
    with pytest.raises(ValueError, match="max_background"):
        cfg.validate()


def test_client_timeouts_capped_by_cluster_timeout() -> None:
    cfg = MountConfig(cluster_timeout_ms=2000)
    c = cfg.effective_client_config()
    assert c.meta_timeout_ms == 2000 and c.storage.timeout_ms == 2000
    assert cfg.client.meta_timeout_ms > 2000  # the original is untouched


def test_access_checks() -> None:
    node = mt.Inode(type=mt.FILE, mode=0o640, uid=10, gid=20)
    assert permitted(node, os.R_OK | os.W_OK, UserInfo(10, 99))
    assert permitted(node, os.R_OK, UserInfo(11, 20))
    assert not permitted(node, os.W_OK, UserInfo(11, 20))
    assert permitted(node, os.R_OK, UserInfo(11, 5, (20,)))  # supplementary group
    assert not permitted(node, os.R_OK, UserInfo(11, 5))
    assert permitted(node, os.R_OK | os.W_OK, UserInfo(0, 0))
    assert not permitted(node, os.X_OK, UserInfo(0, 0))  # root needs some x bit
    assert permitted(node, os.F_OK, UserInfo(99, 99))


# -- read-ahead ----------------------------------------------------------------------


def _content(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def _read_all(
    ra: ReadAhead, data: bytes, offsets: list[tuple[int, int]], generation: int = 0
) -> list[bytes]:
    out = []
    for off, n in offsets:
        got = await ra.read(off, n, len(data), generation)
        if got is None:  # not served by read-ahead: the caller reads directly
            got = memoryview(data[off : off + n])
        out.append(bytes(got))
    return out


def _make(data: bytes, block: int, ahead: int, pool: BufferPool) -> tuple[ReadAhead, list[int]]:
    fetched: list[int] = []

    async def fetch(start: int, out: memoryview) -> None:
        await asyncio.sleep(0)
        fetched.append(start)
        out[:] = data[start : start + len(out)]

    return ReadAhead(pool, block, ahead, fetch), fetched


async def test_sequential_reads_fetch_blocks_ahead() -> None:
    data = _content(10 * MiB + 123)
    pool = BufferPool(64 * MiB, 32 * MiB)
    ra, fetched = _make(data, 2 * MiB, 4 * MiB, pool)
    reqs = [(off, MiB) for off in range(0, len(data), MiB)]
    got = await _read_all(ra, data, reqs)
    assert b"".join(got) == data
    assert sorted(set(fetched)) == list(range(0, len(data), 2 * MiB))  # each block once
    ra.close()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert pool.in_use_bytes == 0  # every block given back


async def test_old_generation_blocks_are_not_used() -> None:
    data = bytearray(_content(4 * MiB))
    pool = BufferPool(64 * MiB, 32 * MiB)
    ra, _ = _make(bytes(data), MiB, 2 * MiB, pool)
    assert bytes(await ra.read(0, 4096, len(data), 0) or b"") == data[:4096]
    data[5000:5010] = b"X" * 10  # "written through the mount"

    async def fetch(start: int, out: memoryview) -> None:
        out[:] = data[start : start + len(out)]

    ra._fetch = fetch
    got = await ra.read(4096, 8192, len(data), 1)
    assert got is not None and bytes(got) == bytes(data[4096 : 4096 + 8192])
    ra.close()


async def test_budget_exhausted_falls_back_to_direct_reads() -> None:
    data = _content(8 * MiB)
    pool = BufferPool(MiB, 0)  # room for one 1 MiB block only
    ra, _ = _make(data, MiB, 4 * MiB, pool)
    got = await _read_all(ra, data, [(off, MiB) for off in range(0, len(data), MiB)])
    assert b"".join(got) == data


async def test_failed_fetch_is_raised_then_retried() -> None:
    data = _content(3 * MiB)
    pool = BufferPool(64 * MiB, 0)
    calls = {"n": 0}

    async def fetch(start: int, out: memoryview) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "storage unreachable")
        out[:] = data[start : start + len(out)]

    ra = ReadAhead(pool, MiB, MiB, fetch)
    with pytest.raises(OSError):
        await ra.read(0, 4096, len(data), 0)
    got = await ra.read(0, 4096, len(data), 0)
    assert got is not None and bytes(got) == data[:4096]
    ra.close()


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 5 * MiB),
    block_kib=st.sampled_from([64, 256, 1024]),
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 5 * MiB), st.integers(1, 2 * MiB)),
        min_size=1,
        max_size=40,
    ),
)
def test_any_access_pattern_reads_the_right_bytes(
    size: int, block_kib: int, ops: list[tuple[bool, int, int]]
) -> None:
    data = _content(size)

    async def go() -> None:
        pool = BufferPool(16 * MiB, 8 * MiB)
        ra, _ = _make(data, block_kib * 1024, 4 * block_kib * 1024, pool)
        pos = 0
        reqs = []
        for sequential, off, n in ops:
            at = pos if sequential else off % size
            reqs.append((at, n))
            pos = min(at + n, size - 1)
        # concurrently, as the kernel's read-ahead requests arrive
        results = await asyncio.gather(*(ra.read(o, n, size, 0) for o, n in reqs))
        for (o, n), got in zip(reqs, results, strict=True):
            if got is not None:
                assert bytes(got) == data[o : o + n], (o, n)
        ra.close()
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(go())


async def test_random_small_reads_in_a_small_file_fetch_no_blocks() -> None:
    """Random 4 KiB reads all land near each other in a 64 MiB file; they touch
    no recent request, so no 4 MiB block is fetched for them (fio randread)."""
    data = _content(64 * MiB)
    pool = BufferPool(64 * MiB, 16 * MiB)
    ra, fetched = _make(data, 4 * MiB, 16 * MiB, pool)
    rng = random.Random(5)
    reqs = [(rng.randrange(len(data) // 4096) * 4096, 4096) for _ in range(500)]
    got = await _read_all(ra, data, reqs)
    assert got == [data[o : o + n] for o, n in reqs]
    assert len(fetched) <= 2 * 5, fetched  # at most a stray hit's worth (off 0 starts one)
    ra.close()
    for _ in range(3):
        await asyncio.sleep(0)
    assert pool.in_use_bytes == 0


async def test_kernel_out_of_order_requests_stay_sequential() -> None:
    """The kernel's read-ahead sends a window of requests at once, in any order:
    they are still served from read-ahead blocks, and every buffer comes back."""
    data = _content(40 * MiB)
    pool = BufferPool(64 * MiB, 16 * MiB)
    ra, fetched = _make(data, 4 * MiB, 16 * MiB, pool)
    rng = random.Random(3)
    served = 0
    for window_start in range(0, len(data), 8 * MiB):
        window = [(off, MiB) for off in range(window_start, window_start + 8 * MiB, MiB)]
        rng.shuffle(window)
        results = await asyncio.gather(*(ra.read(o, n, len(data), 0) for o, n in window))
        for (o, n), got in zip(window, results, strict=True):
            if got is not None:
                served += 1
                assert bytes(got) == data[o : o + n]
    assert served >= 36, (served, dict(ra.misses))  # of 40 requests
    assert len(fetched) == len(set(fetched))  # no block fetched twice
    ra.close()
    for _ in range(4):
        await asyncio.sleep(0)
    assert pool.in_use_bytes == 0


def test_cache_settings_default_to_the_documented_bounds() -> None:
    cfg = MountConfig()
    # A name created elsewhere is seen at once unless absent names are cached on request.
    assert cfg.negative_timeout_ms == 0
    apply_options(cfg, "readdir_cache_entries=0,negative_timeout_ms=1000")
    cfg.validate()  # 0 turns each cache off
    cfg.readdir_cache_entries = -1
    with pytest.raises(ValueError, match="readdir_cache_entries"):
        cfg.validate()


def _dir(ino: int, nlink: int = 2, mtime_ns: int = 0) -> mt.Inode:
    return mt.Inode(ino=ino, type=mt.DIRECTORY, nlink=nlink, mtime_ns=mtime_ns)


def test_dir_attrs_keep_a_change_reply_until_the_attribute_timeout() -> None:
    now = [100.0]
    cache = DirAttrCache(ttl_s=1.0, max_entries=8, clock=lambda: now[0])
    change = cache.begin([5])
    now[0] += 0.25  # the reply arrives; validity counts from when the change was sent
    cache.end(change, [_dir(5, nlink=3)])
    got = cache.get(5)
    assert got is not None and got[0].nlink == 3 and got[1] == pytest.approx(0.75)
    now[0] += 0.75
    assert cache.get(5) is None  # another client's change shows after the timeout
    cache.end(cache.begin([6]), [mt.Inode(ino=6, type=mt.FILE)])
    assert cache.get(6) is None  # only directories


def test_dir_attrs_never_hide_a_change_of_this_mount() -> None:
    cache = DirAttrCache(ttl_s=60.0, max_entries=8)
    cache.learn(_dir(5, nlink=2), cache.stamp())
    assert cache.get(5) is not None
    # A change starts: the old attributes go at once, even before its reply.
    first = cache.begin([5])
    assert cache.get(5) is None
    # A Stat sent while it runs may have read the directory before it: not kept.
    stamp = cache.stamp()
    cache.learn(_dir(5, nlink=2), stamp)
    assert cache.get(5) is None
    # Two changes of one directory overlap: their order at meta is unknown, so
    # neither reply is kept, and a Stat sent meanwhile is not either.
    second = cache.begin([5])
    cache.end(second, [_dir(5, nlink=4)])
    cache.learn(_dir(5, nlink=4), stamp)
    assert cache.get(5) is None
    cache.end(first, [_dir(5, nlink=3)])
    assert cache.get(5) is None
    # Alone again: the reply of the next change is kept.
    cache.end(cache.begin([5]), [_dir(5, nlink=5)])
    got = cache.get(5)
    assert got is not None and got[0].nlink == 5
    # A failed change (no reply) leaves nothing behind.
    cache.end(cache.begin([5]))
    assert cache.get(5) is None
    # A Stat answered with no change in between is kept.
    stamp = cache.stamp()
    cache.learn(_dir(5, nlink=6), stamp)
    got = cache.get(5)
    assert got is not None and got[0].nlink == 6


def test_dir_attrs_are_bounded() -> None:
    cache = DirAttrCache(ttl_s=60.0, max_entries=3)
    for ino in range(10, 20):
        cache.learn(_dir(ino), cache.stamp())
    assert len(cache) == 3 and cache.get(19) is not None and cache.get(10) is None


def test_file_attrs_forget_a_file_changed_without_begin() -> None:
    cache = DirAttrCache(ttl_s=60.0, max_entries=8, kinds=frozenset({mt.FILE}))
    cache.end(cache.begin([7]), [_dir(8)])
    assert cache.get(8) is None  # only files
    stamp = cache.stamp()
    cache.end(cache.begin([7]), [mt.Inode(ino=7, type=mt.FILE, size=10)])
    assert cache.get(7) is not None
    # An open that turned out to truncate an existing file: nothing kept from
    # before, no Stat sent before it, and no reply of a change that overlapped it.
    running = cache.begin([7])
    cache.forget(7)
    assert cache.get(7) is None
    cache.learn(mt.Inode(ino=7, type=mt.FILE, size=10), stamp)
    cache.end(running, [mt.Inode(ino=7, type=mt.FILE, size=10)])
    assert cache.get(7) is None
    # An unlink (which file: unknown) keeps nothing, nor any Stat sent before it.
    cache.end(cache.begin([9]), [mt.Inode(ino=9, type=mt.FILE)])
    stamp = cache.stamp()
    cache.forget_all()
    cache.learn(mt.Inode(ino=9, type=mt.FILE), stamp)
    assert cache.get(9) is None and len(cache) == 0
