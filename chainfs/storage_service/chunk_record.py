"""The chunk record: what a target's metadata store keeps per chunk, and its key.

A record holds the committed version (what reads see) and at most one pending
version (committed + 1, or a full replace) with their lengths, CRC32Cs, file
generations, per-block CRCs and the request that made each. A small overwrite's
bytes are journaled in the same store under :func:`journal_key` (see
:mod:`chunk_engine`). ``encode`` /
``decode`` are its on-disk form (a fixed struct, then optional per-block CRCs);
``check`` asserts its invariants.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service.config import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

KEY_PREFIX = b"C"  # every chunk key starts with it; keys after it sort past all chunks
KEY_END = b"D"
_KEY = struct.Struct(">QI")  # big-endian: one inode's chunks are adjacent, in index order
RECORD = struct.Struct("<QQIIQQIIQBI16sQ16sQ")
# Appended to RECORD by records with per-block CRCs (older records end at RECORD):
# block size, number of committed block CRCs, number of pending block CRCs; then the
# CRCs as little-endian u32s.
_EXT = struct.Struct("<III")
_FLAG_PENDING_REMOVE = 1
_FLAG_PENDING_JOURNAL = 2
_FLAG_JOURNAL_APPLYING = 4
# Journal keys: the bytes of a journaled overwrite, (inode, index, version) -> offset + data.
JOURNAL_PREFIX = b"J"
JOURNAL_END = b"K"
_JOURNAL_KEY = struct.Struct(">QIQ")
NO_CLIENT = b"\0" * 16


def client_id16(client: bytes) -> bytes:
    """A request's client id as records keep it: exactly 16 bytes."""
    return client.ljust(16, b"\0")[:16]


class Origin(NamedTuple):
    """The request that made a version: (client id, request id); retries match it."""

    client: bytes = NO_CLIENT
    request: int = 0

    @classmethod
    def of(cls, client: bytes, request: int) -> Origin:
        return cls(client_id16(client), request)


