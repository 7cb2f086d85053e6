"""Paths and file layouts: path normalisation, and which chunk of which chain holds a byte range."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import meta_pb2 as mt

# A chunk index travels as a uint32 (storage's ChunkId.index): a file holds at
# most this many chunks, so its length is bounded by chunk_size times this.
MAX_CHUNKS_PER_FILE = 1 << 32


def normpath(path: str | bytes | os.PathLike[str]) -> str:
    """The canonical form of a chainfs path: absolute, single slashes, no trailing slash.

    chainfs has no working directory, so a relative path is refused (OSError
    EINVAL, "paths must be absolute") rather than guessed at; the empty path is
    FileNotFoundError (ENOENT), as ``os.stat("")`` answers. A NUL byte is
    ValueError, as in ``os`` functions.
    """
    return metapath(path).rstrip("/") or "/"


def metapath(path: str | bytes | os.PathLike[str]) -> str:
    """A path as meta is asked about it: ``normpath``'s checks and single slashes,
    but a trailing slash kept. Meta resolves it as POSIX does: only a directory
    (or a symlink to one) is found there, so ``stat("/f/")`` of a file is
    ENOTDIR, and nothing but a directory is made there (``open("/new/", "w")``
    is EISDIR)."""
    if not isinstance(path, str):
        path = os.fsdecode(path)
    if "\x00" in path:
        raise ValueError("embedded null character in path")
    if not path:
        raise FileNotFoundError(errno.ENOENT, "empty path", path)
    if not path.startswith("/"):
        raise OSError(
            errno.EINVAL, "chainfs paths must be absolute (there is no working directory)", path
        )
    while "//" in path:
        path = path.replace("//", "/")
    return path


@dataclass(frozen=True, slots=True)
class Layout:
    """How a file's bytes map to chunks: chunk ``i`` lives on ``chains[i % stripe]``."""

    chunk_size: int
    chains: tuple[int, ...]

    def __post_init__(self) -> None:
        assert self.chunk_size > 0, self.chunk_size
        assert self.chains, "a layout needs at least one chain"

    @property
    def stripe(self) -> int:
        return len(self.chains)

    def chain_of(self, chunk_index: int) -> int:
        return self.chains[chunk_index % len(self.chains)]

    @property
    def max_file_bytes(self) -> int:
        """The largest length a file of this layout can reach (EFBIG beyond)."""
        return self.chunk_size * MAX_CHUNKS_PER_FILE


def layout_of(inode: mt.Inode) -> Layout:
    """The layout meta stored for a file inode."""
    lay = inode.layout
    if not lay.chunk_size or not lay.chains:
        raise ChainfsError(Code.EIO, f"inode {inode.ino} has no usable layout")
    return Layout(chunk_size=lay.chunk_size, chains=tuple(lay.chains)[: lay.stripe or None])


@dataclass(frozen=True, slots=True)
class Piece:
    """The part of a byte range that falls in one chunk."""

    chunk_index: int
    chain_id: int
    chunk_offset: int  # offset inside the chunk
    length: int
    buf_offset: int  # offset of this piece inside the caller's range


def split(layout: Layout, offset: int, length: int) -> list[Piece]:
    """Cut ``[offset, offset + length)`` at chunk boundaries."""
    assert offset >= 0 and length >= 0, (offset, length)
    cs = layout.chunk_size
    pieces: list[Piece] = []
    pos = offset
    end = offset + length
    while pos < end:
        index = pos // cs
        in_chunk = pos - index * cs
        n = min(cs - in_chunk, end - pos)
        pieces.append(Piece(index, layout.chain_of(index), in_chunk, n, pos - offset))
        pos += n
    return pieces
