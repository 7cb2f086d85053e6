"""POSIX permission checks for the caller carried in RequestInfo.

Root (uid 0) bypasses read/write checks and directory search; it may execute
a file only if some execute bit is set (Linux semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb

R, W, X = 4, 2, 1
S_ISUID = 0o4000
S_ISGID = 0o2000
S_ISVTX = 0o1000


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, req: cpb.RequestInfo) -> Caller:
        return cls(req.uid, req.gid, frozenset(req.gids) | {req.gid})

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid in self.groups


ROOT = Caller(0, 0, frozenset({0}))


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
