"""webdataset-style tar shards on chainfs: samples as (key, {extension: bytes}).

A shard is a tar file whose members are grouped into samples by key: the
member name up to the first dot of its base name (``train/0001.jpg`` and
``train/0001.cls`` are the extensions ``jpg`` and ``cls`` of the sample
``train/0001``). Members of one sample are consecutive in the tar, as
webdataset writes them. Shards are read front to back in one stream
(``tarfile`` streaming mode over a chainfs file, so the file's read-ahead
keeps several chunks in flight); nothing but the standard library is needed.

Readers split the shards, not the samples: reader ``k`` of ``n`` takes shards
``k, k+n, ...``, so every sample is read once across all readers when there
are at least as many shards as readers (more shards than readers balances
better).
"""

from __future__ import annotations

import posixpath
import random
import tarfile
from collections.abc import Iterator, Sequence
from typing import IO, cast

from chainfs.client.sync import FileSystem

Sample = tuple[str, dict[str, bytes]]


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the base name splits at its first dot."""
    head, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(head, stem) if head else stem), (ext if dot else "")


def tar_samples(stream: IO[bytes]) -> Iterator[Sample]:
    """The samples of one tar stream, in order (regular files only)."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_name(member.name)
            if key is not None and k != key:
                yield key, parts
                parts = {}
            key = k
            f = tar.extractfile(member)
            assert f is not None  # a regular file always has content
            if ext in parts:
                raise ValueError(f"sample {k!r} has two members with extension {ext!r}")
            parts[ext] = f.read()
    if key is not None:
        yield key, parts


def my_shards(
    shards: Sequence[str], index: int, count: int, shuffle: bool = False, seed: int = 0
) -> list[str]:
    """The shards reader ``index`` of ``count`` reads (same shuffle on every reader)."""
    if not 0 <= index < count:
        raise ValueError(f"reader index {index} not in [0, {count})")
    order = list(shards)
    if shuffle:
        random.Random(seed).shuffle(order)
    return order[index::count]


def iter_shards(fs: FileSystem, shards: Sequence[str]) -> Iterator[Sample]:
    """Every sample of ``shards``, shard after shard."""
    for path in shards:
        with fs.open(path, "rb") as f:
            yield from tar_samples(cast(IO[bytes], f))
