"""Client pieces without a cluster: mode strings, layout arithmetic, the byte budget."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainfs.client.budget import ByteBudget
from chainfs.client.file import Mode
from chainfs.client.layout import Layout, split


def test_modes() -> None:
    assert Mode.parse("rb") == Mode(True, False, False, False, False, False, True)
    w = Mode.parse("w")
    assert w.writable and w.create and w.truncate and not w.readable and not w.binary
    a = Mode.parse("a+b")
    assert a.readable and a.writable and a.append and a.create and not a.truncate
    x = Mode.parse("xb")
    assert x.exclusive and x.create
    assert Mode.parse("r+b").binary_mode() == "rb+"
    assert Mode.parse("w+").binary_mode() == "wb+"
    for bad in ("", "rw", "rr", "q", "rbt", "b", "+"):
        with pytest.raises(ValueError):
            Mode.parse(bad)


@given(
    chunk=st.sampled_from([64 * 1024, 1 << 20, 4 << 20]),
    stripe=st.integers(1, 5),
    offset=st.integers(0, 50 << 20),
    length=st.integers(0, 20 << 20),
)
def test_split_covers_the_range_in_chunk_pieces(
    chunk: int, stripe: int, offset: int, length: int
) -> None:
    layout = Layout(chunk, tuple(range(10, 10 + stripe)))
    pieces = split(layout, offset, length)
    assert sum(p.length for p in pieces) == length
    pos = offset
    for p in pieces:
        assert p.buf_offset == pos - offset
        assert p.chunk_index * chunk + p.chunk_offset == pos
        assert p.length > 0 and p.chunk_offset + p.length <= chunk
        assert p.chain_id == layout.chains[p.chunk_index % stripe]
        pos += p.length


def test_budget_bounds_and_fifo() -> None:
    async def main() -> None:
        b = ByteBudget(100)
        await b.acquire(60)
        order: list[int] = []

        async def take(n: int) -> None:
            await b.acquire(n)
            order.append(n)

        t1 = asyncio.ensure_future(take(50))
        t2 = asyncio.ensure_future(take(10))  # fits, but waits behind the first (FIFO)
        await asyncio.sleep(0.01)
        assert order == [] and b.held_bytes == 60
        b.release(60)
        await asyncio.gather(t1, t2)
        assert order == [50, 10] and b.held_bytes == 60
        b.release(60)
        await b.acquire(500)  # larger than the budget: granted when nothing is held
        assert b.peak_bytes == 500
        b.release(500)
        # A waiter cancelled while waiting leaves no trace.
        await b.acquire(100)
        t3 = asyncio.ensure_future(b.acquire(1))
        await asyncio.sleep(0.01)
        t3.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t3
        b.release(100)
        assert b.held_bytes == 0

    asyncio.run(main())
