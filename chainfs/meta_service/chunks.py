"""What meta asks of storage: a file's exact length, truncation, removal.

Meta talks to storage through :class:`ChunkStorage` (the storage thin
client, ``chainfs.common.rpc.storage_client.StorageClient``, has exactly these
methods). Calls to the chains of one file run concurrently, bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.storage_client import MAX_CHUNK_INDEX, cut_chunks
from chainfs.common.rpc.storage_client import ChunkStorage as ChunkStorage
from chainfs.proto import meta_pb2 as pb

T = TypeVar("T")
MAX_PARALLEL_CHAINS = 32  # calls to the chains of one file in flight at once


def no_storage(what: str) -> ChainfsError:
    return ChainfsError(Code.ENOSYS, f"{what} needs storage; this meta server runs standalone")


async def _each(items: Sequence[int], fn: Callable[[int], Awaitable[T]]) -> list[T]:
    sem = asyncio.Semaphore(MAX_PARALLEL_CHAINS)

    async def one(x: int) -> T:
        async with sem:
            return await fn(x)

    return list(await asyncio.gather(*(one(x) for x in items)))


async def exact_length(storage: ChunkStorage, inode: pb.Inode) -> int:
    """Length of a file by its chunks: the end of the highest chunk on any chain."""
    cs = inode.layout.chunk_size
    assert cs > 0, inode

    async def one(chain: int) -> int:
        last = await storage.query_last_chunk(chain, inode.ino)
        return 0 if last is None else last[0] * cs + last[1]

    lengths = await _each(list(inode.layout.chains), one)
    return max(lengths, default=0)


async def truncate(storage: ChunkStorage, inode: pb.Inode, size: int) -> None:
    """Drop every byte of the file at or beyond ``size`` from storage."""
    chains, cs = list(inode.layout.chains), inode.layout.chunk_size
    await cut_chunks(storage, chains, inode.ino, cs, size, MAX_PARALLEL_CHAINS)


async def remove_all(storage: ChunkStorage, inode: pb.Inode) -> int:
    """Remove every chunk of the file from every chain of its layout."""

    async def remove(chain: int) -> int:
        return await storage.remove_chunks(chain, inode.ino, 0, MAX_CHUNK_INDEX)

    return sum(await _each(list(inode.layout.chains), remove))
