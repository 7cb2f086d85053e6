"""The FUSE requests pyfuse3 3.5 does not route (getlk, setlk, flock, fallocate,
plain readdir), wired into its libfuse session with ctypes.

pyfuse3 fills libfuse's ``fuse_lowlevel_ops`` with the handlers it knows and
leaves the rest NULL; libfuse then answers ENOSYS, and the kernel keeps locks
local to this mount and refuses fallocate. After ``pyfuse3.init`` (libfuse
has copied the table into the session) and before the first request (the
kernel's INIT, which is where libfuse advertises POSIX and flock locks when
those handlers are set), :func:`install` writes our ctypes callbacks into the
session's copy, and wraps flush and release, whose ``lock_owner`` pyfuse3
drops, so a close releases the caller's locks (POSIX: every lock of the
process on the file; flock: the open file's lock on its last close).

pyfuse3 registers only READDIRPLUS and takes FUSE_CAP_READDIRPLUS_AUTO out
of the INIT reply, so every listing returned attributes with each entry (a
kernel inode and lookup reference per name). With a plain readdir handler
and AUTO turned back on, the kernel asks READDIRPLUS at the start of a
listing and when lookups in the directory advise it (``ls -l``), plain
READDIR otherwise; a kept listing answers that from the callback itself.

The session is found through pyfuse3's module globals (its symbol table);
the copy of the table inside libfuse's private ``struct fuse_session`` by
comparing it with pyfuse3's own. When anything does not match, nothing is
patched and the mount runs without these requests (as before), with a warning.

Each callback copies what it needs from its arguments (they live on libfuse's
stack), starts a task on the running loop, and returns; the task replies with
``fuse_reply_*``. A kernel INTERRUPT (the caller was signalled) cancels the
task: it answers EINTR.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyfuse3

log = logging.getLogger(__name__)

# Field order of struct fuse_lowlevel_ops (libfuse 3.x, fuse_lowlevel.h).
_OPS = [
    "init",
    "destroy",
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "getlk",
    "setlk",
    "bmap",
    "ioctl",
    "poll",
    "write_buf",
    "retrieve_reply",
    "forget_multi",
    "flock",
    "fallocate",
    "readdirplus",
    "copy_file_range",
    "lseek",
]
_SLOT = {name: i for i, name in enumerate(_OPS)}
_PTR = ctypes.sizeof(ctypes.c_void_p)
_COMPARED_SLOTS = 31  # init .. create: pyfuse3 sets these, so they identify the table
_SESSION_SCAN_BYTES = 1024  # where in struct fuse_session the table may start

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
_FLOCK_RELEASE_BIT = (
    1 << 5
)  # fuse_file_info: writepage, direct_io, keep_cache, flush, nonseekable, flock_release


class FileInfo(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_int),
        ("bits", ctypes.c_uint),
        ("padding2", ctypes.c_uint),
        ("fh", ctypes.c_uint64),
        ("lock_owner", ctypes.c_uint64),
        ("poll_events", ctypes.c_uint32),
    ]


class Flock(ctypes.Structure):
    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int32),
    ]


class FuseCtx(ctypes.Structure):
    _fields_ = [
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("pid", ctypes.c_int32),
        ("umask", ctypes.c_uint32),
    ]


_req = ctypes.c_void_p
_fi_p = ctypes.POINTER(FileInfo)
_GETLK = ctypes.CFUNCTYPE(None, _req, ctypes.c_uint64, _fi_p, ctypes.POINTER(Flock))
_SETLK = ctypes.CFUNCTYPE(None, _req, ctypes.c_uint64, _fi_p, ctypes.POINTER(Flock), ctypes.c_int)
_FLOCK = ctypes.CFUNCTYPE(None, _req, ctypes.c_uint64, _fi_p, ctypes.c_int)
_FALLOCATE = ctypes.CFUNCTYPE(
    None, _req, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, _fi_p
)
_FILE_OP = ctypes.CFUNCTYPE(None, _req, ctypes.c_uint64, _fi_p)  # flush, release
_PY_FILE_OP = ctypes.PYFUNCTYPE(None, _req, ctypes.c_uint64, _fi_p)
_INTERRUPT = ctypes.CFUNCTYPE(None, _req, ctypes.c_void_p)
_READDIR = ctypes.CFUNCTYPE(None, _req, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64, _fi_p)
_INIT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)  # (userdata, fuse_conn_info *)
_PY_INIT = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
# struct fuse_conn_info (libfuse 3.x): proto_major, proto_minor, max_write, max_read,
# max_readahead, capable, want, max_background, congestion_threshold, ... (unsigned)
_CONN_CAPABLE = 5
_CONN_WANT = 6
_CONN_MAX_BACKGROUND = 7
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14  # fuse_common.h (libfuse 3.x)
_CONN_CONGESTION_THRESHOLD = 8


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int


@dataclass(frozen=True)
class LockArgs:
    """A struct flock from the kernel: type F_RDLCK/F_WRLCK/F_UNLCK, length 0 = to the end."""

    type: int
    start: int
    length: int
    pid: int


class LockHandlers(Protocol):
    """What the mount implements for the requests this bridge routes."""

    async def getlk(self, ino: int, owner: int, lock: LockArgs, caller: Caller) -> LockArgs: ...

    async def setlk(
        self, ino: int, owner: int, lock: LockArgs, wait: bool, caller: Caller
    ) -> None: ...

    async def flock(self, ino: int, owner: int, op: int, caller: Caller) -> None: ...

    async def fallocate(
        self, ino: int, fh: int, mode: int, offset: int, length: int, caller: Caller
    ) -> None: ...

    def closing(self, ino: int, fh: int, owner: int, posix: bool, flock: bool) -> None:
        """A flush (posix) or release (flock) of ``fh``: drop ``owner``'s locks."""
        ...

    def readdir_cached(self, fh: int, pos: int, size: int) -> bytes | None:
        """A plain READDIR reply from what the mount keeps; None: ask readdir_plain."""
        ...

    async def readdir_plain(self, fh: int, pos: int, size: int) -> bytes: ...


