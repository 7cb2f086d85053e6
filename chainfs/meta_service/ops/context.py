"""What every namespace operation shares: the per-transaction context
(:class:`OpCtx`), the answer tags of idempotent retries, argument checks
and the limits of the namespace."""

from __future__ import annotations

from typing import Protocol, TypeVar

from google.protobuf.message import Message

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.meta_service import schema
from chainfs.meta_service.alloc import IdLease
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.ctx import Ctx, PathHints
from chainfs.meta_service.perm import S_ISGID, Caller
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb

M = TypeVar("M", bound=Message)

MAX_ID = 0xFFFFFFFE  # uid/gid: (uint32)-1 means "unchanged" in chown(2)
FORMAT_VERSION = 1
ALLOC_FIRST_ID = 1024  # ids below are reserved (root is 1)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
PERMUTATIONS = 64  # random orders of a chain pool kept per pool
MAX_CACHED_POOLS = 256  # chain pools (directory chain lists) with cached orders
STORAGE_ROUNDS = 4  # storage-then-commit attempts when the file keeps changing


class ClusterView(Protocol):
    """What meta needs from the routing info."""

    def chains(self) -> list[int]:
        """Chain ids new files may be placed on."""
        ...

    def capacity(self) -> tuple[int, int]:
        """(usable capacity, used) in bytes."""
        ...


# Tags of the answers kept for idempotent retries (one per mutating method).
class Tag:
    OPEN = 1
    SYNC = 2
    CLOSE = 3
    MKDIR = 4
    UNLINK = 5
    RMDIR = 6
    RENAME = 7
    LINK = 8
    SYMLINK = 9
    SETATTR = 10
    SETXATTR = 11
    REMOVEXATTR = 12
    SETLAYOUT = 13
    MKNOD = 30  # special files and locks (ops/special.py, ops/locks.py)
    FALLOCATE = 31
    LOCK = 32


class StorageFirst(Exception):
    """Raised inside a transaction: this storage step must happen before commit."""

    def __init__(self, kind: str, inode: pb.Inode, size: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.inode = pb.Inode()
        self.inode.CopyFrom(inode)
        self.size = size

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.inode.ino, self.size)


class OpCtx(Ctx):
    """Ctx plus what an operation needs from the server: ids, storage steps done."""

    def __init__(
        self,
        tx: Transaction,
        caller: Caller,
        cfg: MetaConfig,
        lease: IdLease | None,
        storage_done: dict[tuple[str, int, int], int],
        hints: PathHints | None = None,
    ) -> None:
        super().__init__(tx, caller, cfg, hints)
        self.lease = lease
        self.storage_done = storage_done

    async def new_ino(self) -> int:
        """A fresh inode id; the operation creates that inode in this transaction."""
        assert self.lease is not None, "operation did not ask for inode ids"
        ino = await self.lease.take()
        await schema.count_inodes(self.tx, ino, 1)
        return ino

    def storage_truncated(self, inode: pb.Inode, size: int) -> None:
        """Require that storage dropped the bytes of ``inode`` beyond ``size``."""
        if ("truncate", inode.ino, size) not in self.storage_done:
            raise StorageFirst("truncate", inode, size)

    def storage_length(self, inode: pb.Inode) -> int:
        """The length storage reported for ``inode`` (queried first if needed)."""
        got = self.storage_done.get(("length", inode.ino, 0))
        if got is None:
            raise StorageFirst("length", inode, 0)
        return got


def check_client(req: cpb.RequestInfo) -> None:
    if req.client_id and len(req.client_id) != schema.CLIENT_ID_BYTES:
        raise ChainfsError(
            Code.EINVAL,
            f"client_id must be {schema.CLIENT_ID_BYTES} bytes, not {len(req.client_id)}",
        )


def check_mode(mode: int) -> int:
    if not 0 <= mode <= 0o7777:
        raise ChainfsError(Code.EINVAL, f"mode {mode:#o} has bits beyond 0o7777")
    return mode


def owner_gid(parent: pb.Inode, caller: Caller) -> int:
    return parent.gid if parent.mode & S_ISGID else caller.gid


def strip_sgid(mode: int, gid: int, caller: Caller) -> int:
    if mode & S_ISGID and not caller.is_root and not caller.in_group(gid):
        return mode & ~S_ISGID
    return mode


# Answer fields holding directories as a change left them: not kept for
# retries (a directory inode with its layout would double an IDEM record), so a
# replayed answer goes without them and clients ask meta when they need them.
_DIR_ATTR_FIELDS = ("parent", "src_parent", "dst_parent", "replaced")
_dropped_fields: dict[type[Message], tuple[str, ...]] = {}


def encode_answer(tag: int, rsp: Message) -> bytes:
    """An answer as kept for retries: its tag, then the answer without directory attributes."""
    names = _dropped_fields.get(type(rsp))
    if names is None:
        fields = rsp.DESCRIPTOR.fields_by_name
        names = tuple(
            n for n in _DIR_ATTR_FIELDS if n in fields and fields[n].message_type is not None
        )
        _dropped_fields[type(rsp)] = names
    present = [n for n in names if rsp.HasField(n)]
    if present:
        kept = type(rsp)()
        kept.CopyFrom(rsp)
        for n in present:
            kept.ClearField(n)
        rsp = kept
    return bytes([tag]) + rsp.SerializeToString()


def decode_answer(rec: bytes, tag: int, rsp_type: type[M]) -> M:
    if not rec or rec[0] != tag:
        raise ChainfsError(Code.EINVAL, "request id reused for a different operation")
    rsp = rsp_type()
    rsp.ParseFromString(rec[1:])
    return rsp
