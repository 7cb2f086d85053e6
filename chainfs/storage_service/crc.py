"""CRC32C helpers on top of google-crc32c (C code for every byte).

``combine(crc_a, crc_b, len_b)`` gives CRC32C(A || B) from the CRCs alone, so
an append extends a chunk's stored checksum without a second pass over the
payload that was already checksummed on receipt. Extending a CRC by n zero
bytes is an affine map on the 32-bit value: E_n(c) = M^n c ^ K_n. We keep
M^(2^k) as 32 column vectors and K_(2^k) for every k, so E_n costs one
32-step matrix-vector product per set bit of n (a few microseconds).
"""

from __future__ import annotations

import struct

from chainfs.common.checksum import Buffer, crc32c, crc32c_extend

MAX_LOG2 = 40  # supports lengths below 2**40 bytes

# _COLS[k][i] = M^(2^k) applied to the unit vector 1 << i.
_COLS: list[list[int]] = []
# _ZEROS[k] = CRC32C of 2^k zero bytes.
_ZEROS: list[int] = []


def value(data: Buffer) -> int:
    """CRC32C of ``data`` (C code, no copy)."""
    return crc32c(data)


def extend(crc: int, data: Buffer) -> int:
    """CRC32C of (the data whose CRC is ``crc``) followed by ``data``."""
    return crc32c_extend(crc, data)


def _apply(cols: list[int], c: int) -> int:
    out = 0
    i = 0
    while c:
        if c & 1:
            out ^= cols[i]
        c >>= 1
        i += 1
    return out


def _init() -> None:
    base_zero = extend(0, b"\0")
    cols = [extend(1 << i, b"\0") ^ base_zero for i in range(32)]
    zeros = base_zero  # CRC of one zero byte
    for _ in range(MAX_LOG2):
        _COLS.append(cols)
        _ZEROS.append(zeros)
        # E_{2n}(c) = E_n(E_n(c)): square the linear part, fold the constants.
        zeros = _apply(cols, zeros) ^ zeros
        cols = [_apply(cols, col) for col in cols]


_init()


# _TABLES[k]: M^(2^k) as four 256-entry byte tables, built on first use.
_TABLES: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}


def _tables(k: int) -> tuple[list[int], list[int], list[int], list[int]]:
    t = _TABLES.get(k)
    if t is None:
        cols = _COLS[k]
        built = []
        for j in range(4):
            tab = [0] * 256
            for b in range(1, 256):
                low = b & -b
                tab[b] = tab[b ^ low] ^ cols[8 * j + low.bit_length() - 1]
            built.append(tab)
        t = (built[0], built[1], built[2], built[3])
        _TABLES[k] = t
    return t


def extend_zeros(crc: int, n: int) -> int:
    """CRC32C of (the data whose CRC is ``crc``) followed by ``n`` zero bytes."""
    assert 0 <= n < (1 << MAX_LOG2)
    k = 0
    while n:
        if n & 1:
            t0, t1, t2, t3 = _tables(k)
            crc = (
                t0[crc & 0xFF]
                ^ t1[(crc >> 8) & 0xFF]
                ^ t2[(crc >> 16) & 0xFF]
                ^ t3[crc >> 24]
                ^ _ZEROS[k]
            )
        n >>= 1
        k += 1
    return crc


def zeros(n: int) -> int:
    """CRC32C of ``n`` zero bytes."""
    return extend_zeros(0, n)


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC32C(A || B) from CRC32C(A), CRC32C(B) and len(B)."""
    return extend_zeros(crc_a, len_b) ^ crc_b ^ zeros(len_b)


# Per-block CRCs are stored as little-endian u32s, one per block of a chunk.
_U32 = struct.Struct("<I")


def block_crcs(data: Buffer, block_size: int) -> bytes:
    """CRC32C of every ``block_size`` block of ``data`` (the last may be short), packed."""
    assert block_size > 0
    view = data if isinstance(data, memoryview) else memoryview(data)
    n = len(view)
    return struct.pack(
        f"<{-(-n // block_size)}I",
        *(value(view[i : i + block_size]) for i in range(0, n, block_size)),
    )


def block_crc(crcs: bytes, block: int) -> int:
    """The CRC of block ``block`` from a packed list."""
    return int(_U32.unpack_from(crcs, 4 * block)[0])


def pack_crc(c: int) -> bytes:
    return _U32.pack(c)


def combine_blocks(crcs: bytes, block_size: int, length: int) -> int:
    """CRC32C of a whole chunk of ``length`` bytes from the packed CRCs of its blocks."""
    assert len(crcs) == 4 * -(-length // block_size), (len(crcs), block_size, length)
    full = length // block_size
    total = 0
    if block_size & (block_size - 1) == 0:
        # Full blocks: E_bs(total) ^ c ^ zeros(bs), with E_bs one table step (power of 2).
        t0, t1, t2, t3 = _tables(block_size.bit_length() - 1)
        k = _ZEROS[block_size.bit_length() - 1] ^ zeros(block_size)
        for (c,) in _U32.iter_unpack(crcs[: 4 * full]):
            total = (
                t0[total & 0xFF]
                ^ t1[(total >> 8) & 0xFF]
                ^ t2[(total >> 16) & 0xFF]
                ^ t3[total >> 24]
                ^ k
                ^ c
            )
    else:
        for (c,) in _U32.iter_unpack(crcs[: 4 * full]):
            total = combine(total, c, block_size)
    if length > full * block_size:
        total = combine(total, block_crc(crcs, full), length - full * block_size)
    return total