def _symbols(path: str, names: set[bytes]) -> dict[bytes, int]:
    """st_value of ``names`` from an ELF64 file's static symbol table."""
    data = Path(path).read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    out: dict[bytes, int] = {}
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            st_name, _info, _other, _shndx, st_value, _size = struct.unpack_from(
                "<IBBHQQ", data, off
            )
            start = strtab[4] + st_name
            name = data[start : data.index(b"\0", start)]
            if name in names:
                out[name] = st_value
    return out


def _load_base(path: str) -> int:
    real = str(Path(path).resolve())
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise LookupError(f"{real} is not mapped")


def _session_ops_address() -> int:
    """Address of the ops table inside pyfuse3's libfuse session."""
    so = pyfuse3.__file__
    assert so is not None
    want = {b"__pyx_v_7pyfuse3_session", b"__pyx_v_7pyfuse3_fuse_ops"}
    syms = _symbols(so, want)
    if set(syms) != want:
        raise LookupError("pyfuse3's session and ops symbols not found")
    base = _load_base(so)
    session = ctypes.c_void_p.from_address(base + syms[b"__pyx_v_7pyfuse3_session"]).value
    if not session:
        raise LookupError("pyfuse3 has no session (call after pyfuse3.init)")
    table = ctypes.string_at(base + syms[b"__pyx_v_7pyfuse3_fuse_ops"], _COMPARED_SLOTS * _PTR)
    for off in range(0, _SESSION_SCAN_BYTES, _PTR):
        if ctypes.string_at(session + off, len(table)) == table:
            return session + off
    raise LookupError("pyfuse3's ops table not found in the libfuse session")


