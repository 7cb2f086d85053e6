"""File layout arithmetic: which chunk of which chain holds a byte range."""

from __future__ import annotations

from dataclasses import dataclass


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
