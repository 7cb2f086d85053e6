"""Client pieces without a cluster: mode strings, layout arithmetic, the byte budget."""

from __future__ import annotations

import asyncio
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainfs.client.budget import ByteBudget
from chainfs.client.chunk_io import OpenHandle
from chainfs.client.config import ClientConfig
from chainfs.client.file import AsyncFile, Mode
from chainfs.client.layout import Layout, normpath, split


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


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/", "/"), ("//", "/"), ("/a/", "/a"), ("/a//b///", "/a/b"), (b"/x/y", "/x/y")],
)
def test_normpath_canonical_form(path: str, expected: str) -> None:
    assert normpath(path) == expected


def test_normpath_refuses_empty_and_relative_paths() -> None:
    with pytest.raises(FileNotFoundError) as e:
        normpath("")  # as os.stat("")
    assert e.value.errno == errno.ENOENT
    for rel in ("a", "a/b", "./a", "../a", "."):
        with pytest.raises(OSError) as e:
            normpath(rel)
        assert e.value.errno == errno.EINVAL and "absolute" in str(e.value)
    with pytest.raises(ValueError):
        normpath("/a\x00b")


class _NoIO:
    """The file's engine; a write refused up front must never reach it."""

    config = ClientConfig()

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the refused write used the engine ({name})")


@pytest.mark.parametrize("offset", [2**62, 2**64 + 5, (4 << 20) * (1 << 32)])
def test_write_past_the_layouts_largest_file_is_efbig(offset: int) -> None:
    layout = Layout(chunk_size=4 << 20, chains=(1,))
    assert layout.max_file_bytes == (4 << 20) * (1 << 32)  # the chunk index is a uint32

    async def go() -> None:
        f = AsyncFile(_NoIO(), OpenHandle("/f", 7, layout, 0), Mode.parse("wb"))  # type: ignore[arg-type]
        await f.seek(offset - 1)
        assert f.try_write_buffered(b"ab") is None  # the fast path leaves it to write()
        with pytest.raises(OSError) as e:
            await f.write(b"ab")
        assert e.value.errno == errno.EFBIG
        with pytest.raises(OSError) as e:
            await f.truncate(offset + 1)
        assert e.value.errno == errno.EFBIG
        assert f.size() == 0 and f.tell() == offset - 1

    asyncio.run(go())
