"""Error codes shared by every service and the client.

A chainfs error code is an integer. Codes below 10000 *are* errno values, so a
POSIX failure travels unchanged from meta or storage to the user. Codes from
10000 up are chainfs conditions (stale chain version, not committed, ...); each
maps to the errno a user sees if it ever escapes the retry logic.
"""

from __future__ import annotations

import errno as _errno
import os as _os
from enum import IntEnum


class Code(IntEnum):
    OK = 0
    # POSIX codes: value == errno.
    EPERM = _errno.EPERM
    ENOENT = _errno.ENOENT
    EIO = _errno.EIO
    EBADF = _errno.EBADF
    EAGAIN = _errno.EAGAIN
    EACCES = _errno.EACCES
    EBUSY = _errno.EBUSY
    EEXIST = _errno.EEXIST
    EXDEV = _errno.EXDEV
    ENOTDIR = _errno.ENOTDIR
    EISDIR = _errno.EISDIR
    EINVAL = _errno.EINVAL
    EFBIG = _errno.EFBIG
    ENOSPC = _errno.ENOSPC
    EROFS = _errno.EROFS
    EMLINK = _errno.EMLINK
    ERANGE = _errno.ERANGE
    ENAMETOOLONG = _errno.ENAMETOOLONG
    ENOSYS = _errno.ENOSYS
    ENOTEMPTY = _errno.ENOTEMPTY
    ELOOP = _errno.ELOOP
    ENODATA = _errno.ENODATA
    EOPNOTSUPP = _errno.EOPNOTSUPP
    EADDRINUSE = _errno.EADDRINUSE
    ETIMEDOUT = _errno.ETIMEDOUT
    ECONNREFUSED = _errno.ECONNREFUSED
    EHOSTUNREACH = _errno.EHOSTUNREACH
    E2BIG = _errno.E2BIG
    EBADMSG = _errno.EBADMSG
    ESTALE = _errno.ESTALE
    ENOLCK = _errno.ENOLCK
    EINTR = _errno.EINTR
    ENXIO = _errno.ENXIO
    ESPIPE = _errno.ESPIPE
    ENODEV = _errno.ENODEV
    # chainfs conditions.
    STALE_CHAIN_VERSION = 10001  # request carried an old chain version: refresh routing, retry
    NOT_COMMITTED = 10002  # CRAQ: chunk has a pending version on this replica
    CHECKSUM_MISMATCH = 10003  # data does not match its CRC32C
    TARGET_NOT_SERVING = 10004  # target is not in a state that serves this request
    NOT_PRIMARY = 10005  # this mgmtd is not the primary; retry elsewhere
    TXN_CONFLICT = 10006  # KV transaction lost an optimistic conflict (after retries)
    TXN_TOO_OLD = 10007  # KV transaction outlived its snapshot
    UNKNOWN_NODE = 10008
    UNKNOWN_TARGET = 10009
    UNKNOWN_CHAIN = 10010
    ALREADY_REGISTERED = 10011
    NOT_ENOUGH_NODES = 10012
    CHUNK_NOT_FOUND = 10013
    FENCED = 10014  # storage node lost mgmtd contact and stopped serving
    UNAVAILABLE = 10015  # peer unreachable
    BAD_FRAME = 10016  # malformed data-plane frame
    NOT_PRIMARY_META = 10017
    CONFIG_ERROR = 10018
    STORE_LOCKED = 10019  # another process holds the embedded store
    UNAUTHENTICATED = 10020  # no credential, or one the server does not accept
    BAD_CAPABILITY = 10021  # data-plane capability missing, expired, forged or for another inode
    # storage: a forwarded update does not follow the replica's version
    CHUNK_VERSION_MISMATCH = 10030
    INTERNAL = 10099


