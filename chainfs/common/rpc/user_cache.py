"""The token directory (token hash -> user) that meta and storage check tokens against.

Fetched from mgmtd (GetUserDirectory, NODE only) with the node's credential:
again every ``refresh_interval_s`` (so a removed user or a rotated token
stops working within that time), and at once on an unknown token (so a new
user works at once), at most once per ``miss_refresh_min_s`` however many
unknown tokens arrive (they wait for it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from chainfs.common.auth.identity import Identity, Kind
from chainfs.common.background import Periodic
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import mgmt_pb2 as mp

if TYPE_CHECKING:
    from chainfs.common.rpc.mgmt_client import MgmtClient

log = logging.getLogger(__name__)


def identity_of(user: mp.User) -> Identity:
    return Identity(
        Kind.USER,
        name=user.name,
        uid=user.uid,
        gid=user.gid,
        groups=frozenset(user.groups) | {user.gid},
        admin=user.admin,
        impersonate=user.impersonate,
    )


class UserCache:
    """A :class:`chainfs.common.auth.authenticator.UserLookup` kept from mgmtd."""

    def __init__(
        self, mgmt: MgmtClient, refresh_interval_s: float, miss_refresh_min_s: float
    ) -> None:
        if refresh_interval_s <= 0 or miss_refresh_min_s <= 0:
            raise ChainfsError(Code.EINVAL, "user cache intervals must be > 0")
        self.mgmt = mgmt
        self.refresh_interval_s = refresh_interval_s
        self.miss_refresh_min_s = miss_refresh_min_s
        self.version = 0
        self._by_hash: dict[str, Identity] = {}
        self._live: set[int] = set()  # id() of each identity in _by_hash
        self._last_fetch = float("-inf")  # monotonic time of the last fetch attempt
        self._lock = asyncio.Lock()

    async def user_of(self, token_hash: str) -> Identity | None:
        who = self._by_hash.get(token_hash)
        if who is not None:
            return who
        # Unknown: fetch (after any fetch in flight, and no sooner than
        # miss_refresh_min_s after the last: unknown tokens cannot flood mgmtd).
        asked = time.monotonic()
        async with self._lock:
            who = self._by_hash.get(token_hash)
            if who is None and self._last_fetch < asked:  # else one began since we asked
                since_s = time.monotonic() - self._last_fetch
                if since_s < self.miss_refresh_min_s:
                    await asyncio.sleep(self.miss_refresh_min_s - since_s)
                try:
                    await self._fetch()
                except ChainfsError as e:  # mgmtd unreachable: answer from what we hold
                    log.warning("cannot refresh the user directory: %s", e)
                who = self._by_hash.get(token_hash)
        return who

    async def refresh(self) -> None:
        async with self._lock:
            await self._fetch()

    async def _fetch(self) -> None:
        self._last_fetch = time.monotonic()
        rsp = await self.mgmt.user_directory(self.version)
        if rsp.unchanged:
            return
        # Keep the object of every token that stays valid: a framed connection
        # holds the identity its HELLO proved, and :meth:`holds` checks it is live.
        fresh: dict[str, Identity] = {}
        for u in rsp.users:
            for h in u.token_hashes:
                who, old = identity_of(u), self._by_hash.get(h)
                fresh[h] = old if old == who and old is not None else who
        self._by_hash = fresh
        self._live = {id(v) for v in fresh.values()}
        self.version = rsp.version
        log.debug("user directory version %d: %d tokens", self.version, len(self._by_hash))

    def holds(self, who: Identity) -> bool:
        """Whether ``who`` (returned by :meth:`user_of` earlier) still stands:
        its token was not revoked (user removed, token rotated) since."""
        return id(who) in self._live

    def admit(self, who: Identity) -> None:
        """Refuse (UNAUTHENTICATED) a framed connection's user whose token was
        revoked after its HELLO: within the refresh interval."""
        if who.kind is Kind.USER and id(who) not in self._live:
            raise ChainfsError(Code.UNAUTHENTICATED, "token revoked")

    def refresher(self) -> Periodic:
        """The background task that keeps the directory fresh."""
        return _Refresher(self)


class _Refresher(Periodic):
    name = "user-directory"

    def __init__(self, cache: UserCache) -> None:
        super().__init__(cache.refresh_interval_s)
        self.cache = cache

    async def round(self) -> bool:
        await self.cache.refresh()  # a failure is logged by Periodic; the next round retries
        return False
