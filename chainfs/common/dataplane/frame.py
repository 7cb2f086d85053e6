"""The data-plane frame: a fixed 40-byte header, a header message, raw payload.

Layout on the wire (little-endian)::

    offset size field
         0    4 magic        b"CFDP" (0x50444643 read as u32 LE)
         4    1 version      PROTOCOL_VERSION (1)
         5    1 flags        FLAG_RESPONSE | FLAG_ERROR; other bits must be 0
         6    2 msg_type     u16, chosen by the service (storage.proto MsgType)
         8    8 request_id   u64, chosen by the client; a response echoes it
        16    4 header_len   u32, bytes of the header message that follows
        20    4 status       u32, 0 or (FLAG_ERROR) a chainfs error code
        24    8 payload_len  u64, raw payload bytes after the header message
        32    4 reserved     must be 0
        36    4 header_crc   CRC32C of bytes 0..36 (catches garbage and desync)
        40      header message (header_len bytes; a protobuf message, opaque here)
           payload (payload_len bytes)

An error response (FLAG_RESPONSE | FLAG_ERROR) carries the code in ``status``,
the UTF-8 message as its header message, and no payload.
"""

from __future__ import annotations

import struct

import google_crc32c

from chainfs.common.errors import ChainfsError, Code

MAGIC = 0x50444643  # b"CFDP" as a little-endian u32
PROTOCOL_VERSION = 1
FLAG_RESPONSE = 0x01
FLAG_ERROR = 0x02
KNOWN_FLAGS = FLAG_RESPONSE | FLAG_ERROR

_FIXED = struct.Struct("<IBBHQIIQI")  # everything the CRC covers
_CRC = struct.Struct("<I")
FIXED_HEADER_SIZE = _FIXED.size + _CRC.size  # 40 bytes
assert FIXED_HEADER_SIZE == 40

MAX_MSG_TYPE = 0xFFFF
# The first frame a client sends on a connection that carries a credential:
# header = a serialized chainfs.Credential, reply = chainfs.HelloReply. The
# DataServer answers it itself; handlers never see it.
MSG_HELLO = 0xFFFF
MAX_REQUEST_ID = (1 << 64) - 1


class FrameHeader:
    """The decoded fixed header of one frame (a plain slotted class: built per frame)."""

    __slots__ = ("flags", "header_len", "msg_type", "payload_len", "request_id", "status")

    def __init__(
        self,
        flags: int,
        msg_type: int,
        request_id: int,
        header_len: int,
        status: int,
        payload_len: int,
    ) -> None:
        self.flags = flags
        self.msg_type = msg_type
        self.request_id = request_id
        self.header_len = header_len
        self.status = status
        self.payload_len = payload_len

    def __repr__(self) -> str:
        return (
            f"FrameHeader(flags={self.flags:#x}, msg_type={self.msg_type}, "
            f"request_id={self.request_id}, header_len={self.header_len}, "
            f"status={self.status}, payload_len={self.payload_len})"
        )

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)


def encode_fixed(
    flags: int, msg_type: int, request_id: int, header_len: int, status: int, payload_len: int
) -> bytes:
    """The 40 fixed-header bytes of a frame (raises ValueError on out-of-range fields)."""
    if not 0 <= msg_type <= MAX_MSG_TYPE:
        raise ValueError(f"msg_type {msg_type} outside u16")
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown frame flags {flags:#x}")
    body = _FIXED.pack(
        MAGIC, PROTOCOL_VERSION, flags, msg_type, request_id, header_len, status, payload_len, 0
    )
    return body + _CRC.pack(google_crc32c.value(body))


def decode_fixed(
    buf: bytes | bytearray | memoryview, offset: int, max_header_bytes: int, max_payload_bytes: int
) -> FrameHeader:
    """Decode and validate the fixed header at ``buf[offset:offset + 40]``.

    Raises ChainfsError(BAD_FRAME) naming what is wrong: the connection the
    bytes came from can no longer be trusted and must be closed.
    """
    magic, version, flags, msg_type, request_id, header_len, status, payload_len, reserved = (
        _FIXED.unpack_from(buf, offset)
    )
    if magic != MAGIC:
        raise ChainfsError(Code.BAD_FRAME, f"bad frame magic {magic:#010x}")
    (crc,) = _CRC.unpack_from(buf, offset + _FIXED.size)
    if crc != google_crc32c.value(bytes(memoryview(buf)[offset : offset + _FIXED.size])):
        raise ChainfsError(Code.BAD_FRAME, "frame header CRC32C mismatch")
    if version != PROTOCOL_VERSION:
        raise ChainfsError(Code.BAD_FRAME, f"unsupported frame version {version}")
    if flags & ~KNOWN_FLAGS or reserved != 0:
        raise ChainfsError(Code.BAD_FRAME, f"unknown frame flags {flags:#x}/{reserved:#x}")
    if header_len > max_header_bytes:
        raise ChainfsError(
            Code.BAD_FRAME,
            f"header message of {header_len} bytes over the {max_header_bytes} bound",
        )
    if payload_len > max_payload_bytes:
        raise ChainfsError(
            Code.BAD_FRAME, f"payload of {payload_len} bytes over the {max_payload_bytes} bound"
        )
    if flags & FLAG_ERROR and not flags & FLAG_RESPONSE:
        raise ChainfsError(Code.BAD_FRAME, "error flag on a request frame")
    return FrameHeader(flags, msg_type, request_id, header_len, status, payload_len)


def error_of_reply(status: int, header: bytes) -> ChainfsError:
    """The error an error response (FLAG_ERROR) carries: its code and UTF-8 message."""
    return ChainfsError(status, header.decode("utf-8", "replace"))
