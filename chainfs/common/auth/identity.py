"""The identity a server attached to a caller, and what a method needs of it."""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass, field

from chainfs.common.errors import ChainfsError, Code


class Kind(enum.Enum):
    ANONYMOUS = "anonymous"
    USER = "user"
    NODE = "node"


@dataclass(frozen=True, slots=True)
class Identity:
    """A user (from a token) or a cluster node (from its node key)."""

    kind: Kind
    name: str = ""
    uid: int = 65534
    gid: int = 65534
    groups: frozenset[int] = field(default_factory=frozenset)
    admin: bool = False
    # May act for the uids the kernel names (a multi-user mount); see meta.
    impersonate: bool = False
    node_id: int = 0
    # The hash of the token that proved a user (mgmtd sets it, to re-check a
    # long-lived framed connection against revocation); not part of equality.
    token_hash: str = field(default="", compare=False, repr=False)

    @property
    def is_node(self) -> bool:
        return self.kind is Kind.NODE

    @property
    def is_user(self) -> bool:
        return self.kind is Kind.USER

    def describe(self) -> str:
        """For audit lines and error messages."""
        if self.kind is Kind.NODE:
            return f"node {self.node_id}"
        if self.kind is Kind.USER:
            return f"user {self.name} (uid {self.uid}{', admin' if self.admin else ''})"
        return "anonymous"


ANONYMOUS = Identity(Kind.ANONYMOUS)


def node_identity(node_id: int) -> Identity:
    return Identity(Kind.NODE, name=f"node-{node_id}", uid=0, gid=0, node_id=node_id)


class Need(enum.Enum):
    """What a method requires of its caller."""

    PUBLIC = "public"  # anyone, even anonymous (health, version)
    AUTHENTICATED = "authenticated"  # any user or node
    USER = "user"  # a user (uid/gid come from the token)
    ADMIN = "admin"  # a user flagged admin
    NODE = "node"  # a cluster node
    NODE_OR_ADMIN = "node_or_admin"
    # Storage data plane: a node, or a request carrying a capability that the
    # handler checks against the chunks it names (the handler's job).
    CAPABILITY = "capability"


def require(need: Need, who: Identity, what: str) -> None:
    """Raise UNAUTHENTICATED (no acceptable credential) or EPERM (known caller,
    not allowed) unless ``who`` may call ``what``."""
    if need is Need.PUBLIC or need is Need.CAPABILITY:
        return
    if who.kind is Kind.ANONYMOUS:
        raise ChainfsError(Code.UNAUTHENTICATED, f"{what} needs a credential (token or node key)")
    # Runs on every request: a plain chain, no table built per call.
    kind = who.kind
    if need is Need.AUTHENTICATED:
        ok = True
    elif need is Need.USER:
        ok = kind is Kind.USER
    elif need is Need.ADMIN:
        ok = kind is Kind.USER and who.admin
    elif need is Need.NODE:
        ok = kind is Kind.NODE
    elif need is Need.NODE_OR_ADMIN:
        ok = kind is Kind.NODE or (kind is Kind.USER and who.admin)
    else:
        raise AssertionError(f"unhandled need {need}")
    if not ok:
        raise ChainfsError(Code.EPERM, f"{what} needs {need.value}; {who.describe()} is not")


# The identity of the gRPC call being served (set by the interceptor for the
# handler's task; framed handlers get it from Request.identity instead).
_CURRENT: contextvars.ContextVar[Identity] = contextvars.ContextVar(
    "chainfs_identity", default=ANONYMOUS
)


def current_identity() -> Identity:
    return _CURRENT.get()


def set_current_identity(who: Identity) -> contextvars.Token[Identity]:
    return _CURRENT.set(who)
