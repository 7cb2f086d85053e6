"""The reply of a plain FUSE READDIR: packed ``struct fuse_dirent`` records.

Each record is ``{u64 ino; u64 off; u32 namelen; u32 type; char name[]}``
padded with zeros to a multiple of 8 bytes, where ``off`` is the position the
kernel asks from to continue after it. A reply holds whole records only, at
most the request's size; an empty reply ends the listing.
"""

from __future__ import annotations

import bisect
import stat
import struct

_HEADER = struct.Struct("<QQII")  # ino, off (the next position), namelen, type
_ALIGN_BYTES = 8
NAME_MAX_BYTES = 255


def d_type(mode: int) -> int:
    """The DT_* value of a file mode (DT_x == S_IFx >> 12)."""
    return stat.S_IFMT(mode) >> 12


def dirent(ino: int, next_pos: int, name: bytes, mode: int) -> bytes:
    """One record: the entry ``name`` (inode ``ino``) followed by position ``next_pos``."""
    if not 0 < len(name) <= NAME_MAX_BYTES or b"/" in name or b"\0" in name:
        raise ValueError(f"not a directory entry name: {name!r}")
    record = _HEADER.pack(ino, next_pos, len(name), d_type(mode)) + name
    return record + bytes(-len(record) % _ALIGN_BYTES)


class PackedDirents:
    """Records of positions 0, 1, 2, ... packed once; a request at position
    ``pos`` for ``size`` bytes is a slice at record boundaries."""

    __slots__ = ("_chunks", "_data", "_starts")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._starts = [0]  # _starts[j]: byte offset of record j; last: the total
        self._data = b""

    def __len__(self) -> int:
        return len(self._starts) - 1

    def add(self, ino: int, name: bytes, mode: int) -> None:
        """Append the record of the next position (it continues at the one after)."""
        record = dirent(ino, len(self) + 1, name, mode)
        self._chunks.append(record)
        self._starts.append(self._starts[-1] + len(record))

    def reply(self, pos: int, size: int) -> bytes:
        """Whole records from position ``pos`` on, at most ``size`` bytes (b"": the end,
        or not even one record fits)."""
        if self._chunks:
            self._data += b"".join(self._chunks)
            self._chunks.clear()
        if pos < 0 or pos >= len(self):
            return b""
        start = self._starts[pos]
        end = bisect.bisect_right(self._starts, start + size, lo=pos) - 1
        return self._data[start : self._starts[end]]
