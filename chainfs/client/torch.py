"""PyTorch helpers: datasets that read through chainfs, atomic checkpoints.

Import this module explicitly (``from chainfs.client.torch import ...``);
``import chainfs`` never imports torch.

- :class:`ChainfsDataset`: map-style, over files or (path, offset, length)
  records; a DataLoader batch is fetched in one parallel ``read_ranges`` call
  (``__getitems__``).
- :class:`ChainfsIterableDataset`: streams records, sharded by distributed
  rank and DataLoader worker so every record is read exactly once per epoch.
- :class:`ChainfsTarDataset`: webdataset-style tar shards, (key, {ext: bytes})
  samples, shards split by rank and worker (see chainfs.client.tarshards).
- :func:`save_checkpoint` / :func:`load_checkpoint`: ``torch.save`` into a
  temporary file, fsync, then one atomic rename over the final name.

With an I/O agent on the host (``agent_socket=`` or $CHAINFS_AGENT_SOCKET),
the record datasets fetch their batches through it (chainfs.usrbio: the
agent's workers read into a shared buffer of this process, ``agent_buffer_bytes``);
when no agent answers they use their own connection, as without one.

Datasets hold only the cluster address: each process (DataLoader workers
included) opens its own connection on first use, whatever the start method
(fork, the default, as well as spawn and forkserver).
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from chainfs.client.config import resolve_address
from chainfs.client.sync import FileSystem
from chainfs.client.tarshards import Sample, iter_shards, my_shards
from chainfs.client.usrbio.config import AGENT_SOCKET_ENV

if TYPE_CHECKING:
    from chainfs.client.usrbio import AgentClient, SharedBuffer

log = logging.getLogger(__name__)

# A sample: a whole file, or (path, offset, length) inside one.
Record = str | tuple[str, int, int]
DEFAULT_FETCH_BATCH = 64  # records one read_ranges call of the iterable dataset fetches
# The shared buffer one process's dataset reads into through the agent; a batch
# larger than it goes in several rounds, a record larger than it through the client.
DEFAULT_AGENT_BUFFER_BYTES = 64 * 1024 * 1024


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
    """A per-process connection (and agent connection), dropped when pickled into a worker."""

    def __init__(
        self,
        fs: FileSystem | str | None,
        agent_socket: str | None = None,
        agent_buffer_bytes: int = DEFAULT_AGENT_BUFFER_BYTES,
    ) -> None:
        if agent_buffer_bytes <= 0:
            raise ValueError("agent_buffer_bytes must be > 0")
        self.address = _address_of(fs)
        self.agent_socket = agent_socket or os.environ.get(AGENT_SOCKET_ENV) or None
        self.agent_buffer_bytes = agent_buffer_bytes
        self._fs: FileSystem | None = fs if isinstance(fs, FileSystem) else None
        self._pid = os.getpid()
        self._agent: tuple[AgentClient, SharedBuffer] | None = None
        self._agent_pid = -1  # the process that tried the agent (-1: not tried)
        self._sizes: dict[str, int] = {}  # whole-file records: their length

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
        state["_agent"] = None
        state["_agent_pid"] = -1
        return state

    def _agent_reader(self) -> tuple[AgentClient, SharedBuffer] | None:
        """This process's agent connection and buffer; None without an agent (tried once)."""
        if self.agent_socket is None:
            return None
        if self._agent_pid != os.getpid():
            self._agent_pid = os.getpid()
            self._agent = None
            from chainfs.client import usrbio

            try:
                client = usrbio.connect(self.agent_socket)
                self._agent = (client, client.register_buffer(self.agent_buffer_bytes))
            except OSError as e:
                log.warning("no chainfs agent (%s): datasets read through the client", e)
        return self._agent

    def read_records(self, records: Sequence[Record]) -> list[Any]:
        """The bytes of each record, in order: through the agent if there is one."""
        ranges = [_as_range(r) for r in records]
        agent = self._agent_reader()
        if agent is not None:
            try:
                return self._read_via_agent(*agent, ranges)
            except ConnectionError as e:  # the agent went away: its next call reconnects
                log.warning("chainfs agent read failed (%s): reading through the client", e)
        return self.fs.read_ranges(ranges)

    def _read_via_agent(
        self, client: AgentClient, buf: SharedBuffer, ranges: list[tuple[str, int, int | None]]
    ) -> list[Any]:
        out: list[Any] = [None] * len(ranges)
        group: list[tuple[int, tuple[str, int, int]]] = []
        used = 0

        def flush() -> None:
            views = client.read_ranges_into([r for _, r in group], buf)
            for (i, _r), v in zip(group, views, strict=True):
                out[i] = bytes(v)  # the buffer is reused by the next round

        for i, (path, offset, length) in enumerate(ranges):
            n = self._length(path, offset, length)
            if n > buf.size:
                out[i] = self.fs.read_ranges([(path, offset, n)])[0]
                continue
            if used + n > buf.size:
                flush()
                group, used = [], 0
            group.append((i, (path, offset, n)))
            used += n
        if group:
            flush()
        return out

    def _length(self, path: str, offset: int, length: int | None) -> int:
        if length is not None and length >= 0:
            return length
        size = self._sizes.get(path)
        if size is None:
            size = self._sizes[path] = self.fs.stat(path).st_size
        return max(0, size - offset)


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
        *,
        agent_socket: str | None = None,
        agent_buffer_bytes: int = DEFAULT_AGENT_BUFFER_BYTES,
    ) -> None:
        _Connected.__init__(self, fs, agent_socket, agent_buffer_bytes)
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def _apply(self, data: Any) -> Any:
        return self.transform(data) if self.transform is not None else bytes(data)

    def __getitem__(self, index: int) -> Any:
        (data,) = self.read_records([self.records[index]])
        return self._apply(data)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        datas = self.read_records([self.records[i] for i in indices])
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


