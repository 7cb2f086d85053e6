"""The stat coalescer, with meta replaced by functions the test controls."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from chainfs.client.config import ClientConfig
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import MetaClient
from chainfs.common.rpc.stat_coalescer import StatCoalescer
from chainfs.proto import meta_pb2 as pb

INODES = {f"/f{i}": i + 100 for i in range(200)}


class FakeMeta:
    """Stat and BatchStat of INODES; each call waits for ``gate`` when it is held."""

    def __init__(self) -> None:
        self.singles: list[tuple[Any, bool, Any]] = []
        self.batches: list[tuple[list[Any], bool, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_batch: Exception | None = None
        self.max_batch_stat = 4096  # meta's bound on paths per BatchStat

    def _answer(self, at: Any) -> pb.Inode | ChainfsError:
        if at not in INODES:
            return ChainfsError(Code.ENOENT, f"{at} not found")
        return pb.Inode(ino=INODES[at])

    async def one(self, at: Any, follow: bool, user: Any) -> pb.Inode:
        self.singles.append((at, follow, user))
        await self.gate.wait()
        r = self._answer(at)
        if isinstance(r, ChainfsError):
            raise r
        return r

    async def many(
        self, ats: Sequence[Any], follow: bool, user: Any
    ) -> list[pb.Inode | ChainfsError]:
        self.batches.append((list(ats), follow, user))
        await self.gate.wait()
        if self.fail_batch is not None:
            raise self.fail_batch
        if len(ats) > self.max_batch_stat:
            raise ChainfsError(Code.E2BIG, f"more than {self.max_batch_stat} inodes in one call")
        return [self._answer(at) for at in ats]


def _coalescer(meta: FakeMeta, max_batch: int = 64, max_waiting: int = 256) -> StatCoalescer:
    return StatCoalescer(meta.one, meta.many, 1, max_batch, max_waiting)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _one_in_flight(meta: FakeMeta, c: StatCoalescer) -> asyncio.Task[pb.Inode]:
    """A stat of /f0 sent and held at meta (until ``meta.gate`` is set)."""
    meta.gate.clear()
    first = asyncio.create_task(c.stat("/f0", True, "u"))
    await _settle()
    return first


async def _held_together(meta: FakeMeta, c: StatCoalescer, names: list[str]) -> list[Any]:
    """Stats of ``names`` queued behind one held in flight, then released
    together; what each caller got (an inode or its exception)."""
    first = await _one_in_flight(meta, c)
    tasks = [asyncio.create_task(c.stat(n, True, "u")) for n in names]
    await _settle()
    meta.gate.set()
    await first
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_lone_stat_goes_at_once_as_a_stat() -> None:
    meta = FakeMeta()
    c = _coalescer(meta)
    assert (await c.stat("/f1", True, "u")).ino == 101
    assert meta.singles == [("/f1", True, "u")] and meta.batches == []
    with pytest.raises(ChainfsError) as e:
        await c.stat("/missing", True, "u")
    assert e.value.code == Code.ENOENT


async def test_stats_behind_one_in_flight_go_together_and_each_gets_its_own_answer() -> None:
    meta = FakeMeta()
    c = _coalescer(meta)
    first = await _one_in_flight(meta, c)
    names = ["/f1", "/missing", "/f2", "/f3"]
    rest = [asyncio.create_task(c.stat(n, True, "u")) for n in names]
    await _settle()
    assert meta.batches == []  # waiting for the one in flight
    meta.gate.set()
    assert (await first).ino == 100
    got = await asyncio.gather(*rest, return_exceptions=True)
    assert meta.batches == [(names, True, "u")]
    assert [g.ino for g in got if isinstance(g, pb.Inode)] == [101, 102, 103]
    assert isinstance(got[1], ChainfsError) and got[1].code == Code.ENOENT
    assert (c.batches, c.batched) == (1, 4)
    # Nothing left in flight: the next lone stat goes at once again.
    await c.stat("/f9", True, "u")
    assert meta.singles[-1] == ("/f9", True, "u")


async def test_only_the_same_user_and_follow_share_a_call() -> None:
    meta = FakeMeta()
    c = _coalescer(meta)
    first = await _one_in_flight(meta, c)
    asks = [("/f1", True, "u"), ("/f2", True, "v"), ("/f3", False, "u"), ("/f4", True, "u")]
    tasks = [asyncio.create_task(c.stat(*a)) for a in asks]
    await _settle()
    meta.gate.set()
    await first
    got = await asyncio.gather(*tasks)
    assert [g.ino for g in got] == [101, 102, 103, 104]
    sent = {(tuple(a), f, u) for a, f, u in meta.batches}
    sent |= {((a,), f, u) for a, f, u in meta.singles[1:]}
    assert sent == {(("/f1", "/f4"), True, "u"), (("/f2",), True, "v"), (("/f3",), False, "u")}


async def test_a_batch_holds_at_most_max_batch_paths() -> None:
    meta = FakeMeta()
    c = _coalescer(meta, max_batch=3)
    first = await _one_in_flight(meta, c)
    tasks = [asyncio.create_task(c.stat(f"/f{i}", True, "u")) for i in range(1, 8)]
    await _settle()
    meta.gate.set()
    await first
    got = await asyncio.gather(*tasks)
    assert [g.ino for g in got] == [101 + i for i in range(7)]
    assert all(len(ats) <= 3 for ats, _, _ in meta.batches)
    assert sum(len(ats) for ats, _, _ in meta.batches) + len(meta.singles) == 8


async def test_a_call_that_fails_as_a_whole_fails_each_of_its_stats() -> None:
    meta = FakeMeta()
    c = _coalescer(meta)
    first = await _one_in_flight(meta, c)
    tasks = [asyncio.create_task(c.stat(f"/f{i}", True, "u")) for i in (1, 2)]
    await _settle()
    meta.fail_batch = ChainfsError(Code.UNAVAILABLE, "meta unreachable")
    meta.gate.set()
    await first
    got = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(g, ChainfsError) and g.code == Code.UNAVAILABLE for g in got)
    assert got[0] is not got[1]


class _Refused(ChainfsError):
    pass


@pytest.mark.parametrize(
    "error",
    [_Refused(Code.EACCES, "no", "/f1"), RuntimeError("a bug in the reply's parse")],
    ids=["chainfs-subclass-with-path", "not-a-chainfs-error"],
)
async def test_each_caller_of_a_failed_batch_raises_its_own_copy_of_the_error(
    error: Exception,
) -> None:
    meta = FakeMeta()
    meta.fail_batch = error
    got = await _held_together(meta, _coalescer(meta), ["/f1", "/f2"])
    assert got[0] is not got[1] and got[0] is not error
    for g in got:
        assert type(g) is type(error) and g.args == error.args
        if isinstance(error, ChainfsError):
            assert isinstance(g, ChainfsError)
            assert (g.code, g.message, g.filename) == (error.code, error.message, "/f1")


async def test_a_batch_larger_than_meta_takes_answers_each_stat_as_alone() -> None:
    """Meta configured with a smaller max_batch_stat refuses the whole call
    (E2BIG): no caller's own Stat would have failed, so each goes alone."""
    meta = FakeMeta()
    meta.max_batch_stat = 2
    c = _coalescer(meta)
    names = ["/f1", "/missing", "/f2", "/f3"]
    want = [101, Code.ENOENT, 102, 103]
    got = await _held_together(meta, c, names)
    assert [g.ino if isinstance(g, pb.Inode) else g.code for g in got] == want
    # Later batches fit what meta takes.
    n_batches = len(meta.batches)
    got = await _held_together(meta, c, names)
    assert [g.ino if isinstance(g, pb.Inode) else g.code for g in got] == want
    assert meta.batches[n_batches:] and all(len(ats) <= 2 for ats, _, _ in meta.batches[n_batches:])


