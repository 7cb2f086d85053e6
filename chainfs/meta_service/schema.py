"""Keys and values of the namespace in the KV store.

Every key starts with a 4-byte tag. Inode ids are 8 bytes little-endian, so
consecutive ids land far apart in key order (FoundationDB / 3FS practice:
no hot range when ids are allocated in sequence).

    INOD|ino               -> Inode (protobuf)
    DENT|parent|name       -> DirEntry value: ino (u64 LE) + type (u8)
    DMTM|ino               -> when a directory's entries last changed, unix ns (u64 BE)
    INOS|ino|session       -> SessionRecord (protobuf): an open session (write, or read)
    CSES|client|ino|session-> b""   sessions by client, for pruning vanished clients
    CLNT|client            -> last keep-alive, unix ms (u64 BE)
    IDEM|client|request    -> answer of a mutating request: tag (u8) + response
    IDET|expire_ms|client|request -> b""   expiry index of IDEM
    XATR|ino|name          -> value
    LOCK|ino|kind|client|owner -> LockRecord (protobuf): the ranges one lock owner holds
    LKCL|client|ino|kind|owner -> b""   locks by client, dropped with the client's lease
    GCQU|due_ms|ino        -> b""   removed files whose chunks storage must drop
    TRSH|due_ms|ino        -> TrashRecord (protobuf): a file in /.trash until due
    IDAL|shard             -> batches taken from this allocator shard (u64 BE)
    ICNT|shard             -> inodes in use with ino % INODE_COUNT_SHARDS == shard, the
                              root aside (u64 BE); sharded so creates do not all conflict
    FRMT                   -> FormatRecord (protobuf), written once
"""

from __future__ import annotations

import struct

from chainfs.kv import Transaction, prefix_end
from chainfs.proto import meta_pb2 as pb

ROOT_INO = 1
INODE_COUNT_SHARDS = 256  # concurrent creates rarely share a counter key (a conflict)
CLIENT_ID_BYTES = 16
SESSION_ID_BYTES = 16

INOD = b"INOD"
DENT = b"DENT"
DMTM = b"DMTM"
INOS = b"INOS"
CSES = b"CSES"
CLNT = b"CLNT"
IDEM = b"IDEM"
IDET = b"IDET"
XATR = b"XATR"
GCQU = b"GCQU"
TRSH = b"TRSH"
IDAL = b"IDAL"
ICNT = b"ICNT"
FRMT = b"FRMT"
LOCK = b"LOCK"
LKCL = b"LKCL"

_INO = struct.Struct("<Q")
_BE64 = struct.Struct(">Q")
_SHARD = struct.Struct(">H")
_DENT_VALUE = struct.Struct("<QB")


def ino_bytes(ino: int) -> bytes:
    return _INO.pack(ino)


def ino_from(b: bytes) -> int:
    value: int = _INO.unpack(b)[0]
    return value


# -- inodes ---------------------------------------------------------------------
def inode_key(ino: int) -> bytes:
    return INOD + _INO.pack(ino)


def encode_inode(inode: pb.Inode) -> bytes:
    return inode.SerializeToString()


def decode_inode(value: bytes) -> pb.Inode:
    inode = pb.Inode()
    inode.ParseFromString(value)
    return inode


# -- directory entries ----------------------------------------------------------
def dent_prefix(parent: int) -> bytes:
    return DENT + _INO.pack(parent)


def dent_key(parent: int, name: bytes) -> bytes:
    return DENT + _INO.pack(parent) + name


def dent_name(key: bytes) -> bytes:
    return key[12:]


def encode_dent(ino: int, type_: int) -> bytes:
    return _DENT_VALUE.pack(ino, type_)


def decode_dent(value: bytes) -> tuple[int, int]:
    ino, type_ = _DENT_VALUE.unpack(value)
    return ino, type_


def dir_times_key(ino: int) -> bytes:
    return DMTM + _INO.pack(ino)


# -- sessions -------------------------------------------------------------------
def session_prefix(ino: int) -> bytes:
    return INOS + _INO.pack(ino)


def session_key(ino: int, session_id: bytes) -> bytes:
    return INOS + _INO.pack(ino) + session_id


def client_session_prefix(client_id: bytes) -> bytes:
    return CSES + client_id


def client_session_key(client_id: bytes, ino: int, session_id: bytes) -> bytes:
    return CSES + client_id + _INO.pack(ino) + session_id


def parse_client_session_key(key: bytes) -> tuple[bytes, int, bytes]:
    body = key[4:]
    n = CLIENT_ID_BYTES
    return body[:n], ino_from(body[n : n + 8]), body[n + 8 :]


