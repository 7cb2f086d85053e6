"""Open files: the async core (`AsyncFile`) and the sync `io.BufferedIOBase` twin (`File`).

Writes are copied once into chunk-sized write-back buffers; a buffer is sent
as one chunk request as soon as its chunk is complete (or on flush, seek
elsewhere, close), several in flight at once, bounded per file and by the
FileSystem's byte budget. A failed background write is raised by the next
write, flush or close. close() and fsync() report the file length to meta.

Reads at least as long as the file's read buffer go straight into the
caller's buffer, split into chunk requests sent in parallel; shorter reads go
through the read buffer refilled by the same path. The buffer follows
builtin ``open``'s ``buffering``: 0 = unbuffered (a read fetches exactly what
it asks, a write is pushed to storage before it returns), N > 1 = N bytes,
-1 = adaptive: a refill fetches ``read_ahead_min_bytes`` after a jump and
doubles while reads continue where the previous one ended, up to
``read_buffer_bytes`` (small random reads stay small, sequential ones grow).
A file sees its own writes (pending ones are flushed before a read). Holes
read as zeros. The length a reader sees is the one meta had at open
(close-to-open consistency), extended by the file's own writes. A read-only
open holds a meta read session until close, so the file stays readable after
another client unlinks it or renames over it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from chainfs.client import posix_io
from chainfs.client.chunk_io import ChunkIO, OpenHandle
from chainfs.client.layout import Layout, Piece, split

# Any bytes-like object (collections.abc.Buffer needs Python 3.12).
Buffer = Any


@dataclass(frozen=True)
class Mode:
    """What a mode string ('r', 'wb', 'a+', 'x', ...) asks for."""

    readable: bool
    writable: bool
    append: bool
    create: bool
    truncate: bool
    exclusive: bool
    binary: bool

    @classmethod
    def parse(cls, mode: str) -> Mode:
        chars = set(mode)
        if len(chars) != len(mode) or not chars <= set("rwaxbt+") or not mode:
            raise ValueError(f"invalid mode: {mode!r}")
        kinds = chars & set("rwax")
        if len(kinds) != 1:
            raise ValueError(f"mode {mode!r} needs exactly one of r, w, a, x")
        if "b" in chars and "t" in chars:
            raise ValueError(f"mode {mode!r} cannot be both binary and text")
        kind = kinds.pop()
        plus = "+" in chars
        return cls(
            readable=kind == "r" or plus,
            writable=kind != "r" or plus,
            append=kind == "a",
            create=kind in "wax",
            truncate=kind == "w",
            exclusive=kind == "x",
            binary="b" in chars,
        )

    def binary_mode(self) -> str:
        """The equivalent binary mode string (for `name`/`mode` attributes)."""
        if self.append:
            base = "a"
        elif self.exclusive:
            base = "x"
        elif self.truncate:
            base = "w"
        else:
            base = "r"
        plus = "+" if (self.readable and self.writable) else ""
        return f"{base}b{plus}"


@dataclass
class _Segment:
    """One piece of read-ahead: ``buf`` is being filled with the file's bytes at ``offset``."""

    offset: int
    buf: bytearray
    task: asyncio.Future[None]

    @property
    def end(self) -> int:
        return self.offset + len(self.buf)


# readline on an unbuffered file fetches this much at a time while looking for b"\n".
_UNBUFFERED_LINE_STEP_BYTES = 8 * 1024


def _closed_error() -> ValueError:
    return ValueError("I/O operation on closed file.")


