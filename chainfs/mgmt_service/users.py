"""Users and their tokens, kept in mgmtd's KV store (3FS ``user-add`` model).

A token is shown once (when added or rotated); the store keeps only its hash,
indexed so that checking a token is one lookup. Every change bumps the
directory version that meta and storage poll (GetUserDirectory).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

from chainfs.common.auth.identity import Identity
from chainfs.common.auth.tokens import new_token, read_token_file, token_hash, write_token_file
from chainfs.common.dataplane.server import Handler, Request, Response
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.user_cache import identity_of
from chainfs.kv import KVStore, Transaction, prefix_end
from chainfs.mgmt_service.schema import (
    KEY_USER,
    KEY_USERS_VERSION,
    token_key,
    user_key,
)
from chainfs.proto import mgmt_pb2 as mp

log = logging.getLogger(__name__)

ADMIN_USER = "admin"
MAX_GROUPS = 64
MAX_ID = (1 << 32) - 1
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def public(user: mp.User) -> mp.User:
    """``user`` without its token hashes (what admin tools see)."""
    out = mp.User()
    out.CopyFrom(user)
    del out.token_hashes[:]
    return out


def _validate(user: mp.User) -> None:
    if not _NAME_RE.fullmatch(user.name):
        raise ChainfsError(
            Code.EINVAL, f"user name {user.name!r}: 1-64 of A-Z a-z 0-9 . _ - (not starting . -)"
        )
    if len(user.groups) > MAX_GROUPS:
        raise ChainfsError(Code.EINVAL, f"more than {MAX_GROUPS} groups")
    for n in (user.uid, user.gid, *user.groups):
        if not 0 <= n < MAX_ID:  # 2^32-1 is (uid_t)-1: "no change" to chown
            raise ChainfsError(Code.EINVAL, f"uid/gid {n} out of range")


async def _bump(tx: Transaction) -> None:
    version = int(await tx.get(KEY_USERS_VERSION) or b"0") + 1
    tx.set(KEY_USERS_VERSION, str(version).encode())


async def _get(tx: Transaction, name: str) -> mp.User:
    raw = await tx.get(user_key(name))
    if raw is None:
        raise ChainfsError(Code.ENOENT, f"no user {name!r}")
    return mp.User.FromString(raw)


async def _all(tx: Transaction) -> list[mp.User]:
    pairs = await tx.get_range(KEY_USER, prefix_end(KEY_USER))
    return [mp.User.FromString(v) for _, v in pairs]


def _preset_token(path: Path) -> str | None:
    """The token an operator put in ``path`` before the first start, if any."""
    return read_token_file(path) if path.exists() else None


class UserStore:
    """The users of one cluster; also mgmtd's own :class:`UserLookup`."""

    def __init__(self, store: KVStore, max_users: int) -> None:
        self.store = store
        self.max_users = max_users

    async def user_of(self, token_hash_hex: str) -> Identity | None:
        async def fn(tx: Transaction) -> mp.User | None:
            name = await tx.get(token_key(token_hash_hex))
            raw = await tx.get(user_key(name.decode())) if name is not None else None
            return mp.User.FromString(raw) if raw is not None else None

        user = await self.store.transact(fn, read_only=True)
        if user is None:
            return None
        return dataclasses.replace(identity_of(user), token_hash=token_hash_hex)

    def revocation_guard(self, handler: Handler, interval_s: float, bound: int) -> Handler:
        """``handler`` refusing (UNAUTHENTICATED) the requests of framed
        connections whose token was revoked after their HELLO: each token is
        looked up again at most every ``interval_s``."""
        checked: dict[str, float] = {}  # token hash -> monotonic time it last stood

        async def guarded(req: Request) -> Response:
            who = req.identity
            if who.is_user and who.token_hash:
                now = time.monotonic()
                at = checked.get(who.token_hash)
                if at is None or now - at >= interval_s:
                    if await self.user_of(who.token_hash) != who:
                        checked.pop(who.token_hash, None)
                        raise ChainfsError(Code.UNAUTHENTICATED, "token revoked or user changed")
                    checked.pop(who.token_hash, None)
                    if len(checked) >= bound:
                        del checked[next(iter(checked))]  # the oldest check
                    checked[who.token_hash] = now
            return await handler(req)

        return guarded

    async def add(self, user: mp.User, token: str | None = None) -> tuple[mp.User, str]:
        """Store a new user with a fresh token (or ``token``); EEXIST if the name is taken."""
        _validate(user)
        token = token or new_token()
        stored = mp.User()
        stored.CopyFrom(user)
        stored.groups[:] = sorted(set(user.groups))
        stored.token_hashes[:] = [token_hash(token)]

        async def fn(tx: Transaction) -> None:
            if await tx.get(user_key(user.name)) is not None:
                raise ChainfsError(Code.EEXIST, f"user {user.name!r} exists")
            if len(await tx.get_range(KEY_USER, prefix_end(KEY_USER), self.max_users)) >= (
                self.max_users
            ):
                raise ChainfsError(Code.ENOSPC, f"already {self.max_users} users (max_users)")
            tx.set(user_key(user.name), stored.SerializeToString())
            tx.set(token_key(stored.token_hashes[0]), user.name.encode())
            await _bump(tx)

        await self.store.transact(fn)
        log.info("user %s added (uid %d, gid %d)", user.name, user.uid, user.gid)
        return public(stored), token

    async def list(self) -> list[mp.User]:
        async def fn(tx: Transaction) -> list[mp.User]:
            return await _all(tx)

        return [public(u) for u in await self.store.transact(fn, read_only=True)]

    async def remove(self, name: str) -> None:
        async def fn(tx: Transaction) -> None:
            user = await _get(tx, name)
            for h in user.token_hashes:
                tx.clear(token_key(h))
            tx.clear(user_key(name))
            await _bump(tx)

        await self.store.transact(fn)
        log.info("user %s removed", name)

    async def rotate(self, name: str) -> str:
        """A new token for ``name``; every older one stops working."""
        token = new_token()

        async def fn(tx: Transaction) -> None:
            user = await _get(tx, name)
            for h in user.token_hashes:
                tx.clear(token_key(h))
            user.token_hashes[:] = [token_hash(token)]
            tx.set(user_key(name), user.SerializeToString())
            tx.set(token_key(user.token_hashes[0]), name.encode())
            await _bump(tx)

        await self.store.transact(fn)
        log.info("user %s: token rotated", name)
        return token

    async def directory(self, known_version: int) -> mp.GetUserDirectoryRsp:
        async def fn(tx: Transaction) -> mp.GetUserDirectoryRsp:
            version = int(await tx.get(KEY_USERS_VERSION) or b"0")
            if known_version and known_version == version:
                return mp.GetUserDirectoryRsp(version=version, unchanged=True)
            return mp.GetUserDirectoryRsp(version=version, users=await _all(tx))

        rsp: mp.GetUserDirectoryRsp = await self.store.transact(fn, read_only=True)
        return rsp

    async def bootstrap_admin(self, token_file: Path) -> bool:
        """First start (no users yet): create user "admin" (uid 0, gid 0) whose
        token is the one already in ``token_file`` (an operator's choice) or a
        new one written there (0600). True if the admin was created now."""
        token = _preset_token(token_file) or new_token()

        async def fn(tx: Transaction) -> bool:
            if await tx.get_range(KEY_USER, prefix_end(KEY_USER), 1):
                return False
            admin = mp.User(name=ADMIN_USER, uid=0, gid=0, admin=True)
            admin.token_hashes.append(token_hash(token))
            tx.set(user_key(ADMIN_USER), admin.SerializeToString())
            tx.set(token_key(admin.token_hashes[0]), ADMIN_USER.encode())
            await _bump(tx)
            return True

        created: bool = await self.store.transact(fn)
        if created:
            write_token_file(token_file, token)
            log.info("created user %s; its token is in %s", ADMIN_USER, token_file)
        return created