def _check_rank(rank: int | None, world_size: int | None) -> None:
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if world_size is not None and not (rank is not None and 0 <= rank < world_size):
        raise ValueError(f"rank must be in [0, {world_size}), not {rank}")


def _position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(index, count) of this reader: the given rank and world size, else the environment's."""
    if rank is None or world_size is None:
        return shard_position()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


class _Sharding:
    """Which share of the data this reader takes: rank, world size, shuffle seed, epoch."""

    def __init__(self, shuffle: bool, seed: int, rank: int | None, world_size: int | None) -> None:
        _check_rank(rank, world_size)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ChainfsIterableDataset(IterableDataset[Any], _Connected, _Sharding):
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
        *,
        agent_socket: str | None = None,
        agent_buffer_bytes: int = DEFAULT_AGENT_BUFFER_BYTES,
    ) -> None:
        _Connected.__init__(self, fs, agent_socket, agent_buffer_bytes)
        if fetch_batch < 1:
            raise ValueError("fetch_batch must be >= 1")
        _Sharding.__init__(self, shuffle, seed, rank, world_size)
        self.records = list(records)
        self.transform = transform
        self.fetch_batch = fetch_batch

    def shard(self) -> list[Record]:
        """The records this reader yields this epoch, in order."""
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        index, count = _position(self.rank, self.world_size)
        return [self.records[i] for i in order[index::count]]

    def __iter__(self) -> Iterator[Any]:
        mine = self.shard()
        for start in range(0, len(mine), self.fetch_batch):
            group = mine[start : start + self.fetch_batch]
            datas = self.read_records(group)
            for d in datas:
                yield self.transform(d) if self.transform is not None else bytes(d)


class ChainfsTarDataset(IterableDataset[Any], _Sharding):
    """webdataset-style tar shards: yields (key, {extension: bytes}) samples.

    Reader ``k`` of ``n`` (distributed rank and DataLoader worker) reads shards
    ``k, k+n, ...`` (after a shuffle by ``seed + epoch`` when ``shuffle``), so
    each sample comes once per epoch across all readers; give at least as many
    shards as readers. ``transform`` is applied to each (key, sample).
    """

    def __init__(
        self,
        fs: FileSystem | str | None,
        shards: Sequence[str],
        transform: Callable[[Sample], Any] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _Sharding.__init__(self, shuffle, seed, rank, world_size)
        self._conn = _Connected(fs)
        self.shards = list(shards)
        self.transform = transform

    def my_shards(self) -> list[str]:
        """The shards this reader reads this epoch."""
        index, count = _position(self.rank, self.world_size)
        return my_shards(self.shards, index, count, self.shuffle, self.seed + self.epoch)

    def __iter__(self) -> Iterator[Any]:
        for sample in iter_shards(self._conn.fs, self.my_shards()):
            yield self.transform(sample) if self.transform is not None else sample


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
