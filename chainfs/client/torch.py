"""PyTorch helpers: datasets that read through chainfs, atomic checkpoints.

Import this module explicitly (``from chainfs.client.torch import ...``);
``import chainfs`` never imports torch.

- :class:`ChainfsDataset`: map-style, over files or (path, offset, length)
  records; a DataLoader batch is fetched in one parallel ``read_ranges`` call
  (``__getitems__``).
- :class:`ChainfsIterableDataset`: streams records, sharded by distributed
  rank and DataLoader worker so every record is read exactly once per epoch.
- :func:`save_checkpoint` / :func:`load_checkpoint`: ``torch.save`` into a
  temporary file, fsync, then one atomic rename over the final name.

Datasets hold only the cluster address: each process (DataLoader workers
included) opens its own connection on first use, whatever the start method
(fork, the default, as well as spawn and forkserver).
"""

from __future__ import annotations

import os
import posixpath
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, cast

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from chainfs.client.config import resolve_address
from chainfs.client.sync import FileSystem

# A sample: a whole file, or (path, offset, length) inside one.
Record = str | tuple[str, int, int]
DEFAULT_FETCH_BATCH = 64  # records one read_ranges call of the iterable dataset fetches


def _address_of(fs: FileSystem | str | None) -> str:
    if isinstance(fs, FileSystem):
        return fs.address
    return resolve_address(fs)


def _as_range(r: Record) -> tuple[str, int, int | None]:
    if isinstance(r, str):
        return (r, 0, None)
    path, offset, length = r
    return (path, int(offset), int(length))


class _Connected:
    """A per-process connection, dropped when pickled into a worker."""

    def __init__(self, fs: FileSystem | str | None) -> None:
        self.address = _address_of(fs)
        self._fs: FileSystem | None = fs if isinstance(fs, FileSystem) else None
        self._pid = os.getpid()

    @property
    def fs(self) -> FileSystem:
        if self._fs is None or self._pid != os.getpid() or self._fs.closed:
            import chainfs

            self._fs = chainfs.connect(self.address)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None
        return state


class ChainfsDataset(Dataset[Any], _Connected):
    """Map-style dataset: item ``i`` is the bytes of ``records[i]`` (through ``transform``).

    ``records`` are paths (the whole file) or (path, offset, length) tuples.
    A DataLoader with a batch sampler calls ``__getitems__``: the whole batch
    is one parallel, batched fetch.
    """

    def __init__(
        self,
        fs: FileSystem | str | None,
        records: Sequence[Record],
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        _Connected.__init__(self, fs)
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def _apply(self, data: Any) -> Any:
        return self.transform(data) if self.transform is not None else bytes(data)

    def __getitem__(self, index: int) -> Any:
        (data,) = self.fs.read_ranges([_as_range(self.records[index])])
        return self._apply(data)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        datas = self.fs.read_ranges([_as_range(self.records[i]) for i in indices])
        return [self._apply(d) for d in datas]


def shard_position() -> tuple[int, int]:
    """(index, count) of this reader among all (rank, DataLoader worker) pairs."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class ChainfsIterableDataset(IterableDataset[Any], _Connected):
    """Streams ``records``, each exactly once per epoch across ranks and workers.

    Records are (optionally) shuffled with ``seed + epoch`` (the same order on
    every rank), then reader ``k`` of ``n`` takes records ``k, k+n, k+2n, ...``.
    Each reader fetches ``fetch_batch`` records per parallel read.
    """

    def __init__(
        self,
        fs: FileSystem | str | None,
        records: Sequence[Record],
        transform: Callable[[Any], Any] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        fetch_batch: int = DEFAULT_FETCH_BATCH,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _Connected.__init__(self, fs)
        if fetch_batch < 1:
            raise ValueError("fetch_batch must be >= 1")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not (rank is not None and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, {world_size}), not {rank}")
        self.records = list(records)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.fetch_batch = fetch_batch
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _position(self) -> tuple[int, int]:
        if self.rank is None or self.world_size is None:
            return shard_position()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def shard(self) -> list[Record]:
        """The records this reader yields this epoch, in order."""
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        index, count = self._position()
        return [self.records[i] for i in order[index::count]]

    def __iter__(self) -> Iterator[Any]:
        mine = self.shard()
        for start in range(0, len(mine), self.fetch_batch):
            group = mine[start : start + self.fetch_batch]
            datas = self.fs.read_ranges([_as_range(r) for r in group])
            for d in datas:
                yield self.transform(d) if self.transform is not None else bytes(d)


def _resolve(path: str, fs: FileSystem | str | None) -> tuple[FileSystem, str, bool]:
    """(FileSystem, path inside it, whether we opened the FileSystem here)."""
    if isinstance(fs, FileSystem):
        return fs, path, False
    from chainfs.client.fsspec_adapter import ChainFileSystem

    address = ChainFileSystem._get_kwargs_from_urls(path).get("address") or _address_of(fs)
    import chainfs

    return chainfs.connect(address), ChainFileSystem._strip_protocol(path), True


def save_checkpoint(
    obj: Any, path: str, fs: FileSystem | str | None = None, **save_kwargs: Any
) -> None:
    """``torch.save(obj)`` to ``path`` atomically: readers see the old or the new file.

    ``fs``: a FileSystem, or an address (default: from a ``chainfs://HOST:PORT/``
    path or $CHAINFS_ADDRESS).
    """
    client, p, owned = _resolve(path, fs)
    try:
        parent, name = posixpath.split(p)
        tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with client.open(tmp, "wb") as f:
                torch.save(obj, cast(IO[bytes], f), **save_kwargs)
                f.fsync()
            client.rename(tmp, p)
        except BaseException:
            try:
                client.remove(tmp)
            except OSError:
                pass
            raise
    finally:
        if owned:
            client.close()


def load_checkpoint(path: str, fs: FileSystem | str | None = None, **load_kwargs: Any) -> Any:
    """``torch.load`` from ``path`` (``map_location``, ``weights_only`` ... pass through)."""
    client, p, owned = _resolve(path, fs)
    try:
        with client.open(p, "rb") as f:
            return torch.load(cast(IO[bytes], f), **load_kwargs)
    finally:
        if owned:
            client.close()
