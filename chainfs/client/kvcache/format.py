"""How a KV-cache entry is named and laid out in its file (no I/O here).

An entry is one immutable file ``<cache>/data/<shard>/<name>``:

    fixed (20 bytes) | key (key_len bytes) | header CRC (4) | value (value_len bytes)

fixed = magic "CFKV", format version, flags (bit 0: the key was a str),
key_len u16, value_len u64, CRC32C of the value; the header CRC is the
CRC32C of fixed + key; little-endian. Because the key is known to the
reader, the value's offset (24 + key_len) is known before any byte is read:
one read fetches header and value.

The name is the hex of the first ``name_hash_bytes`` of the key's BLAKE2b
digest, with ``~p`` appended for collision probe ``p`` > 0; the shard
(sub-directory) comes from other digest bytes. The key stored in the header
tells whose entry a file really is.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import Enum

from chainfs.common.checksum import crc32c, crc32c_extend
from chainfs.common.errors import ChainfsError, Code

MAGIC = b"CFKV"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sBBHQI")  # magic, version, flags, key_len, value_len, value_crc
_HCRC = struct.Struct("<I")
FIXED_HEADER_BYTES = _FIXED.size + _HCRC.size  # header bytes besides the key
assert FIXED_HEADER_BYTES == 24
MAX_KEY_FIELD_BYTES = 0xFFFF  # key_len is a u16
FLAG_STR_KEY = 1
_DIGEST_BYTES = 32
_PERSON = b"chainfs-kvcache1"  # 16 bytes: domain separation of the hash


def header_len(key_len: int) -> int:
    """Bytes before the value in an entry whose key is ``key_len`` bytes long."""
    return FIXED_HEADER_BYTES + key_len


def encode_header(key: bytes, is_str: bool, value_len: int, value_crc: int) -> bytes:
    """Everything that precedes the value in the file."""
    assert len(key) <= MAX_KEY_FIELD_BYTES, len(key)
    assert value_len >= 0, value_len
    flags = FLAG_STR_KEY if is_str else 0
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, flags, len(key), value_len, value_crc) + key
    return body + _HCRC.pack(crc32c(body))


@dataclass(frozen=True, slots=True)
class Header:
    key: bytes
    is_str: bool
    value_len: int
    value_crc: int

    def original_key(self) -> str | bytes:
        return self.key.decode("utf-8") if self.is_str else self.key


def decode_header(buf: bytes | bytearray | memoryview) -> Header | None:
    """The header at the start of ``buf``, or None if ``buf`` does not hold a whole valid one."""
    view = memoryview(buf)
    if len(view) < FIXED_HEADER_BYTES:
        return None
    magic, version, flags, key_len, value_len, value_crc = _FIXED.unpack_from(view)
    if magic != MAGIC or version != FORMAT_VERSION:
        return None
    end = _FIXED.size + key_len
    if len(view) < end + _HCRC.size:
        return None
    if crc32c(view[:end]) != _HCRC.unpack_from(view, end)[0]:
        return None
    key = bytes(view[_FIXED.size : end])
    is_str = bool(flags & FLAG_STR_KEY)
    if is_str:
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return Header(key, is_str, value_len, value_crc)


class Check(Enum):
    OK = "ok"
    OTHER_KEY = "other-key"  # a valid entry of another key (a name collision)
    CHANGED = "changed"  # not a whole entry now: removed or replaced under the read


def check_header(key: bytes, header: memoryview, value_len: int) -> Check:
    """Whether ``header`` (as read) is a whole header of ``key``'s entry with a value
    of ``value_len`` bytes (the value itself unchecked)."""
    if len(header) != FIXED_HEADER_BYTES + len(key):
        return Check.CHANGED
    magic, version, _flags, key_len, stored_len, _crc = _FIXED.unpack_from(header)
    if magic != MAGIC or version != FORMAT_VERSION:
        return Check.CHANGED
    if key_len != len(key):
        return Check.OTHER_KEY
    end = _FIXED.size + key_len
    if crc32c(header[:end]) != _HCRC.unpack_from(header, end)[0]:
        return Check.CHANGED
    if header[_FIXED.size : end] != key:
        return Check.OTHER_KEY
    if stored_len != value_len:
        return Check.CHANGED
    return Check.OK


def check_entry(
    key: bytes, header: memoryview, value: bytes | memoryview | list[memoryview]
) -> Check:
    """Whether ``header`` + ``value`` (as read; the value possibly in parts) are the
    whole entry of ``key``."""
    parts = value if isinstance(value, list) else [value]
    verdict = check_header(key, header, sum(len(p) for p in parts))
    if verdict is Check.OK:
        crc = 0
        for p in parts:
            crc = crc32c_extend(crc, p)
        if crc != _FIXED.unpack_from(header)[5]:
            return Check.CHANGED
    return verdict


def peek_key_len(buf: bytes | bytearray | memoryview) -> int | None:
    """key_len of a header whose fixed part is in ``buf`` (unchecked), or None."""
    view = memoryview(buf)
    if len(view) < _FIXED.size or bytes(view[:4]) != MAGIC:
        return None
    return int(_FIXED.unpack_from(view)[3])


@dataclass(frozen=True, slots=True)
class Key:
    """A key as bytes, plus what its file is called."""

    raw: bytes
    is_str: bool
    digest: bytes

    @classmethod
    def of(cls, key: str | bytes | bytearray | memoryview, max_key_bytes: int) -> Key:
        if isinstance(key, str):
            raw, is_str = key.encode("utf-8"), True
        elif isinstance(key, bytes | bytearray | memoryview):
            raw, is_str = bytes(key), False
        else:
            raise TypeError(f"a KV-cache key is str or bytes, not {type(key).__name__}")
        if not raw:
            raise ChainfsError(Code.EINVAL, "a KV-cache key may not be empty")
        if len(raw) > max_key_bytes:
            raise ChainfsError(
                Code.ENAMETOOLONG,
                f"KV-cache key of {len(raw)} bytes is longer than max_key_bytes={max_key_bytes}",
            )
        digest = hashlib.blake2b(raw, digest_size=_DIGEST_BYTES, person=_PERSON).digest()
        return cls(raw, is_str, digest)

    def original(self) -> str | bytes:
        return self.raw.decode("utf-8") if self.is_str else self.raw

    def display(self, limit: int = 80) -> str:
        """The key for error messages (bytes keys as their repr), at most ``limit`` chars."""
        text = self.raw.decode("utf-8") if self.is_str else repr(self.raw)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    @property
    def header_len(self) -> int:
        return header_len(len(self.raw))

    def shard(self, shards: int) -> int:
        # The last digest bytes: independent of the name's (leading) bytes.
        return int.from_bytes(self.digest[-4:], "little") % shards

    def name(self, name_hash_bytes: int, probe: int) -> str:
        base = self.digest[:name_hash_bytes].hex()
        return base if probe == 0 else f"{base}~{probe}"


def shard_dir_name(shard: int, shards: int) -> str:
    width = max(2, len(f"{shards - 1:x}"))
    return f"{shard:0{width}x}"