# Errno a user sees for each chainfs condition.
_ERRNO_OF: dict[Code, int] = {
    Code.STALE_CHAIN_VERSION: _errno.EAGAIN,
    Code.NOT_COMMITTED: _errno.EAGAIN,
    Code.CHECKSUM_MISMATCH: _errno.EIO,
    Code.TARGET_NOT_SERVING: _errno.EAGAIN,
    Code.NOT_PRIMARY: _errno.EAGAIN,
    Code.TXN_CONFLICT: _errno.EAGAIN,
    Code.TXN_TOO_OLD: _errno.EAGAIN,
    Code.UNKNOWN_NODE: _errno.ENOENT,
    Code.UNKNOWN_TARGET: _errno.ENOENT,
    Code.UNKNOWN_CHAIN: _errno.ENOENT,
    Code.ALREADY_REGISTERED: _errno.EEXIST,
    Code.NOT_ENOUGH_NODES: _errno.EINVAL,
    Code.CHUNK_NOT_FOUND: _errno.ENOENT,
    Code.FENCED: _errno.EAGAIN,
    Code.UNAVAILABLE: _errno.EIO,
    Code.BAD_FRAME: _errno.EPROTO,
    Code.NOT_PRIMARY_META: _errno.EAGAIN,
    Code.CONFIG_ERROR: _errno.EINVAL,
    Code.STORE_LOCKED: _errno.EBUSY,
    Code.UNAUTHENTICATED: _errno.EACCES,
    Code.BAD_CAPABILITY: _errno.EACCES,
    Code.CHUNK_VERSION_MISMATCH: _errno.EAGAIN,
    Code.INTERNAL: _errno.EIO,
}

# Conditions a caller may retry (after refreshing routing where relevant).
RETRYABLE: frozenset[int] = frozenset(
    {
        Code.STALE_CHAIN_VERSION,
        Code.NOT_COMMITTED,
        Code.TARGET_NOT_SERVING,
        Code.NOT_PRIMARY,
        Code.TXN_CONFLICT,
        Code.FENCED,
        Code.UNAVAILABLE,
        Code.EAGAIN,
        Code.CHECKSUM_MISMATCH,
    }
)


def errno_of(code: int) -> int:
    """The errno a user sees for a chainfs error code."""
    if 0 < code < 10000:
        return code
    try:
        return _ERRNO_OF[Code(code)]
    except (ValueError, KeyError):
        return _errno.EIO


def code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return f"CODE_{code}"


class ChainfsError(OSError):
    """An error with a chainfs code. Subclass of OSError with the mapped errno.

    Raise it inside services; it crosses gRPC and the data plane intact.
    Use :func:`to_user_error` at the user boundary to get the builtin subclass
    (FileNotFoundError, FileExistsError, ...) that code written for local files
    expects.
    """

    def __init__(self, code: int, message: str = "", path: str | None = None) -> None:
        self.code = int(code)
        self.message = message or code_name(code)
        if path is None:
            super().__init__(errno_of(self.code), self.message)
        else:
            super().__init__(errno_of(self.code), self.message, path)

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    def __reduce__(self) -> tuple[type[ChainfsError], tuple[int, str, str | None]]:
        return (type(self), (self.code, self.message, self.filename))

    def __str__(self) -> str:
        if self.filename is None:
            return f"[{code_name(self.code)}] {self.message}"
        return f"[{code_name(self.code)}] {user_message(self, self.filename)}: {self.filename!r}"


# Errors whose path says everything: the user reads the system's own words and
# the path they gave, never meta's inner detail (inode numbers, component names).
_PATH_ERRNOS = frozenset(
    {
        _errno.ENOENT,
        _errno.EEXIST,
        _errno.ENOTDIR,
        _errno.EISDIR,
        _errno.ENOTEMPTY,
        _errno.EACCES,
        _errno.EPERM,
        _errno.ELOOP,
        _errno.ENAMETOOLONG,
    }
)


def user_message(err: ChainfsError, path: str | None) -> str:
    """What a user reads first: with a path, the errno's text (and meta's detail
    only where it says more than the path does); without one, meta's message."""
    if path is None:
        return err.message
    number = errno_of(err.code)
    text = _os.strerror(number)
    return text if number in _PATH_ERRNOS else f"{text} ({err.message})"


def to_user_error(err: ChainfsError, path: str | None = None) -> OSError:
    """The builtin OSError subclass for ``err`` (FileNotFoundError for ENOENT, ...),
    naming ``path`` (or the error's own filename) as the file it is about."""
    where = path if path is not None else err.filename
    message = user_message(err, where)
    if where is None:
        out = OSError(errno_of(err.code), message)
    else:
        out = OSError(errno_of(err.code), message, where)
    out.__cause__ = err
    return out