class Bridge:
    """The installed callbacks (kept alive here) and the replies they send."""

    def __init__(self, handlers: LockHandlers, max_inflight: int, max_background: int = 0) -> None:
        self.handlers = handlers
        self.max_background = max_background  # 0: the kernel's default (12)
        self.lib = ctypes.CDLL("libfuse3.so.3")
        self.lib.fuse_req_ctx.restype = ctypes.POINTER(FuseCtx)
        self.lib.fuse_req_ctx.argtypes = [_req]
        self.lib.fuse_reply_err.argtypes = [_req, ctypes.c_int]
        self.lib.fuse_reply_lock.argtypes = [_req, ctypes.POINTER(Flock)]
        self.lib.fuse_reply_buf.argtypes = [_req, ctypes.c_char_p, ctypes.c_size_t]
        self.lib.fuse_req_interrupt_func.argtypes = [_req, _INTERRUPT, ctypes.c_void_p]
        self.max_inflight = max_inflight
        self.tasks: dict[int, asyncio.Task[None]] = {}  # req address -> its task
        self.callbacks: list[Any] = []
        self.original: dict[str, Any] = {}
        self._on_interrupt = _INTERRUPT(self._interrupted)

    # -- wiring -----------------------------------------------------------------
    def install(self, table: int) -> None:
        slots = (ctypes.c_void_p * len(_OPS)).from_address(table)
        for name in ("flush", "release"):
            # PYFUNCTYPE: pyfuse3's handlers touch Python objects and need the GIL held.
            address = slots[_SLOT[name]]
            self.original[name] = _PY_FILE_OP(address) if address else None
        address = slots[_SLOT["init"]]
        if not address:
            raise LookupError("pyfuse3 has no init handler")
        self.original["init"] = _PY_INIT(address)
        cb = _INIT(self._init)
        self.callbacks.append(cb)
        slots[_SLOT["init"]] = ctypes.cast(cb, ctypes.c_void_p).value
        for name, proto, fn in (
            ("getlk", _GETLK, self._getlk),
            ("setlk", _SETLK, self._setlk),
            ("flock", _FLOCK, self._flock),
            ("fallocate", _FALLOCATE, self._fallocate),
            ("readdir", _READDIR, self._readdir),
            ("flush", _FILE_OP, self._flush),
            ("release", _FILE_OP, self._release),
        ):
            cb = proto(self._guarded(fn))
            self.callbacks.append(cb)
            slots[_SLOT[name]] = ctypes.cast(cb, ctypes.c_void_p).value

    def _guarded(self, fn: Callable[..., None]) -> Callable[..., None]:
        """A callback that fails answers EIO (an exception would vanish in ctypes
        and leave the caller waiting forever)."""

        def call(req: int, *args: Any) -> None:
            try:
                fn(req, *args)
            except Exception:
                log.exception("%s: EIO", fn.__name__)
                self.lib.fuse_reply_err(req, errno.EIO)

        return call

    def _caller(self, req: int) -> Caller:
        c = self.lib.fuse_req_ctx(req).contents
        return Caller(c.uid, c.gid, c.pid)

    def _start(
        self,
        req: int,
        work: Callable[[], Awaitable[Callable[[], int]]],
        busy_errno: int = errno.ENOLCK,
    ) -> None:
        """Run ``work`` in a task; it returns the reply to send (a callable).
        More than ``max_inflight`` at once: answer ``busy_errno``."""
        if len(self.tasks) >= self.max_inflight:
            self.lib.fuse_reply_err(req, busy_errno)
            return

        async def run() -> None:
            try:
                reply = await work()
            except asyncio.CancelledError:
                reply = self._error(req, errno.EINTR)
            except pyfuse3.FUSEError as e:
                reply = self._error(req, e.errno)
            except OSError as e:
                reply = self._error(req, e.errno or errno.EIO)
            except Exception:
                log.exception("lock/fallocate/readdir request failed: EIO")
                reply = self._error(req, errno.EIO)
            finally:
                self.tasks.pop(req, None)
            reply()

        self.tasks[req] = asyncio.get_running_loop().create_task(run())
        self.lib.fuse_req_interrupt_func(req, self._on_interrupt, None)

    def _interrupted(self, req: int, _data: int) -> None:
        task = self.tasks.get(req)
        if task is not None:
            # Soon, not now: a task cancelled before its first step would never reply.
            asyncio.get_running_loop().call_soon(task.cancel)

    def _error(self, req: int, code: int) -> Callable[[], int]:
        return lambda: self.lib.fuse_reply_err(req, code)

    # -- callbacks (on libfuse's stack: copy, start, return) ----------------------
    def _getlk(self, req: int, ino: int, fi: Any, lk: Any) -> None:
        owner, want, caller = fi.contents.lock_owner, _lock_args(lk.contents), self._caller(req)

        async def work() -> Callable[[], int]:
            got = await self.handlers.getlk(ino, owner, want, caller)
            out = Flock(got.type, 0, got.start, got.length, got.pid)
            return lambda: self.lib.fuse_reply_lock(req, ctypes.byref(out))

        self._start(req, work)

    def _setlk(self, req: int, ino: int, fi: Any, lk: Any, sleep: int) -> None:
        owner, want, caller = fi.contents.lock_owner, _lock_args(lk.contents), self._caller(req)

        async def work() -> Callable[[], int]:
            await self.handlers.setlk(ino, owner, want, bool(sleep), caller)
            return self._error(req, 0)

        self._start(req, work)

    def _flock(self, req: int, ino: int, fi: Any, op: int) -> None:
        owner, caller = fi.contents.lock_owner, self._caller(req)

        async def work() -> Callable[[], int]:
            await self.handlers.flock(ino, owner, op, caller)
            return self._error(req, 0)

        self._start(req, work)

    def _fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: Any) -> None:
        fh, caller = fi.contents.fh, self._caller(req)

        async def work() -> Callable[[], int]:
            await self.handlers.fallocate(ino, fh, mode, offset, length, caller)
            return self._error(req, 0)

        self._start(req, work)

    def _readdir(self, req: int, ino: int, size: int, off: int, fi: Any) -> None:
        fh = fi.contents.fh
        try:
            data = self.handlers.readdir_cached(fh, off, size)
        except pyfuse3.FUSEError as e:
            self.lib.fuse_reply_err(req, e.errno)
            return
        if data is not None:
            self.lib.fuse_reply_buf(req, data, len(data))
            return

        async def work() -> Callable[[], int]:
            got = await self.handlers.readdir_plain(fh, off, size)
            return lambda: self.lib.fuse_reply_buf(req, got, len(got))

        self._start(req, work, busy_errno=errno.EAGAIN)

    def _init(self, userdata: int, conn: int) -> None:
        """pyfuse3's init, then what libfuse puts in its INIT reply: the background
        request bound (async direct I/O and read-ahead are background requests, at
        most 12 in flight by the kernel's default) and READDIRPLUS_AUTO, which
        pyfuse3 turned off (the kernel may now ask our plain readdir)."""
        self.original["init"](userdata, conn)
        fields = (ctypes.c_uint * (_CONN_CONGESTION_THRESHOLD + 1)).from_address(conn)
        if self.max_background:
            fields[_CONN_MAX_BACKGROUND] = self.max_background
            fields[_CONN_CONGESTION_THRESHOLD] = self.max_background * 3 // 4
        if fields[_CONN_CAPABLE] & FUSE_CAP_READDIRPLUS_AUTO:
            fields[_CONN_WANT] |= FUSE_CAP_READDIRPLUS_AUTO
        else:
            log.warning("the kernel offers no READDIRPLUS_AUTO: every listing is READDIRPLUS")

    def _flush(self, req: int, ino: int, fi: Any) -> None:
        self._closing("flush", req, ino, fi, posix=True, flock=False)

    def _release(self, req: int, ino: int, fi: Any) -> None:
        flock = bool(fi.contents.bits & _FLOCK_RELEASE_BIT)
        self._closing("release", req, ino, fi, posix=False, flock=flock)

    def _closing(self, name: str, req: int, ino: int, fi: Any, posix: bool, flock: bool) -> None:
        """Start dropping the owner's locks (pyfuse3's flush/release handler waits
        for it, so close returns after), then hand the request on to pyfuse3."""
        info = fi.contents
        self.handlers.closing(ino, info.fh, info.lock_owner, posix, flock)
        original = self.original[name]
        if original is not None:
            original(req, ino, fi)
        else:
            self.lib.fuse_reply_err(req, 0)


def _lock_args(lk: Any) -> LockArgs:
    return LockArgs(lk.l_type, lk.l_start, lk.l_len, lk.l_pid)


def install(handlers: LockHandlers, max_inflight: int, max_background: int = 0) -> Bridge | None:
    """Route getlk, setlk, flock, fallocate and plain readdir to ``handlers`` and
    (non-zero) ask the kernel for ``max_background`` background requests; None
    (and a warning) when this pyfuse3/libfuse does not look as expected."""
    try:
        table = _session_ops_address()
        bridge = Bridge(handlers, max_inflight, max_background)
        bridge.install(table)
    except (LookupError, OSError, ValueError, struct.error) as e:
        log.warning(
            "locks and fallocate stay local to this mount, listings use READDIRPLUS only: %s", e
        )
        return None
    return bridge
