"""RocksDB backend specifics: durability across SIGKILL, the directory lock,
group commit, and the bounded conflict log."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import chainfs.kv as kv
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.kv.rocksdb import RocksDBStore

pytestmark = pytest.mark.timeout(60)

# Eight concurrent writers; each prints "w i" only after transact() returned.
CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import chainfs.kv as kv

    async def main(url):
        store = kv.open(url)

        async def worker(w):
            i = 0
            while True:
                async def fn(tx):
                    n = int(await tx.get(b"count/%d" % w) or b"0")
                    tx.set(b"count/%d" % w, b"%d" % (n + 1))
                    tx.set(b"item/%d/%06d" % (w, i), b"x" * 200)
                await store.transact(fn)
                sys.stdout.write(f"{w} {i}\\n")
                sys.stdout.flush()
                i += 1

        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(main(sys.argv[1]))
    """
)

OPEN_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import chainfs.kv as kv
    from chainfs.common.errors import ChainfsError
    try:
        store = kv.open(sys.argv[1])
    except ChainfsError as e:
        print("ERR", e.code, e.message)
        sys.exit(3)
    print("OPEN", asyncio.run(store.get(b"owner")).decode())
    asyncio.run(store.close())
    """
)


def _child(script: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,  # type: ignore[call-overload]
    )


def test_sigkill_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    url = f"rocksdb://{tmp_path}/db"
    proc = _child(CRASH_CHILD, url)
    acked: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while len(acked) < 600:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"child exited early: {proc.wait()} {proc.stderr.read()}")  # type: ignore[union-attr]
            w, i = line.split()
            acked.append((int(w), int(i)))
            assert time.monotonic() < deadline, "child too slow to commit"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    for line in rest.splitlines():  # acknowledged before the kill landed
        w, i = line.split()
        acked.append((int(w), int(i)))

    store = RocksDBStore.from_url(url)

    async def check() -> None:
        items = await store.transact(lambda tx: tx.get_range(b"item/", b"item0"), read_only=True)
        have = {(int(k.split(b"/")[1]), int(k.split(b"/")[2])) for k, _ in items}
        missing = [a for a in acked if a not in have]
        assert not missing, f"{len(missing)} acknowledged commits lost, e.g. {missing[:5]}"
        for w in range(8):
            mine = sorted(i for ww, i in have if ww == w)
            assert mine == list(range(len(mine)))  # each writer commits in order
            count = int(await store.get(b"count/%d" % w) or b"0")
            assert count == len(mine)  # both writes of every txn, or neither
        await store.close()

    asyncio.run(check())


# Four durable and four non-durable writers; each durable one prints "w i" after
# transact() returned (a non-durable commit may be lost, a durable one never).
MIXED_CRASH_CHILD = CRASH_CHILD.replace(
    "await store.transact(fn)", "await store.transact(fn, durable=w < 4)"
).replace("sys.stdout.write(", "w < 4 and sys.stdout.write(")


def test_sigkill_loses_no_durable_commit_among_non_durable_ones(tmp_path: Path) -> None:
    url = f"rocksdb://{tmp_path}/db"
    proc = _child(MIXED_CRASH_CHILD, url)
    acked: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while len(acked) < 300:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"child exited early: {proc.wait()} {proc.stderr.read()}")  # type: ignore[union-attr]
            w, i = line.split()
            acked.append((int(w), int(i)))
            assert time.monotonic() < deadline, "child too slow to commit"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    for line in rest.splitlines():
        w, i = line.split()
        acked.append((int(w), int(i)))
    store = RocksDBStore.from_url(url)

    async def check() -> None:
        items = await store.transact(lambda tx: tx.get_range(b"item/", b"item0"), read_only=True)
        have = {(int(k.split(b"/")[1]), int(k.split(b"/")[2])) for k, _ in items}
        missing = [a for a in acked if a not in have]
        assert not missing, f"{len(missing)} acknowledged durable commits lost, e.g. {missing[:5]}"
        for w in range(8):  # whatever survived, each transaction whole, in order
            mine = sorted(i for ww, i in have if ww == w)
            assert mine == list(range(len(mine)))
            assert int(await store.get(b"count/%d" % w) or b"0") == len(mine)
        await store.close()

    asyncio.run(check())


async def test_a_non_durable_commit_is_visible_at_once_and_skips_the_sync(tmp_path: Path) -> None:
    store = RocksDBStore.from_url(f"rocksdb://{tmp_path}/db")

    async def put(key: bytes, durable: bool) -> None:
        async def fn(tx: Transaction) -> None:
            tx.set(key, b"v")

        await store.transact(fn, durable=durable)

    await put(b"a", durable=False)
    assert store.stats["unsynced_batches"] == 1
    assert await store.get(b"a") == b"v"  # serialized and visible like any commit
    await put(b"b", durable=True)
    assert store.stats["unsynced_batches"] == 1  # a durable commit always syncs
    # Together in one batch, the durable one decides: the batch syncs.
    await asyncio.gather(put(b"c", durable=False), put(b"d", durable=True))
    assert store.stats["batches"] == 3 and store.stats["unsynced_batches"] == 1
    await store.close()


async def test_second_process_gets_store_locked(tmp_path: Path) -> None:
    url = f"rocksdb://{tmp_path}/db"
    store = kv.open(url)
    await store.set(b"owner", b"first")
    proc = _child(OPEN_CHILD, url)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, (out, err)
    assert f"ERR {int(Code.STORE_LOCKED)} " in out
    assert "in use by another process" in out
    await store.close()
    proc = _child(OPEN_CHILD, url)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out.strip()) == (0, "OPEN first"), err


async def test_same_process_second_open_and_use_after_close(tmp_path: Path) -> None:
    store = kv.open(f"rocksdb://{tmp_path}/db")
    with pytest.raises(ChainfsError) as e:
        kv.open(f"rocksdb://{tmp_path}/db")
    assert e.value.code == Code.STORE_LOCKED
    await store.set(b"k", b"v")
    await store.close()
    with pytest.raises(ChainfsError) as e:
        await store.get(b"k")
    assert e.value.errno == errno.EBADF
    reopened = kv.open(f"rocksdb://{tmp_path}/db")
    assert await reopened.get(b"k") == b"v"
    await reopened.close()


async def test_group_commit_batches_concurrent_writers(tmp_path: Path) -> None:
    store = RocksDBStore.from_url(f"rocksdb://{tmp_path}/db")

    async def one(i: int) -> None:
        async def fn(tx: Transaction) -> None:
            tx.set(b"g/%d" % i, b"v")

        await store.transact(fn)

    await asyncio.gather(*(one(i) for i in range(64)))
    assert store.stats["batched_txns"] == 64
    assert store.stats["batches"] < 64  # several commits shared one synced WriteBatch
    rows = await store.transact(lambda tx: tx.get_range(b"g/", b"g0"), read_only=True)
    assert len(rows) == 64
    await store.close()


async def test_snapshot_older_than_conflict_log_is_retried(tmp_path: Path) -> None:
    store = kv.open(f"rocksdb://{tmp_path}/db?conflict_log_entries=2")
    calls = [0]

    async def slow(tx: Transaction) -> None:
        calls[0] += 1
        await tx.get(b"a")
        if calls[0] == 1:
            for i in range(10):  # push the snapshot out of the conflict log
                await store.set(b"other%d" % i, b"x")
        tx.set(b"a", b"done")

    await store.transact(slow)
    assert calls[0] == 2
    assert await store.get(b"a") == b"done"
    await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "rocksdb://relative/dir",
        "rocksdb://host/dir",
        "rocksdb:///tmp/x?no_such_option=1",
        "rocksdb:///tmp/x?max_batch_txns=zero",
        "rocksdb:///tmp/x?max_batch_txns=0",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ChainfsError) as e:
        kv.open(url)
    assert e.value.code in (Code.EINVAL, Code.CONFIG_ERROR)


async def test_reads_keep_the_snapshot_while_commits_land_in_the_range(tmp_path: Path) -> None:
    """Point reads use a RocksDB snapshot and range reads a fresh bounded
    iterator; a range that a later commit touched is read from the view taken
    with the snapshot, so one transaction never mixes two states."""
    store = RocksDBStore.from_url(f"rocksdb://{tmp_path}/db")
    for k in (b"r/1", b"r/3", b"s/1"):
        await store.set(k, b"old")
    seen: dict[str, object] = {}

    async def reader(tx: Transaction) -> None:
        seen["before"] = await tx.get_range(b"r/", b"r0")
        await store.set(b"r/2", b"new")  # commits after this snapshot, inside the range
        await store.set(b"r/3", b"new")
        await store.set(b"t/1", b"new")  # outside every range read below
        seen["forward"] = await tx.get_range(b"r/", b"r0")
        seen["reverse"] = await tx.get_range(b"r/", b"r0", reverse=True)
        seen["limit"] = await tx.get_range(b"r/", b"r0", limit=1)
        seen["point"] = (await tx.get(b"r/2"), await tx.get(b"r/3"), await tx.get(b"t/1"))
        seen["untouched"] = await tx.get_range(b"s/", b"s0")

    await store.transact(reader, read_only=True)
    old = [(b"r/1", b"old"), (b"r/3", b"old")]
    assert seen["before"] == old
    assert seen["forward"] == old
    assert seen["reverse"] == old[::-1]
    assert seen["limit"] == old[:1]
    assert seen["point"] == (None, b"old", None)
    assert seen["untouched"] == [(b"s/1", b"old")]
    rows = await store.transact(lambda tx: tx.get_range(b"r/", b"r0"), read_only=True)
    assert [v for _, v in rows] == [b"old", b"new", b"new"]
    await store.close()


async def test_reads_are_right_after_many_deletes(tmp_path: Path) -> None:
    """Deleted keys (tombstones) around a key change no answer: a missing key,
    a live neighbour, and a range holding one live key among deleted ones."""
    store = RocksDBStore.from_url(f"rocksdb://{tmp_path}/db")
    keys = [b"d/%06d" % i for i in range(0, 2000, 2)]

    async def put_all(tx: Transaction) -> None:
        for k in keys:
            tx.set(k, b"v")

    async def clear_all_but_one(tx: Transaction) -> None:
        for k in keys[:-1]:
            tx.clear(k)

    await store.transact(put_all)
    await store.transact(clear_all_but_one)

    async def reads(tx: Transaction) -> tuple[object, ...]:
        return (
            await tx.get(b"d/000000"),
            await tx.get(keys[-1]),
            await tx.get_range(b"d/", b"d0"),
            await tx.get_range(b"d/", b"d0", reverse=True),
            await tx.get_range(b"d/", keys[-1]),
        )

    got = await store.transact(reads, read_only=True)
    assert got == (None, b"v", [(keys[-1], b"v")], [(keys[-1], b"v")], [])
    await store.close()
