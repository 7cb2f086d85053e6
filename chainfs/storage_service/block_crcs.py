"""Per-block CRC32Cs of a chunk: computed once per write, checked per read.

A chunk's record keeps one CRC32C per ``block_size`` bytes (the last block
short), so a partial read verifies only the blocks it touches and a partial
write recomputes only the blocks it changes. These functions are pure: the
committed bytes a computation needs (the first and last block around a write)
come from the caller's ``old_block(b)``, which reads and verifies block ``b``.
"""

from __future__ import annotations

from collections.abc import Callable

from chainfs.storage_service import crc
from chainfs.storage_service.chunk_record import ChunkRecord, n_blocks

OldBlock = Callable[[int], memoryview]  # committed block b, verified against its CRC


def read_span(rec: ChunkRecord, offset: int, length: int, verify: bool) -> tuple[int, int]:
    """The bytes [lo, hi) of the committed version a read of [offset, +length) loads:
    the range itself, or with ``verify`` the CRC blocks around it (the whole
    chunk for a record without per-block CRCs)."""
    lo, hi, _ = read_plan(rec, offset, length, verify)
    return lo, hi


def read_plan(rec: ChunkRecord, offset: int, length: int, verify: bool) -> tuple[int, int, int]:
    """(lo, hi, buffer bytes) of a read of [offset, +length): its :func:`read_span`
    and the size of the buffer ``ChunkEngine.read`` fills (the range, or the
    whole chunk when verifying a record without per-block CRCs)."""
    start = min(offset, rec.length)
    end = min(offset + length, rec.length)
    if not verify or start == end:
        return start, end, end - start
    if not rec.has_block_crcs:
        return 0, rec.length, rec.length
    bs = rec.block_size
    return start // bs * bs, min(n_blocks(end, bs) * bs, rec.length), end - start


def bad_block(rec: ChunkRecord, segments: list[tuple[int, memoryview]]) -> int | None:
    """None if the consecutive committed bytes in ``segments`` ((offset, bytes)
    pieces covering whole CRC blocks) match their CRCs, else the bad block."""
    lo = segments[0][0]
    hi = segments[-1][0] + len(segments[-1][1])
    if lo == 0 and hi == rec.length and len(segments) == 1:
        if crc.value(segments[0][1]) == rec.crc32c:
            return None
        if not rec.has_block_crcs:
            return -1
    bs = rec.block_size
    for b in range(lo // bs, n_blocks(hi, bs)):
        bstart = b * bs
        bend = min(bstart + bs, rec.length)
        c = 0
        for at, view in segments:
            a, z = max(bstart, at), min(bend, at + len(view))
            if a < z:
                c = crc.extend(c, view[a - at : z - at])
        if c != crc.block_crc(rec.block_crcs, b):
            return b
    return -1 if lo == 0 and hi == rec.length and len(segments) == 1 else None


def after_write(rec: ChunkRecord, offset: int, data: memoryview, old_block: OldBlock) -> bytes:
    """Block CRCs after writing ``data`` at ``offset`` over ``rec``'s committed bytes.

    Untouched blocks keep their CRC; a touched block is recomputed from the
    data, zeros (a hole up to ``offset``) and, for the first and last touched
    block only, the committed bytes around the write (read and verified).
    """
    bs = rec.block_size
    old = rec.block_crcs
    old_len = rec.length if rec.committed_version else 0
    end = offset + len(data)
    new_len = max(old_len, end)
    mod_start = min(offset, old_len)
    first, last = mod_start // bs, n_blocks(end, bs)
    out = bytearray(old[: 4 * first])
    for b in range(first, last):
        bstart = b * bs
        bend = min(bstart + bs, new_len)
        if bstart >= offset and bend <= end:
            out += crc.pack_crc(crc.value(data[bstart - offset : bend - offset]))
            continue
        around = None
        if bstart < mod_start or end < bend:
            around = old_block(b)
        c = 0
        pos = bstart
        if pos < mod_start:
            assert around is not None
            c = crc.extend(c, around[: mod_start - bstart])
            pos = mod_start
        if pos < offset:  # the hole between the old end and the write
            c = crc.extend_zeros(c, min(offset, bend) - pos)
            pos = min(offset, bend)
        if pos < bend and pos < end:
            e = min(end, bend)
            c = crc.extend(c, data[pos - offset : e - offset])
            pos = e
        if pos < bend:
            assert around is not None
            c = crc.extend(c, around[pos - bstart : bend - bstart])
            pos = bend
        out += crc.pack_crc(c)
    out += old[4 * last : 4 * n_blocks(new_len, bs)]
    assert len(out) == 4 * n_blocks(new_len, bs)
    return bytes(out)


def after_truncate(rec: ChunkRecord, length: int, old_block: OldBlock) -> bytes:
    """Block CRCs of ``rec``'s committed bytes cut or zero-extended to ``length``."""
    bs = rec.block_size
    old_len = rec.length
    full = min(old_len, length) // bs
    out = bytearray(rec.block_crcs[: 4 * full])
    pos = full * bs
    if length > old_len:
        if old_len > pos:  # the old partial last block, extended with zeros
            c = crc.block_crc(rec.block_crcs, full)
            take = min(pos + bs, length) - old_len
            out += crc.pack_crc(crc.extend_zeros(c, take))
            pos = old_len + take
        while pos < length:
            n = min(bs, length - pos)
            out += crc.pack_crc(crc.zeros(n))
            pos += n
    elif length > pos:  # the block the cut falls in: its kept prefix
        block = old_block(full)
        out += crc.pack_crc(crc.value(block[: length - pos]))
    assert len(out) == 4 * n_blocks(length, bs)
    return bytes(out)
