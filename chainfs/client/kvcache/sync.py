"""KVCache: the synchronous twin of AsyncKVCache, its methods generated from the async ones."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from chainfs.client.kvcache.cache import AsyncKVCache, Buffer, KeyLike, as_out_view
from chainfs.client.kvcache.config import KVCacheConfig
from chainfs.client.kvcache.format import Key
from chainfs.client.kvcache.sync_gets import MISSING, UNASKED, SyncGets

if TYPE_CHECKING:
    from chainfs.client._loop import LoopThread

P = ParamSpec("P")
# Where a sync get's key stands (KVCache._locate).
_CACHED, _PRIMED, _ABSENT, _UNKNOWN = object(), object(), object(), object()
R = TypeVar("R")


def _on_loop(
    method: Callable[Concatenate[AsyncKVCache, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[KVCache, P], R]:
    """The sync form of an AsyncKVCache coroutine method: the same parameters
    (``inspect.signature`` follows ``__wrapped__``), run on the loop thread."""

    @functools.wraps(method)
    def run(self: KVCache, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._loop.run(method(self._a, *args, **kwargs))

    run.__qualname__ = f"KVCache.{method.__name__}"
    return run


class KVCache:
    """A KV cache for synchronous code: AsyncKVCache run on the FileSystem's loop thread."""

    def __init__(self, acache: AsyncKVCache, loop: LoopThread) -> None:
        self._a = acache
        self._loop = loop
        # The same objects as the async core's attributes of these names.
        self.directory: str = acache.directory
        self.config: KVCacheConfig = acache.config

    @property
    def aio(self) -> AsyncKVCache:
        """The async core (usable only from coroutines on the FileSystem's loop)."""
        return self._a

    @property
    def closed(self) -> bool:
        return self._a.closed

    def get(self, key: KeyLike) -> bytes | None:
        """The value of ``key``, or None. A key whose location this handle has
        cached is read from the calling thread (``sync_gets``); so is one whose
        first name the loop thread has just looked up (``_prime``). Anything
        else, and anything that read does not serve cleanly, runs on the loop
        thread."""
        fast = self._a._sync_gets  # the same package's internals
        if fast is not None and not self._a.closed:
            k = Key.of(key, self.config.max_key_bytes)
            where = self._locate(fast, k)
            if where is _ABSENT:
                return None  # no entry of that name: the miss the loop path would answer
            value = fast.get(k, primed=where is _PRIMED)
            if value is not None:
                return value
        return self._loop.run(self._a.get(key))

    def _locate(self, fast: SyncGets, key: Key) -> object:
        """Where ``key``'s location stands for a sync get: _CACHED before this get,
        _PRIMED by a lookup just now (``SyncGets.prime`` from this thread, else
        ``AsyncKVCache._prime`` on the loop),
        _ABSENT at meta, or _UNKNOWN (the loop path finds it)."""
        if self._a._entries.locations.holds(key):
            return _CACHED
        if not fast.primes:
            return _UNKNOWN
        got = fast.prime(key)  # from this thread; else on the loop
        if got is UNASKED:
            got = self._loop.run(self._a._prime(key))
        return _UNKNOWN if got is None else _PRIMED if got else _ABSENT

    def get_into(self, key: KeyLike, buffer: Buffer) -> int:
        """Read the value into ``buffer``; its length, or -1 on a miss (ERANGE,
        nothing written, when the value is longer than the buffer). A key whose
        location this handle has cached is read from the calling thread, as
        :meth:`get`."""
        fast = self._a._sync_gets
        if fast is not None and not self._a.closed:
            k = Key.of(key, self.config.max_key_bytes)
            where = self._locate(fast, k)
            if where is _ABSENT:
                return -1
            n = fast.get_into(k, as_out_view(buffer), primed=where is _PRIMED)
            if n is not None:
                return n
        return self._loop.run(self._a.get_into(key, buffer))

    def batch_get(self, keys: Sequence[KeyLike]) -> list[bytes | None]:
        """Values in key order, None for a missing key. The keys whose locations
        this handle has cached, or can look up at meta from the calling thread
        (one batch), are read from the calling thread, together (one frame per
        storage node); the rest, and any such read that is not served cleanly,
        go to the loop thread in one batch."""
        fast = self._a._sync_gets
        if fast is None or self._a.closed or not keys:
            return self._loop.run(self._a.batch_get(keys))
        keys = list(keys)  # any sized iterable, as the loop path takes
        limit = self.config.max_key_bytes
        got = fast.get_many([Key.of(k, limit) for k in keys])
        values: list[bytes | None] = [None if v is MISSING else v for v in got]
        rest = [i for i, v in enumerate(got) if v is None]
        if rest:
            more = self._loop.run(self._a.batch_get([keys[i] for i in rest]))
            for i, v in zip(rest, more, strict=True):
                values[i] = v
        return values

    def batch_get_into(self, keys: Sequence[KeyLike], buffers: Sequence[Buffer]) -> list[int]:
        """Read each value into its buffer; lengths in key order, -1 for a miss
        (ERANGE as ``AsyncKVCache.batch_get_into``). Cached keys are read from
        the calling thread, as :meth:`batch_get`."""
        fast = self._a._sync_gets
        if fast is None or self._a.closed or not keys or len(keys) != len(buffers):
            return self._loop.run(self._a.batch_get_into(keys, buffers))
        keys, buffers = list(keys), list(buffers)
        limit = self.config.max_key_bytes
        outs = [as_out_view(b) for b in buffers]
        got = fast.get_many_into([Key.of(k, limit) for k in keys], outs)
        rest = [i for i, n in enumerate(got) if n is None]
        if rest:
            more = self._loop.run(
                self._a.batch_get_into([keys[i] for i in rest], [buffers[i] for i in rest])
            )
            for i, n in zip(rest, more, strict=True):
                got[i] = n
        return [-1 if n is None else n for n in got]

    exists = _on_loop(AsyncKVCache.exists)
    batch_exists = _on_loop(AsyncKVCache.batch_exists)
    put = _on_loop(AsyncKVCache.put)
    batch_put = _on_loop(AsyncKVCache.batch_put)
    remove = _on_loop(AsyncKVCache.remove)
    batch_remove = _on_loop(AsyncKVCache.batch_remove)
    keys = _on_loop(AsyncKVCache.keys)
    stats = _on_loop(AsyncKVCache.stats)
    gc = _on_loop(AsyncKVCache.gc)
    flush_access_times = _on_loop(AsyncKVCache.flush_access_times)

    def estimated_bytes(self) -> int | None:
        """Bytes in the cache as of the last scans plus this handle's puts since."""
        return self._a.estimated_bytes()

    def close(self) -> None:
        """Stop the background tasks and record pending access times (idempotent)."""
        if self._a.closed or not self._loop.alive:
            return
        self._loop.run(self._a.close())

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<chainfs.KVCache {self.directory!r}{' closed' if self.closed else ''}>"
