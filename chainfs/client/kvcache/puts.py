"""Temp files for puts, created ahead of need.

A put writes its value into a file of ``tmp/`` and publishes it: one metadata
commit closes the file (its exact length) and renames it into place (3FS
style: the bytes, then one commit). Creating that file is a commit too, so a
handle keeps up to ``put_prepared_files`` of them created ahead, their write
sessions open, refilled in the background while puts write.

A prepared file is retired (removed) before its write capability is due for
renewal and long before ``tmp_max_age_s``, after which any handle's cleaner
takes a temp file for a dead writer's. Unused ones are removed at close; a
process that dies leaves them to that cleaner (meta ends their sessions when
the process stops sending keep-alives).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import secrets
import time

from chainfs.client.kvcache.backend import KVCacheBackend, NewFile
from chainfs.client.kvcache.config import KVCacheConfig
from chainfs.common.errors import ChainfsError

log = logging.getLogger(__name__)

# A prepared file is retired after this share of tmp_max_age_s.
_MAX_AGE_SHARE = 0.25


class TempFiles:
    """The temp files one cache handle writes values into."""

    def __init__(self, store: KVCacheBackend, tmp_dir: str, config: KVCacheConfig) -> None:
        self._store = store
        self._tmp_dir = tmp_dir
        self._target = config.put_prepared_files
        self._max_age_s = config.tmp_max_age_s * _MAX_AGE_SHARE
        self._ready: collections.deque[tuple[float, NewFile]] = collections.deque()
        self._filler: asyncio.Future[None] | None = None
        self._removals: set[asyncio.Future[None]] = set()
        self._closed = False
        self._new_process()

    def _new_process(self) -> None:
        # Names unique per process and per handle (random tag), then per file.
        self._pid = os.getpid()
        self._prefix = f"{self._pid}-{secrets.token_hex(6)}-"
        self._seq = itertools.count()

    @property
    def prepared(self) -> int:
        """Files created ahead and not yet taken."""
        return len(self._ready)

    async def take(self) -> NewFile:
        """A file to write one value into: a prepared one, else one created now."""
        if os.getpid() != self._pid:
            # A fork()ed child: the prepared files and their sessions are the parent's.
            self._ready.clear()
            self._filler = None
            self._removals = set()
            self._new_process()
        now = time.monotonic()
        while self._ready:
            retire_at, f = self._ready.popleft()
            if now < retire_at:
                self._fill()
                return f
            self._remove_later(f)
        self._fill()
        return await self.create()

    async def create(self) -> NewFile:
        """A new temp file, created now (EEXIST, ENOENT, ... as the create met them)."""
        return await self._store.kv_open_new(f"{self._tmp_dir}/{self._prefix}{next(self._seq)}")

    def drop_prepared(self) -> None:
        """Remove every prepared file (the temp directory was lost, or closing)."""
        while self._ready:
            self._remove_later(self._ready.popleft()[1])

    async def remove(self, f: NewFile, wrote: bool) -> None:
        """Remove a file not published (its value stored elsewhere, or the put failed)."""
        with contextlib.suppress(ChainfsError, OSError):
            await self._store.kv_discard(f, wrote)

    def _fill(self) -> None:
        if self._closed or len(self._ready) >= self._target:
            return
        if self._filler is None or self._filler.done():
            self._filler = asyncio.ensure_future(self._fill_up())

    async def _fill_up(self) -> None:
        while not self._closed and len(self._ready) < self._target:
            try:
                f = await self.create()
            except (ChainfsError, OSError) as e:
                # The next put creates its own file and meets the error itself.
                log.debug("kvcache: preparing a temp file in %s failed: %s", self._tmp_dir, e)
                return
            retire_at = min(f.usable_until_s, time.monotonic() + self._max_age_s)
            self._ready.append((retire_at, f))

    def _remove_later(self, f: NewFile) -> None:
        task = asyncio.ensure_future(self.remove(f, wrote=False))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def close(self) -> None:
        """Remove the prepared files (waits for a creation in flight, then for the removals)."""
        self._closed = True
        if self._filler is not None:
            await asyncio.gather(self._filler, return_exceptions=True)
        self.drop_prepared()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