class AsyncFile:
    """A file of an AsyncFileSystem. Methods are coroutines except tell/readable/...

    Its bytes move through ``chunk_io`` (the connection's engine); ``on_close`` is
    called with the file when it closes (its FileSystem forgets it then)."""

    def __init__(
        self,
        chunk_io: ChunkIO,
        handle: OpenHandle,
        mode: Mode,
        buffering: int = -1,
        on_close: Callable[[AsyncFile], None] | None = None,
    ) -> None:
        if buffering < -1:
            raise ValueError(f"invalid buffering {buffering}")
        self._io = chunk_io
        self._on_close = on_close
        self._h = handle
        self._mode = mode
        self.name = handle.path
        self.mode = mode.binary_mode()
        self._pos = handle.size if mode.append else 0
        self._size = handle.size  # meta's length at open, extended by our writes
        self._closed = False
        # Write-back: one contiguous, not yet sent run inside one chunk.
        self._wbuf = bytearray()
        self._wbuf_offset = 0  # file offset of _wbuf[0]
        self._inflight: dict[int, asyncio.Task[None]] = {}  # chunk index -> last send
        self._inflight_sem = asyncio.Semaphore(chunk_io.config.max_inflight_writes_per_file)
        self._write_error: BaseException | None = None
        # A failed write leaves a hole: file offset of the first failed byte, and
        # the length up to which every write was acknowledged at the last clean drain.
        self._torn_at: int | None = None
        self._clean_size = handle.size
        self._dirty = False  # wrote since the length was last reported
        self._wrote = False  # wrote at all (close then has meta fix length and mtime)
        # Read buffer: bytes of [_rbuf_offset, _rbuf_offset + len(_rbuf)).
        self._rbuf = memoryview(b"")
        self._rbuf_offset = 0
        # buffering: 0 unbuffered, N fixed, -1 adaptive (window grows on sequential reads).
        self._unbuffered = buffering == 0
        self._adaptive = buffering == -1
        max_window = chunk_io.config.read_buffer_bytes if buffering < 0 else buffering
        self._max_window = max_window
        self._window = (
            min(chunk_io.config.read_ahead_min_bytes, max_window) if buffering < 0 else buffering
        )
        self._last_read_end = 0  # file offset where the previous read stopped
        self._locks: posix_io.LockWaiter | None = None  # advisory locks taken through this file
        # Read-ahead (read-only buffered files): contiguous segments ahead of the reader.
        self._ra: collections.deque[_Segment] = collections.deque()
        self._ra_bytes = 0  # bytes of the segments in _ra (taken from the connection's budget)
        # Chunk-sized buffers of consumed segments, kept for the next ones (still counted
        # in the budget): fresh ones cost a page fault per page on first write.
        self._ra_spares: list[bytearray] = []
        self._fetch_end = 0  # where the previous fetch from storage ended
        self._fetch_streak = 0  # bytes fetched in a row ending there
        self._read_ahead = (
            not mode.writable and buffering != 0 and chunk_io.config.read_ahead_bytes > 0
        )

    # -- state ---------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def inode(self) -> int:
        return self._h.inode

    @property
    def layout(self) -> Layout:
        return self._h.layout

    def readable(self) -> bool:
        self._check_open()
        return self._mode.readable

    def writable(self) -> bool:
        self._check_open()
        return self._mode.writable

    def seekable(self) -> bool:
        self._check_open()
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def size(self) -> int:
        """The file's length as this handle sees it."""
        return max(self._size, self._wbuf_offset + len(self._wbuf))

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error()

    def _check_readable(self) -> None:
        self._check_open()
        if not self._mode.readable:
            raise io.UnsupportedOperation(f"{self.name}: file not open for reading")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._mode.writable:
            raise io.UnsupportedOperation(f"{self.name}: file not open for writing")

    def _check_length(self, length: int) -> None:
        """EFBIG, before anything is buffered or sent, past the largest length of the layout."""
        if length > self._h.layout.max_file_bytes:
            raise OSError(
                errno.EFBIG,
                f"file too large: length {length} beyond {self._h.layout.max_file_bytes}",
                self.name,
            )

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            err, self._write_error = self._write_error, None
            raise err

    # -- seek ----------------------------------------------------------------
    def seek_sync(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position; no I/O (pending writes stay buffered)."""
        self._check_open()
        if whence == os.SEEK_SET:
            new = offset
        elif whence == os.SEEK_CUR:
            new = self._pos + offset
        elif whence == os.SEEK_END:
            new = self.size() + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if new < 0:
            raise OSError(errno.EINVAL, f"negative seek position {new}", self.name)
        self._pos = new
        return new

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.seek_sync(offset, whence)

    # -- write ---------------------------------------------------------------
    def try_write_buffered(self, data: Buffer) -> int | None:
        """Fast path without I/O: append to the write buffer if it stays within its chunk."""
        if (
            self._closed
            or not self._mode.writable
            or self._write_error is not None
            or self._unbuffered
        ):
            return None
        mv = memoryview(data).cast("B")
        n = len(mv)
        pos = self._size if self._mode.append else self._pos
        if self._wbuf and pos != self._wbuf_offset + len(self._wbuf):
            return None
        cs = self._h.layout.chunk_size
        start = pos if not self._wbuf else self._wbuf_offset
        if (start // cs) != ((pos + n) // cs) or n == 0 or pos + n > self._h.layout.max_file_bytes:
            return None  # completes a chunk, empty or too far: take the slow path
        if not self._wbuf:
            self._wbuf_offset = pos
        self._wbuf += mv
        self._after_write(pos, n)
        return n

    def _after_write(self, pos: int, n: int) -> None:
        self._pos = pos + n
        self._size = max(self._size, pos + n)
        self._dirty = self._wrote = True
        if self._rbuf and pos < self._rbuf_offset + len(self._rbuf) and self._rbuf_offset < pos + n:
            self._rbuf = memoryview(b"")

    async def write(self, data: Buffer) -> int:
        self._check_writable()
        self._raise_write_error()
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n == 0:
            return 0
        if self.try_write_buffered(mv) is not None:
            return n
        pos = self._size if self._mode.append else self._pos
        self._check_length(pos + n)
        if self._wbuf and pos != self._wbuf_offset + len(self._wbuf):
            await self._send_wbuf()
        cs = self._h.layout.chunk_size
        done = 0
        while done < n:
            at = pos + done
            chunk_end = (at // cs + 1) * cs
            take = min(n - done, chunk_end - at)
            if not self._wbuf and take == cs:
                # A whole chunk straight from the caller: one copy, sent at once.
                self._wbuf_offset = at
                self._wbuf = bytearray(mv[done : done + take])
            else:
                if not self._wbuf:
                    self._wbuf_offset = at
                self._wbuf += mv[done : done + take]
            done += take
            if self._wbuf_offset + len(self._wbuf) == chunk_end:
                await self._send_wbuf()
        self._after_write(pos, n)
        if self._unbuffered:
            await self._drain()  # unbuffered: on storage (every replica) before we return
        return n

    async def writelines(self, lines: Iterable[Buffer]) -> None:
        for line in lines:
            await self.write(line)

    async def _send_wbuf(self) -> None:
        """Hand the pending run to a background send (bounded in flight and in bytes)."""
        if not self._wbuf:
            return
        data, offset = self._wbuf, self._wbuf_offset
        self._wbuf = bytearray()
        pieces = split(self._h.layout, offset, len(data))
        assert len(pieces) == 1, "a write-back run never spans chunks"
        piece = pieces[0]
        await self._inflight_sem.acquire()
        try:
            await self._io.budget.acquire(len(data))
        except BaseException:
            self._inflight_sem.release()
            raise
        previous = self._inflight.get(piece.chunk_index)
        task = asyncio.ensure_future(self._send_piece(piece, data, previous))
        self._inflight[piece.chunk_index] = task

    async def _send_piece(
        self, piece: Piece, data: bytearray, previous: asyncio.Task[None] | None
    ) -> None:
        try:
            if previous is not None:
                # Same chunk already in flight: keep the two writes in order.
                await asyncio.wait([previous])
            await self._io.write_piece(self._h, piece, data)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            if self._write_error is None:
                self._write_error = e
            at = piece.chunk_index * self._h.layout.chunk_size + piece.chunk_offset
            self._torn_at = at if self._torn_at is None else min(self._torn_at, at)
        finally:
            self._io.budget.release(len(data))
            self._inflight_sem.release()
            if self._inflight.get(piece.chunk_index) is asyncio.current_task():
                del self._inflight[piece.chunk_index]

    async def _drain(self) -> None:
        """Send the pending run and wait for every send; raise the first failure."""
        await self._send_wbuf()
        while self._inflight:
            await asyncio.wait(list(self._inflight.values()))
        self._raise_write_error()
        if self._torn_at is None:
            self._clean_size = self._size

    def _honest_size(self) -> int:
        """The length storage surely holds: after a failed write, the clean prefix
        (never shorter than what meta knew at open or was told after a clean drain)."""
        if self._torn_at is None:
            return self._size
        return min(self._size, max(self._torn_at, self._clean_size, self._h.size))

    async def _settle_torn(self) -> None:
        """After a failed write, cut the file back to its clean prefix on storage,
        so that no length reported from now on (exact ones included) covers a hole
        that would read back as zeros never written."""
        if self._torn_at is None:
            return
        length = self._honest_size()
        await self._io.cut_chunks(self._h, length)
        self._torn_at = None
        self._size = self._clean_size = length
        self._wbuf_offset = min(self._wbuf_offset, length)  # empty after a drain; size() reads it
        self._rbuf = memoryview(b"")

    async def flush(self) -> None:
        """Push buffered writes to storage (acknowledged by every replica) and tell
        meta the new length, so readers that open the file from now on see them."""
        self._check_open()
        if self._mode.writable:
            await self._drain()
            await self._settle_torn()
            if self._dirty:
                await self._io.sync_handle(self._h, self.size(), exact=False)
                self._dirty = False

    async def fsync(self) -> None:
        """flush(), then make the length durable at meta."""
        await self.flush()
        if self._mode.writable:
            await self._io.sync_handle(self._h, self._size, exact=True)
            self._dirty = False

    async def truncate(self, size: int | None = None) -> int:
        self._check_writable()
        if size is None:
            size = self._pos
        if size < 0:
            raise OSError(errno.EINVAL, f"negative size {size}", self.name)
        self._check_length(size)
        await self._drain()
        await self._settle_torn()
        if self._dirty:
            # Meta cuts storage only below the length it knows: report ours first.
            await self._io.sync_handle(self._h, self.size(), exact=False)
            self._dirty = False
        await self._io.truncate_handle(self._h, size)
        self._size = size
        self._wrote = True
        self._rbuf = memoryview(b"")
        return size

    async def fallocate(self, offset: int, length: int, mode: int = 0) -> None:
        """fallocate(2) (see AsyncFileSystem.fallocate); pending writes go first."""
        self._check_writable()
        await self.flush()
        inode = await posix_io.fallocate(self._io, self._h, mode, offset, length)
        self._size = max(self._size, inode.size)
        self._rbuf = memoryview(b"")

    # -- advisory locks: owned by this open file, dropped at its close ---------
    async def lock(
        self,
        exclusive: bool = True,
        start: int = 0,
        length: int = 0,
        *,
        blocking: bool = True,
        timeout_s: float | None = None,
        kind: str = "posix",
    ) -> None:
        """Lock bytes [start, start+length) (length 0: to the end of the file,
        however long) like fcntl F_SETLK(W), or the whole file like flock with
        ``kind="flock"``. Held at meta until unlock or close (or this client's
        lease ends); excludes other open files of any client. Not granted:
        BlockingIOError, at once unless ``blocking`` (then after ``timeout_s``;
        None waits until granted or the awaiting task is cancelled)."""
        self._check_open()
        rng = posix_io.lock_range(exclusive, start, length)
        await self._waiter().lock(posix_io.LOCK_KINDS[kind], rng, blocking, timeout_s)

    async def unlock(self, start: int = 0, length: int = 0, *, kind: str = "posix") -> None:
        """Release [start, start+length) (a held range is split as needed)."""
        self._check_open()
        rng = posix_io.lock_range(None, start, length)
        await self._waiter().lock(posix_io.LOCK_KINDS[kind], rng, False)

    async def test_lock(
        self, exclusive: bool = True, start: int = 0, length: int = 0, *, kind: str = "posix"
    ) -> posix_io.LockInfo | None:
        """F_GETLK: a lock of another owner that would block this one, or None."""
        self._check_open()
        rng = posix_io.lock_range(exclusive, start, length)
        return await self._waiter().test(posix_io.LOCK_KINDS[kind], rng)

    def _waiter(self) -> posix_io.LockWaiter:
        if self._locks is None:
            self._locks = posix_io.LockWaiter(self._io, self._h.inode)
        return self._locks

    # -- read ----------------------------------------------------------------
    def try_read_buffered(self, n: int) -> bytes | None:
        """Fast path without I/O: serve ``n`` bytes from the read buffer if it has them."""
        if self._closed or not self._mode.readable or self._wbuf or self._inflight:
            return None
        start = self._pos - self._rbuf_offset
        if n < 0 or start < 0 or start + n > len(self._rbuf):
            return None
        self._pos += n
        self._last_read_end = self._pos
        return bytes(self._rbuf[start : start + n])

    async def _before_read(self) -> None:
        self._check_readable()
        if self._wbuf or self._inflight or self._write_error is not None:
            await self._drain()

    async def read(self, size: int = -1) -> bytes:
        await self._before_read()
        avail = max(0, self._size - self._pos)
        n = avail if size is None or size < 0 else min(size, avail)
        if n == 0:
            return b""
        buf = bytearray(n)
        got = await self._readinto_at(memoryview(buf))
        return bytes(buf) if got == n else bytes(buf[:got])

    async def read1(self, size: int = -1) -> bytes:
        return await self.read(size)

    async def readinto(self, b: Buffer) -> int:
        await self._before_read()
        mv = memoryview(b).cast("B")
        return await self._readinto_at(mv)

    async def readinto1(self, b: Buffer) -> int:
        return await self.readinto(b)

    async def _readinto_at(self, out: memoryview) -> int:
        """Fill ``out`` from the current position (clamped at EOF); advance."""
        n = min(len(out), max(0, self._size - self._pos))
        done = 0
        # 1. Whatever the read buffer already holds.
        start = self._pos - self._rbuf_offset
        if 0 <= start < len(self._rbuf):
            take = min(n, len(self._rbuf) - start)
            out[:take] = self._rbuf[start : start + take]
            done = take
        rest = n - done
        if rest == 0:
            self._pos += done
            self._last_read_end = self._pos
            return done
        at = self._pos + done
        window = self._next_window(self._pos)
        if rest >= window:
            # 2a. Large (or unbuffered): straight into the caller's buffer, chunks in parallel.
            await self._fetch(at, out[done:n])
        else:
            # 2b. Small: refill the read buffer, then copy out.
            fill = min(max(rest, window), self._size - at)
            rbuf = bytearray(fill)
            await self._fetch(at, memoryview(rbuf))
            self._rbuf, self._rbuf_offset = memoryview(rbuf), at
            out[done:n] = self._rbuf[:rest]
        self._pos += n
        self._last_read_end = self._pos
        return n

    def _next_window(self, pos: int) -> int:
        """Bytes the next refill fetches (0: none, read exactly what is asked).
        Adaptive: doubles while reads continue where the last one stopped, back to
        the minimum after a jump."""
        if self._adaptive:
            if pos == self._last_read_end:
                self._window = min(self._window * 2, self._max_window)
            else:
                self._window = min(self._io.config.read_ahead_min_bytes, self._max_window)
        return self._window

    async def readline(self, size: int | None = -1) -> bytes:
        await self._before_read()
        limit = -1 if size is None else size
        parts: list[bytes] = []
        total = 0
        while limit < 0 or total < limit:
            if self._pos >= self._size:
                break
            start = self._pos - self._rbuf_offset
            if not (0 <= start < len(self._rbuf)):
                await self._fill_rbuf()
                start = 0
            window = self._rbuf[start:]
            if limit >= 0:
                window = window[: limit - total]
            nl = bytes(window).find(b"\n")  # window is at most the read buffer
            take = len(window) if nl < 0 else nl + 1
            parts.append(bytes(window[:take]))
            total += take
            self._pos += take
            self._last_read_end = self._pos
            if nl >= 0:
                break
        if self._unbuffered:
            self._rbuf = memoryview(b"")  # nothing kept past the line
        return b"".join(parts)

    async def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = await self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    async def _fill_rbuf(self) -> None:
        at = self._pos
        # Unbuffered readline has to look ahead for the newline: small steps.
        window = _UNBUFFERED_LINE_STEP_BYTES if self._unbuffered else self._next_window(at)
        fill = min(window, self._size - at)
        rbuf = bytearray(fill)
        await self._fetch(at, memoryview(rbuf))
        self._rbuf, self._rbuf_offset = memoryview(rbuf), at

    # -- read-ahead ----------------------------------------------------------
    async def _fetch(self, at: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at ``at``: from the read-ahead once the file is
        read sequentially, straight from storage otherwise."""
        if at == self._fetch_end:
            self._fetch_streak += len(out)
        else:
            self._drop_read_ahead()
            self._fetch_streak = len(out)
        self._fetch_end = at + len(out)
        if not self._read_ahead or self._fetch_streak <= self._io.config.read_buffer_bytes:
            await self._io.read_into(self._h, at, out)
            return
        await self._read_through_ahead(at, out)

    async def _read_through_ahead(self, at: int, out: memoryview) -> None:
        """Copy what the segments ahead hold, keep them topped up past this read,
        and read the rest (if the reader outran them) straight into ``out``."""
        end = at + len(out)
        used: list[tuple[_Segment, bool]] = []  # (segment, consumed whole)
        pos = at
        while self._ra and pos < end and self._ra[0].offset <= pos < self._ra[0].end:
            seg = self._ra[0]
            whole = seg.end <= end
            used.append((seg, whole))
            pos = min(seg.end, end)
            if not whole:
                break
            self._ra.popleft()
        if pos < end:
            self._drop_read_ahead()  # whatever is left does not start where we need
        self._fill_ahead(end)
        direct = None
        if pos < end:
            direct = asyncio.ensure_future(self._io.read_into(self._h, pos, out[pos - at :]))
        try:
            start = at
            for seg, _whole in used:
                await asyncio.shield(seg.task)
                take = min(seg.end, end) - start
                lo = start - seg.offset
                out[start - at : start - at + take] = memoryview(seg.buf)[lo : lo + take]
                start += take
            if direct is not None:
                await direct
        finally:
            if direct is not None and not direct.done():
                direct.cancel()
            for seg, whole in used:
                if whole:
                    self._ra_bytes -= len(seg.buf)
                    self._recycle(seg)

    def _fill_ahead(self, start: int) -> None:
        """Start chunk-sized segment reads until ``read_ahead_bytes`` are queued past ``start``."""
        budget = self._io.config.read_ahead_bytes
        nxt = self._ra[-1].end if self._ra else start
        limit = min(self._size, start + budget)
        cs = self._h.layout.chunk_size
        while nxt < limit and self._ra_bytes < budget:
            n = min((nxt // cs + 1) * cs, limit) - nxt
            held = self._ra_bytes + len(self._ra_spares) * cs  # this file's share
            if n == cs and self._ra_spares:
                buf = self._ra_spares.pop()  # its budget is still held
            elif held + n <= budget and self._io.take_read_ahead(n):
                buf = bytearray(n)
            else:
                return
            task = asyncio.ensure_future(self._io.read_into(self._h, nxt, memoryview(buf)))
            task.add_done_callback(_retrieve)
            self._ra.append(_Segment(nxt, buf, task))
            self._ra_bytes += n
            nxt += n

    def _recycle(self, seg: _Segment) -> None:
        """Keep a consumed segment's buffer for the next one, or give its bytes back."""
        done = seg.task.done() and not seg.task.cancelled()  # nothing writes into it any more
        if done and len(seg.buf) == self._h.layout.chunk_size:
            self._ra_spares.append(seg.buf)
        else:
            seg.task.cancel()
            self._io.return_read_ahead(len(seg.buf))

    def _drop_read_ahead(self, spares: bool = False) -> None:
        """Forget the segments (a jump elsewhere, close); their reads are cancelled.
        ``spares``: free the kept buffers too."""
        while self._ra:
            seg = self._ra.popleft()
            seg.task.cancel()
            self._io.return_read_ahead(len(seg.buf))
        self._ra_bytes = 0
        if spares:
            self._io.return_read_ahead(sum(len(b) for b in self._ra_spares))
            self._ra_spares.clear()

    # -- close ---------------------------------------------------------------
    def close_unwritten(self, loop_soon: Callable[[Callable[[], object]], None]) -> bool:
        """Close, in the calling thread, a write open that wrote nothing and holds
        nothing the loop owns (buffered or in-flight bytes, locks, read-ahead, a
        read session): all that is left is to end its session at meta, which
        ``ChunkIO.queue_end_from_thread`` does in the background, as ``close``
        would. False, with nothing done, when the file needs ``close``."""
        h = self._h
        if (
            self._closed
            or self._wrote
            or self._wbuf
            or self._inflight
            or self._write_error is not None
            or self._torn_at is not None
            or self._locks is not None
            or self._ra
            or self._ra_spares
            or h.read_session
            or h.session is None
            or not self._io.queue_end_from_thread(h.inode, h.session, loop_soon)
        ):
            return False
        self._closed = True
        self._rbuf = memoryview(b"")
        if self._on_close is not None:
            self._on_close(self)
        return True

    async def close(self) -> None:
        """Flush, report the length to meta, release the handle (idempotent)."""
        if self._closed:
            return
        try:
            if self._mode.writable:
                await self._drain()
        finally:
            self._closed = True
            self._rbuf = memoryview(b"")
            self._drop_read_ahead(spares=True)
            # A reader reports no length: the file may have shrunk since its open.
            length = self._honest_size() if self._mode.writable else 0
            if self._on_close is not None:
                self._on_close(self)
            try:
                if self._locks is not None:
                    await self._locks.release_all()
                await self._settle_torn()
            finally:
                # Not cut back (storage unreachable): the length we know, without
                # meta's exact query, which would count chunks past the hole.
                wrote = self._wrote and self._torn_at is None
                await self._io.close_handle(self._h, length, wrote)

    async def __aenter__(self) -> AsyncFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("chainfs files have no OS file descriptor")

    def isatty(self) -> bool:
        self._check_open()
        return False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pos={self._pos}"
        return f"<chainfs.AsyncFile {self.name!r} mode={self.mode!r} {state}>"


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a read-ahead failure as seen: the reader meets it when it gets there."""
    if not task.cancelled():
        task.exception()
