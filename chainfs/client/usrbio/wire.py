"""Frames on the agent's unix sockets and the encoding of batches and their answers.

A frame is a 16-byte header (payload length, type, tag) and the payload. The
tag is a batch's ticket, a buffer's id, or 0. A REGISTER frame carries the
buffer's memfd as SCM_RIGHTS ancillary data. Batches are packed with struct
(one fixed record per read plus its path), answers likewise: nothing here is
per-byte work, file bytes never travel on the socket.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

HEADER = struct.Struct("<IIQ")  # payload bytes, frame type, tag
# One read: buffer id, offset in the buffer, file offset, length, inode (0: by path), path bytes.
ENTRY = struct.Struct("<IQQQQH")
# One answer: errno (0 = success), bytes read, message bytes.
RESULT = struct.Struct("<iQH")
MAX_PATH_BYTES = 4096

# Frame types. Requests from users; the agent answers with the same type and tag.
HELLO = 1  # main socket: -> JSON {"workers": [socket paths], "pid": ...}
REGISTER = 2  # size (u64) + memfd -> errno (i32)
UNREGISTER = 3  # -> errno (i32)
BATCH = 4  # entries -> results
STATS = 5  # -> JSON
SIZE = struct.Struct("<Q")
STATUS = struct.Struct("<i")


class FrameError(ConnectionError):
    """The peer sent something that is not a frame of this protocol."""


@dataclass
class Frame:
    type: int
    tag: int
    payload: bytes
    fds: list[int] = field(default_factory=list)


def frame(ftype: int, tag: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), ftype, tag) + payload


def json_payload(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class FrameParser:
    """Cuts a byte stream (and the fds that came with it) into frames, bounded in size."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._max = max_frame_bytes

    def feed(self, data: bytes, fds: list[int]) -> list[Frame]:
        self._buf += data
        self._fds.extend(fds)
        out: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            n, ftype, tag = HEADER.unpack_from(self._buf)
            if n > self._max:
                raise FrameError(errno.EMSGSIZE, f"frame of {n} bytes over the {self._max} bound")
            if len(self._buf) < HEADER.size + n:
                break
            payload = bytes(self._buf[HEADER.size : HEADER.size + n])
            del self._buf[: HEADER.size + n]
            # An fd rides on the REGISTER frame it was sent with (one per frame).
            fds = [self._fds.pop(0)] if ftype == REGISTER and self._fds else []
            out.append(Frame(ftype, tag, payload, fds))
        return out

    def close_fds(self) -> None:
        """Close fds received but not claimed by a frame."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class Entry:
    """One read of a batch, as it travels."""

    buffer_id: int
    buffer_offset: int
    offset: int
    length: int
    inode: int  # 0: the file is named by ``path``
    path: bytes


def encode_batch(entries: list[Entry]) -> bytes:
    parts = [struct.pack("<I", len(entries))]
    for e in entries:
        parts.append(
            ENTRY.pack(e.buffer_id, e.buffer_offset, e.offset, e.length, e.inode, len(e.path))
        )
        parts.append(e.path)
    return b"".join(parts)


def decode_batch(payload: bytes, max_entries: int) -> list[Entry]:
    """The entries of a BATCH payload; FrameError when it is malformed or over the bound."""
    try:
        (count,) = struct.unpack_from("<I", payload)
        if count > max_entries:
            raise FrameError(errno.E2BIG, f"batch of {count} reads over the {max_entries} bound")
        pos = 4
        out: list[Entry] = []
        for _ in range(count):
            bid, boff, off, length, ino, plen = ENTRY.unpack_from(payload, pos)
            pos += ENTRY.size
            path = payload[pos : pos + plen]
            if len(path) != plen:
                raise FrameError(errno.EPROTO, "batch frame cut inside a path")
            pos += plen
            out.append(Entry(bid, boff, off, length, ino, path))
    except struct.error as e:
        raise FrameError(errno.EPROTO, f"malformed batch frame: {e}") from None
    return out


@dataclass(frozen=True)
class Completion:
    """How one read of a batch ended: ``nbytes`` read (short at end of file), or ``errno``."""

    nbytes: int
    errno: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.errno == 0

    def error(self, what: str = "") -> OSError:
        """The failure as an OSError of its errno (FileNotFoundError for ENOENT, ...)."""
        return OSError(self.errno, self.message or "chainfs agent read failed", what or None)


def encode_results(results: list[Completion]) -> bytes:
    parts = [struct.pack("<I", len(results))]
    for r in results:
        msg = r.message.encode()[:1024]
        parts.append(RESULT.pack(r.errno, r.nbytes, len(msg)))
        parts.append(msg)
    return b"".join(parts)


def decode_results(payload: bytes) -> list[Completion]:
    try:
        (count,) = struct.unpack_from("<I", payload)
        pos = 4
        out: list[Completion] = []
        for _ in range(count):
            err, nbytes, mlen = RESULT.unpack_from(payload, pos)
            pos += RESULT.size
            out.append(Completion(nbytes, err, payload[pos : pos + mlen].decode(errors="replace")))
            pos += mlen
    except struct.error as e:
        raise FrameError(errno.EPROTO, f"malformed answer frame: {e}") from None
    return out