NO_ORIGIN = Origin()


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """What the metadata store keeps per chunk."""

    committed_version: int = 0
    pending_version: int = 0
    length: int = 0
    crc32c: int = 0
    chain_version: int = 0
    file_gen: int = 0  # 0 = no file (an empty committed chunk)
    pending_length: int = 0
    pending_crc32c: int = 0
    pending_file_gen: int = 0
    pending_remove: bool = False
    chunk_size: int = 0
    committed_client: bytes = NO_CLIENT  # request that made the committed version
    committed_request: int = 0
    pending_client: bytes = NO_CLIENT  # request that made the pending version
    pending_request: int = 0
    # Per-block CRC32Cs (packed u32, one per block_size bytes, the last block short):
    # a partial read verifies only the blocks it touches. block_size 0 = a record
    # written before per-block CRCs: verified as a whole chunk, converted on its
    # next update.
    block_size: int = 0
    block_crcs: bytes = b""  # of the committed version (b"" = unknown: whole-chunk CRC only)
    pending_block_crcs: bytes = b""  # of the pending version
    # The pending version is the committed bytes with a journaled write over them
    # (journal key at pending_version); the chunk file is untouched until commit.
    pending_journal: bool = False
    # The committed version's journal (key at committed_version) is being written
    # into the chunk file: those bytes may be torn, so reads wait and recovery
    # writes the journal again.
    journal_applying: bool = False

    @property
    def has_pending(self) -> bool:
        return self.pending_version != 0

    @property
    def has_block_crcs(self) -> bool:
        """Can reads of the committed version verify single blocks?"""
        return bool(self.block_crcs) or (self.block_size > 0 and self.length == 0)

    def encode(self) -> bytes:
        base = RECORD.pack(
            self.committed_version,
            self.pending_version,
            self.length,
            self.crc32c,
            self.chain_version,
            self.file_gen,
            self.pending_length,
            self.pending_crc32c,
            self.pending_file_gen,
            (_FLAG_PENDING_REMOVE if self.pending_remove else 0)
            | (_FLAG_PENDING_JOURNAL if self.pending_journal else 0)
            | (_FLAG_JOURNAL_APPLYING if self.journal_applying else 0),
            self.chunk_size,
            self.committed_client,
            self.committed_request,
            self.pending_client,
            self.pending_request,
        )
        if not self.block_size:
            return base
        ext = _EXT.pack(
            self.block_size, len(self.block_crcs) // 4, len(self.pending_block_crcs) // 4
        )
        return b"".join((base, ext, self.block_crcs, self.pending_block_crcs))

    @classmethod
    def decode(cls, raw: bytes) -> ChunkRecord:
        f = RECORD.unpack_from(raw)
        block_size = 0
        block_crcs = pending_block_crcs = b""
        if len(raw) > RECORD.size:
            block_size, n_committed, n_pending = _EXT.unpack_from(raw, RECORD.size)
            at = RECORD.size + _EXT.size
            assert len(raw) == at + 4 * (n_committed + n_pending), len(raw)
            block_crcs = raw[at : at + 4 * n_committed]
            pending_block_crcs = raw[at + 4 * n_committed :]
        else:
            assert len(raw) == RECORD.size, len(raw)
        return cls(
            committed_version=f[0],
            pending_version=f[1],
            length=f[2],
            crc32c=f[3],
            chain_version=f[4],
            file_gen=f[5],
            pending_length=f[6],
            pending_crc32c=f[7],
            pending_file_gen=f[8],
            pending_remove=bool(f[9] & _FLAG_PENDING_REMOVE),
            chunk_size=f[10],
            committed_client=f[11],
            committed_request=f[12],
            pending_client=f[13],
            pending_request=f[14],
            block_size=block_size,
            block_crcs=block_crcs,
            pending_block_crcs=pending_block_crcs,
            pending_journal=bool(f[9] & _FLAG_PENDING_JOURNAL),
            journal_applying=bool(f[9] & _FLAG_JOURNAL_APPLYING),
        )

    def check(self) -> None:
        """Assert the invariants of a record."""
        assert self.length <= self.chunk_size or self.committed_version == 0, self
        if self.has_pending:
            assert self.pending_version == self.committed_version + 1 or (
                self.pending_file_gen == self.pending_version and self.pending_version > 0
            ), f"pending version must follow committed (or be a full replace): {self}"
            if not self.pending_remove:
                assert self.pending_length <= self.chunk_size, self
        if self.committed_version == 0:
            assert self.length == 0 and self.file_gen == 0, self
        if self.file_gen == 0:
            assert self.length == 0, f"non-empty committed chunk without a file: {self}"
        if self.pending_journal:
            assert self.pending_version == self.committed_version + 1, self
            assert not self.pending_remove and self.file_gen, self
            assert self.pending_file_gen == self.file_gen, self
            assert self.pending_length >= self.length, self
        if self.journal_applying:
            assert self.file_gen and not self.has_pending, self
        if self.block_size:
            bs = self.block_size
            assert bs & (bs - 1) == 0, f"CRC block size not a power of 2: {self}"
            # A CRC list is complete or empty (a version from before per-block CRCs).
            assert len(self.block_crcs) in (0, 4 * n_blocks(self.length, bs)), self
            if self.has_pending and not self.pending_remove:
                assert len(self.pending_block_crcs) in (
                    0,
                    4 * n_blocks(self.pending_length, bs),
                ), self
            else:
                assert not self.pending_block_crcs, self
        else:
            assert not self.block_crcs and not self.pending_block_crcs, self


def n_blocks(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` covering ``length`` bytes."""
    return -(-length // block_size)


def chunk_key(inode: int, index: int) -> bytes:
    return KEY_PREFIX + _KEY.pack(inode, index)


def parse_key(key: bytes) -> tuple[int, int]:
    assert key[:1] == KEY_PREFIX and len(key) == 1 + _KEY.size, key
    inode, index = _KEY.unpack(key[1:])
    return int(inode), int(index)


def journal_key(inode: int, index: int, version: int) -> bytes:
    """Where the journaled write that makes ``version`` of a chunk is kept."""
    return JOURNAL_PREFIX + _JOURNAL_KEY.pack(inode, index, version)


def parse_journal_key(key: bytes) -> tuple[int, int, int]:
    assert key[:1] == JOURNAL_PREFIX and len(key) == 1 + _JOURNAL_KEY.size, key
    inode, index, version = _JOURNAL_KEY.unpack(key[1:])
    return int(inode), int(index), int(version)


def check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ChainfsError(
            Code.EINVAL,
            f"chunk size {chunk_size} outside [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]",
        )
