"""Frame codec and buffer pool, checked as properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainfs.common.dataplane import BufferPool, PooledBuffer
from chainfs.common.dataplane.buffers import size_class
from chainfs.common.dataplane.frame import (
    FIXED_HEADER_SIZE,
    FLAG_ERROR,
    FLAG_RESPONSE,
    decode_fixed,
    encode_fixed,
)
from chainfs.common.errors import ChainfsError, Code

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
flags = st.sampled_from([0, FLAG_RESPONSE, FLAG_RESPONSE | FLAG_ERROR])


@given(flags, u16, u64, u32, u32, u64)
def test_fixed_header_round_trips(
    fl: int, mt: int, rid: int, hl: int, status: int, pl: int
) -> None:
    raw = encode_fixed(fl, mt, rid, hl, status, pl)
    assert len(raw) == FIXED_HEADER_SIZE
    hdr = decode_fixed(b"xx" + raw, 2, 2**32 - 1, 2**64 - 1)
    assert (hdr.flags, hdr.msg_type, hdr.request_id, hdr.header_len, hdr.status) == (
        fl,
        mt,
        rid,
        hl,
        status,
    )
    assert hdr.payload_len == pl


@given(flags, u16, u64, u32, u64, st.integers(0, FIXED_HEADER_SIZE * 8 - 1))
def test_any_single_bit_flip_is_rejected(
    fl: int, mt: int, rid: int, hl: int, pl: int, bit: int
) -> None:
    raw = bytearray(encode_fixed(fl, mt, rid, hl, 0, pl))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ChainfsError) as ei:
        decode_fixed(raw, 0, 2**32 - 1, 2**64 - 1)
    assert ei.value.code == Code.BAD_FRAME


@given(u32, u64)
def test_lengths_over_the_bounds_are_rejected(hl: int, pl: int) -> None:
    raw = encode_fixed(0, 1, 1, hl, 0, pl)
    max_h, max_p = 1000, 5000
    if hl <= max_h and pl <= max_p:
        decode_fixed(raw, 0, max_h, max_p)
    else:
        with pytest.raises(ChainfsError) as ei:
            decode_fixed(raw, 0, max_h, max_p)
        assert ei.value.code == Code.BAD_FRAME
        assert "bound" in ei.value.message


def test_encode_refuses_fields_outside_the_wire_format() -> None:
    with pytest.raises(ValueError):
        encode_fixed(0, 2**16, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        encode_fixed(0x80, 1, 1, 0, 0, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(1, 300_000)),  # (acquire?, size)
        min_size=1,
        max_size=60,
    )
)
def test_pool_never_exceeds_its_bound_and_serves_waiters_in_order(
    ops: list[tuple[bool, int]],
) -> None:
    capacity = 1 << 20
    pool = BufferPool(capacity, capacity // 2)
    held: list[PooledBuffer] = []
    served: list[int] = []
    waiting: list[int] = []
    for i, (acquire, size) in enumerate(ops):
        if acquire or not held:
            buf = pool.try_acquire(size)
            if buf is None:
                waiting.append(i)

                def deliver(b: PooledBuffer, i: int = i) -> None:
                    served.append(i)
                    held.append(b)

                pool.when_available(size, deliver)
            else:
                assert len(buf.view) == size
                assert buf.capacity == size_class(size)
                held.append(buf)
        else:
            held.pop(0).release()
        assert pool.in_use_bytes + pool.cached_bytes <= capacity
        assert pool.cached_bytes <= capacity // 2
    while held:
        held.pop(0).release()
    assert served == waiting  # every waiter served, first come first served
    assert pool.in_use_bytes == 0
    pool.clear()
    assert pool.cached_bytes == 0


def test_pooled_buffers_are_reused_not_remapped() -> None:
    pool = BufferPool(64 << 20, 64 << 20)
    for _ in range(10):
        a = pool.try_acquire(3 << 20)
        b = pool.try_acquire(100)
        assert a is not None and b is not None
        a.view[:5] = b"hello"
        a.release()
        b.release()
        a.release()  # idempotent
    assert pool.mapped_total == 2
    assert pool.in_use_bytes == 0
