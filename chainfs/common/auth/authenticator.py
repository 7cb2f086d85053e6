"""Turning a presented :class:`Credential` into an :class:`Identity`."""

from __future__ import annotations

from typing import Protocol

from chainfs.common.auth.identity import ANONYMOUS, Identity, node_identity
from chainfs.common.auth.secret import check_node_key
from chainfs.common.auth.tokens import token_hash
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb


class UserLookup(Protocol):
    """Where a server finds the user a token hash belongs to (mgmtd reads its
    store; meta and storage keep a cache they refresh from mgmtd)."""

    async def user_of(self, token_hash: str) -> Identity | None: ...


class Authenticator:
    """Checks node keys against the cluster secret and user tokens against ``users``.

    A server without ``users`` accepts nodes only. An empty credential is
    anonymous (the policy then refuses all but public methods); a wrong one
    is UNAUTHENTICATED at once, so a typo never looks like "permission denied".
    """

    def __init__(self, secret: bytes, users: UserLookup | None = None) -> None:
        self._secret = secret
        self._users = users

    async def authenticate(self, cred: cpb.Credential) -> Identity:
        if cred.node_id or cred.node_key:
            if not check_node_key(self._secret, cred.node_id, cred.node_key):
                raise ChainfsError(Code.UNAUTHENTICATED, f"bad node key for node {cred.node_id}")
            return node_identity(cred.node_id)
        if cred.token:
            who = None if self._users is None else await self._users.user_of(token_hash(cred.token))
            if who is None:
                raise ChainfsError(Code.UNAUTHENTICATED, "unknown or revoked token")
            return who
        return ANONYMOUS
