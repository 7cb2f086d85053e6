"""POSIX permission checks for the caller the request's token names.

The caller's uid/gid/groups come from the authenticated identity, never from
the request. A token allowed to ``impersonate`` (a multi-user FUSE mount)
acts for the uid/gid/groups the request claims (the kernel's, for each
process), with ``root_squash``: a claimed uid 0 becomes nobody (65534)
unless the token's user is an admin. A server without authentication (no
cluster secret) believes the request's claims.

Root (uid 0) bypasses read/write checks and directory search; it may execute
a file only if some execute bit is set (Linux semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

from chainfs.common.auth.identity import Identity, Kind, current_identity
from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb

R, W, X = 4, 2, 1
S_ISUID = 0o4000
S_ISGID = 0o2000
S_ISVTX = 0o1000
NOBODY = 65534  # what a squashed root becomes


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, req: cpb.RequestInfo) -> Caller:
        who = current_identity()
        if who.kind is Kind.USER and not who.impersonate:
            # The same identity object serves every request of a connection: its
            # Caller is made once (kept with the identity, so the id is not reused).
            known = _TOKEN_CALLERS.get(id(who))
            if known is not None and known[0] is who:
                return known[1]
            caller = cls(who.uid, who.gid, who.groups | {who.gid})
            if len(_TOKEN_CALLERS) >= MAX_CACHED_CALLERS:
                _TOKEN_CALLERS.clear()  # bounded; refills from the next requests
            _TOKEN_CALLERS[id(who)] = (who, caller)
            return caller
        if who.kind is Kind.USER or who.kind is Kind.ANONYMOUS:
            # An impersonating user, or a server without authentication (its
            # access policy admits no anonymous caller otherwise).
            return cls.claimed(req, squash_root=not who.admin and who.kind is Kind.USER)
        raise ChainfsError(Code.EPERM, f"{who.describe()} may not act on the namespace")

    @classmethod
    def claimed(cls, req: cpb.RequestInfo, squash_root: bool) -> Caller:
        """The uid/gid the request claims (root_squash: claimed root is nobody)."""
        if squash_root and req.uid == 0:
            return cls(NOBODY, NOBODY, frozenset({NOBODY}))
        return cls(req.uid, req.gid, frozenset(req.gids) | {req.gid})

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid in self.groups


ROOT = Caller(0, 0, frozenset({0}))

MAX_CACHED_CALLERS = 4096  # token identities whose Caller is kept (about one per connection)
# id(identity) -> (that identity, its Caller): Caller.of of a token's user.
_TOKEN_CALLERS: dict[int, tuple[Identity, Caller]] = {}


def allowed(inode: pb.Inode, want: int, caller: Caller) -> bool:
    """Whether ``caller`` has every access bit in ``want`` (R|W|X) on ``inode``."""
    if caller.is_root:
        if want & X and inode.type != pb.DIRECTORY:
            return bool(inode.mode & 0o111)
        return True
    if caller.uid == inode.uid:
        bits = (inode.mode >> 6) & 7
    elif caller.in_group(inode.gid):
        bits = (inode.mode >> 3) & 7
    else:
        bits = inode.mode & 7
    return bits & want == want


def check(inode: pb.Inode, want: int, caller: Caller, what: str = "") -> None:
    if not allowed(inode, want, caller):
        raise ChainfsError(Code.EACCES, f"permission denied{': ' + what if what else ''}")


def is_owner(inode: pb.Inode, caller: Caller) -> bool:
    return caller.is_root or caller.uid == inode.uid


def check_sticky(directory: pb.Inode, victim: pb.Inode, caller: Caller) -> None:
    """In a sticky directory only the owner of the entry or of the directory
    (or root) may remove or rename the entry."""
    if directory.mode & S_ISVTX and not (
        caller.is_root or caller.uid == victim.uid or caller.uid == directory.uid
    ):
        raise ChainfsError(Code.EPERM, "sticky directory: not the owner")
