"""Transactional key-value stores: ``chainfs.kv.open(url)``.

URLs: ``memory://``, ``rocksdb:///path/to/dir``,
``etcd://host:port[,host:port...]/prefix``,
``postgresql://user@host:port/database?schema=name``.
"""

from __future__ import annotations

from urllib.parse import urlparse

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv.base import (
    MAX_PREFETCH_KEYS,
    KVStore,
    RetryPolicy,
    Transaction,
    TxnConflict,
    TxnTooOld,
    prefix_end,
)

__all__ = [
    "MAX_PREFETCH_KEYS",
    "KVStore",
    "RetryPolicy",
    "Transaction",
    "TxnConflict",
    "TxnTooOld",
    "open",
    "prefix_end",
]


def open(url: str, retry: RetryPolicy | None = None) -> KVStore:
    """Open the store named by ``url``."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        from chainfs.kv.memory import MemoryStore

        return MemoryStore(retry)
    if scheme == "rocksdb":
        from chainfs.kv.rocksdb import RocksDBStore

        return RocksDBStore.from_url(url, retry)
    if scheme == "etcd":
        from chainfs.kv.etcd import EtcdStore

        return EtcdStore.from_url(url, retry)
    if scheme in ("postgresql", "postgres"):
        from chainfs.kv.postgres import PostgresStore

        return PostgresStore.from_url(url, retry)
    raise ChainfsError(
        Code.EINVAL,
        f"unknown KV store URL {url!r} (use memory://, rocksdb:///dir, etcd://h:p/pfx, "
        "postgresql://user@h:p/db)",
    )