def client_key(client_id: bytes) -> bytes:
    return CLNT + client_id


def encode_ms(ms: int) -> bytes:
    return _BE64.pack(max(ms, 0))


def decode_ms(value: bytes) -> int:
    ms: int = _BE64.unpack(value)[0]
    return ms


# -- idempotency ----------------------------------------------------------------
def idem_key(client_id: bytes, request_id: int) -> bytes:
    return IDEM + client_id + _BE64.pack(request_id)


def idem_expiry_key(expire_ms: int, client_id: bytes, request_id: int) -> bytes:
    return IDET + _BE64.pack(expire_ms) + client_id + _BE64.pack(request_id)


def parse_idem_expiry_key(key: bytes) -> tuple[int, bytes, int]:
    expire_ms = decode_ms(key[4:12])
    client = key[12 : 12 + CLIENT_ID_BYTES]
    request_id = decode_ms(key[12 + CLIENT_ID_BYTES :])
    return expire_ms, client, request_id


# -- xattrs ---------------------------------------------------------------------
def xattr_prefix(ino: int) -> bytes:
    return XATR + _INO.pack(ino)


def xattr_key(ino: int, name: bytes) -> bytes:
    return XATR + _INO.pack(ino) + name


# -- advisory locks -------------------------------------------------------------
def lock_prefix(ino: int, kind: int) -> bytes:
    return LOCK + _INO.pack(ino) + bytes([kind])


def lock_key(ino: int, kind: int, client_id: bytes, owner: int) -> bytes:
    return lock_prefix(ino, kind) + client_id + _BE64.pack(owner)


def parse_lock_key(key: bytes) -> tuple[bytes, int]:
    """(client id, owner) of a LOCK key."""
    body = key[13:]
    return body[:CLIENT_ID_BYTES], decode_counter(body[CLIENT_ID_BYTES:])


def client_lock_prefix(client_id: bytes) -> bytes:
    return LKCL + client_id


def client_lock_key(client_id: bytes, ino: int, kind: int, owner: int) -> bytes:
    return LKCL + client_id + _INO.pack(ino) + bytes([kind]) + _BE64.pack(owner)


def lock_key_of_index(key: bytes) -> bytes:
    """The LOCK key an LKCL index key points at."""
    body = key[4:]
    client, rest = body[:CLIENT_ID_BYTES], body[CLIENT_ID_BYTES:]
    return LOCK + rest[:9] + client + rest[9:]


# -- GC queue -------------------------------------------------------------------
def gc_key(due_ms: int, ino: int) -> bytes:
    return GCQU + _BE64.pack(max(due_ms, 0)) + _INO.pack(ino)


def parse_gc_key(key: bytes) -> tuple[int, int]:
    return decode_ms(key[4:12]), ino_from(key[12:20])


def gc_due_end(now_ms: int) -> bytes:
    """End key of the GC entries due at ``now_ms``."""
    return GCQU + _BE64.pack(now_ms + 1)


# -- trash ----------------------------------------------------------------------
def trash_key(due_ms: int, ino: int) -> bytes:
    return TRSH + _BE64.pack(max(due_ms, 0)) + _INO.pack(ino)


def trash_due_end(now_ms: int) -> bytes:
    """End key of the trash records due at ``now_ms``."""
    return TRSH + _BE64.pack(now_ms + 1)


# -- allocator and format -------------------------------------------------------
def alloc_key(shard: int) -> bytes:
    return IDAL + _SHARD.pack(shard)


def inode_count_key(ino: int) -> bytes:
    return ICNT + _SHARD.pack(ino % INODE_COUNT_SHARDS)


async def count_inodes(tx: Transaction, ino: int, delta: int) -> None:
    """Add ``delta`` to the inodes in use, in the transaction that creates or
    drops inode ``ino`` (never below 0: a store formatted before the counter
    existed has inodes it never counted)."""
    key = inode_count_key(ino)
    raw = await tx.get(key)
    tx.set(key, encode_counter(max((decode_counter(raw) if raw else 0) + delta, 0)))


async def inodes_used(tx: Transaction) -> int:
    """Inodes in use, the root included."""
    rows = await tx.get_range(*range_of(ICNT))
    return 1 + sum(decode_counter(v) for _, v in rows)


def encode_counter(n: int) -> bytes:
    return _BE64.pack(n)


def decode_counter(value: bytes) -> int:
    n: int = _BE64.unpack(value)[0]
    return n


def range_of(prefix: bytes) -> tuple[bytes, bytes]:
    return prefix, prefix_end(prefix)