async def test_a_cancelled_caller_leaves_the_others_answered() -> None:
    meta = FakeMeta()
    c = _coalescer(meta)
    first = await _one_in_flight(meta, c)
    gone = asyncio.create_task(c.stat("/f1", True, "u"))
    kept = asyncio.create_task(c.stat("/f2", True, "u"))
    await _settle()
    gone.cancel()
    await _settle()
    meta.gate.set()
    await first
    assert (await kept).ino == 102
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert meta.singles[-1][0] == "/f2" or meta.batches[-1][0] == ["/f2"]
    await c.stat("/f3", True, "u")  # nothing stuck in flight
    assert meta.singles[-1][0] == "/f3"


async def test_past_max_waiting_a_stat_goes_alone() -> None:
    meta = FakeMeta()
    c = _coalescer(meta, max_waiting=2)
    meta.gate.clear()
    tasks = [asyncio.create_task(c.stat(f"/f{i}", True, "u")) for i in range(5)]
    await _settle()
    # One in flight, two waiting, the other two sent alone at once.
    assert len(meta.singles) == 3 and meta.batches == []
    meta.gate.set()
    assert [g.ino for g in await asyncio.gather(*tasks)] == [100 + i for i in range(5)]


async def test_close_cancels_what_waits_and_what_is_in_flight() -> None:
    meta = FakeMeta()
    c = _coalescer(meta)
    first = await _one_in_flight(meta, c)
    waiting = asyncio.create_task(c.stat("/f1", True, "u"))
    await _settle()
    await c.close()
    first.cancel()
    for t in (first, waiting):
        with pytest.raises(asyncio.CancelledError):
            await t


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("meta_stat_coalesce_inflight", -1),
        ("meta_stat_coalesce_inflight", 1025),
        ("meta_stat_batch_max", 0),
        ("meta_stat_batch_max", 4097),
    ],
)
def test_out_of_range_settings_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        ClientConfig(**{field: value}).validate()


def test_meta_client_refuses_a_batch_of_nothing() -> None:
    with pytest.raises(ChainfsError) as e:
        MetaClient("127.0.0.1:1", stat_coalesce_inflight=1, stat_batch_max=0)
    assert e.value.code == Code.EINVAL
    assert MetaClient("127.0.0.1:1").stat_coalescer is None  # off unless asked for
