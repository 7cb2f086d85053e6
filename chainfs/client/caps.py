"""The capabilities one connection holds, for its storage requests.

Meta hands them out with opens and with stats that ask for them
(``want_capability``); storage wants one with every request about a file's
chunks. They are kept by (inode, right), at most ``max_entries`` (least
recently used dropped first). One about to expire (within ``renew_before_ms``)
or refused by storage is fetched again from meta by inode, with meta checking
the caller's access again.

A cluster without a cluster secret signs none: until meta ever sent one, a
missing capability is not fetched (storage of such a cluster asks for none;
one that does answers BAD_CAPABILITY and the storage client asks ``get`` again
with ``fetch=True``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable

from chainfs.common.auth.capability import READ, WRITE
from chainfs.proto import common_pb2 as cpb

# (inodes, right) -> nothing: asks meta, whose replies reach put() (MetaClient.on_capability).
Fetch = Callable[[list[int], int], Awaitable[object]]


def _now_ms() -> int:
    return int(time.time() * 1000)


class CapabilityCache:
    def __init__(
        self, fetch: Fetch, renew_before_ms: int, max_entries: int, fetch_batch: int
    ) -> None:
        assert renew_before_ms >= 0 and max_entries > 0 and fetch_batch > 0
        self._fetch = fetch
        self.renew_before_ms = renew_before_ms
        self.max_entries = max_entries
        self.fetch_batch = fetch_batch
        self._caps: OrderedDict[tuple[int, int], cpb.Capability] = OrderedDict()
        # Changes come from the loop and from callers' threads (a sync KV-cache
        # lookup's reply); reads of one entry (peek) need no lock.
        self._lock = threading.Lock()
        self.signed = False  # meta has sent a capability: this cluster checks them

    def __len__(self) -> int:
        return len(self._caps)

    def put(self, cap: cpb.Capability) -> None:
        """Keep ``cap`` for each right it grants."""
        self.signed = True
        with self._lock:
            for right in (READ, WRITE):
                if cap.rights & right:
                    self._caps[(cap.inode, right)] = cap
                    self._caps.move_to_end((cap.inode, right))
            while len(self._caps) > self.max_entries:
                self._caps.popitem(last=False)

    def usable_until_ms(self, inode: int, right: int) -> int | None:
        """When the capability held for (``inode``, ``right``) is due for renewal
        (wall clock ms); None when none is held."""
        cap = self._caps.get((inode, right))
        return None if cap is None else cap.expires_ms - self.renew_before_ms

    def forget(self, inodes: Iterable[int]) -> None:
        with self._lock:
            for ino in inodes:
                for right in (READ, WRITE):
                    self._caps.pop((ino, right), None)

    def peek(self, inode: int, right: int) -> cpb.Capability | None:
        """The capability held for (``inode``, ``right``) if fresh, else None.
        Changes nothing, so callers on other threads than the loop's may use
        it (one dict read: atomic under the GIL)."""
        cap = self._caps.get((inode, right))
        if cap is None or cap.expires_ms - _now_ms() <= self.renew_before_ms:
            return None
        return cap

    def _fresh(self, inode: int, right: int, now_ms: int) -> cpb.Capability | None:
        cap = self._caps.get((inode, right))
        if cap is None or cap.expires_ms - now_ms <= self.renew_before_ms:
            return None
        with contextlib.suppress(KeyError):  # dropped by another thread just now
            self._caps.move_to_end((inode, right))
        return cap

    async def get(
        self, inodes: Collection[int], right: int, fetch: bool = False
    ) -> dict[int, cpb.Capability]:
        """A fresh capability granting ``right`` for each inode that has one.
        Missing ones are fetched from meta when this cluster signs them (or
        ``fetch``); an inode meta grants nothing for is absent from the answer."""
        now = _now_ms()
        out: dict[int, cpb.Capability] = {}
        missing: list[int] = []
        for ino in inodes:
            cap = self._fresh(ino, right, now)
            if cap is not None:
                out[ino] = cap
            else:
                missing.append(ino)
        if missing and (self.signed or fetch):
            for lo in range(0, len(missing), self.fetch_batch):
                await self._fetch(missing[lo : lo + self.fetch_batch], right)
            for ino in missing:
                cap = self._caps.get((ino, right))
                if cap is not None:
                    out[ino] = cap
        return out

    async def any_of(self, inode: int, fetch: bool = False) -> cpb.Capability | None:
        """A fresh capability granting READ or WRITE on ``inode`` (a length query
        needs either: writers cut files too); READ is fetched when none is held."""
        now = _now_ms()
        for right in (READ, WRITE):
            cap = self._fresh(inode, right, now)
            if cap is not None:
                return cap
        return (await self.get([inode], READ, fetch)).get(inode)
