"""One data-plane connection: frame reader and scatter-gather writer on a raw socket.

The socket is non-blocking and driven by ``loop.add_reader`` /
``loop.add_writer`` (uvloop's poll handles, or the selector of plain asyncio),
so this module decides exactly where every byte lands and knows exactly when
a buffer has been handed to the kernel:

* Reading: a per-connection staging buffer receives fixed headers, header
  messages and small payloads (several small frames per ``recv_into``). Once
  a frame's header has arrived, a subclass names the payload's destination
  buffers (a pooled buffer on the server, the caller's buffers on the
  client); whenever at least ``direct_recv_min_bytes`` of payload are still
  to come, ``recv_into`` targets the destination itself, so large payloads
  are never copied in user space. Bytes that already sat in staging are
  moved with one C-level slice assignment.
* Writing: frames are queued as lists of segments (memoryviews, or
  ``_FileSeg`` regions of a file). Consecutive memory segments of several
  frames go out in one ``sendmsg`` (scatter-gather, no concatenation); file
  segments with ``os.sendfile``. A frame's ``done(sent: bool)`` callback runs
  once its last byte is in the kernel (True) or the connection died (False);
  until then the transport holds its buffers, after that it never touches
  them again.
* TLS (a socket wrapped by :func:`tls_handshake`): the same reader, with
  ``recv_into`` through OpenSSL; the writer copies memory segments into one
  SSL write of up to ``TLS_WRITE_BYTES`` (encryption makes new bytes anyway)
  and reads file segments with ``pread`` instead of ``sendfile``. Whether a
  connection is TLS is decided once, when it is made: plain connections run
  exactly the code they ran before.
* Any malformed input or I/O error closes the connection (``close(exc)``);
  subclasses fail what depended on it. Malformed input is BAD_FRAME; a lost
  connection (reset, or end of stream, even in the middle of a frame) is
  UNAVAILABLE: the peer is gone, not broken, and another one may serve.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from itertools import islice

from chainfs.common.dataplane.buffers import map_anonymous
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.dataplane.frame import FIXED_HEADER_SIZE, FrameHeader, decode_fixed
from chainfs.common.errors import ChainfsError, Code

# Reader states.
_FIXED = 0  # waiting for the 40 fixed-header bytes
_HEADER = 1  # waiting for the header message (in staging)
_BIG_HEADER = 2  # header message larger than staging: received into its own buffer
_WAIT_DEST = 3  # header known; the subclass has not named the payload destination yet
_PAYLOAD = 4  # receiving payload into the destination (or discarding it)

# Reasons reading is paused (bit mask).
PAUSE_POOL = 1  # server: waiting for a pooled buffer
PAUSE_INFLIGHT = 2  # server: too many requests of this connection unanswered
PAUSE_QUOTA = 4  # server: this connection holds its quota of pooled buffers

_MAX_READS_PER_EVENT = 64  # recv calls per readiness callback before yielding to the loop
# Bytes handed to one SSL write (OpenSSL cuts them into 16 KiB records): large
# enough for few calls per payload, small enough to bound the copy it makes.
TLS_WRITE_BYTES = 256 * 1024
# Exceptions of a non-blocking socket that mean "try again when it is ready".
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _FileSeg:
    """A file region still to be sent with sendfile."""

    __slots__ = ("fd", "offset", "remaining")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.remaining = length


Segment = memoryview | _FileSeg


class OutFrame:
    """A queued frame: its segments, how far it got, and who to tell."""

    __slots__ = ("cancelled", "done", "idx", "segs", "started")

    def __init__(self, segs: list[Segment], done: Callable[[bool], None] | None) -> None:
        self.segs = segs
        self.idx = 0
        self.done = done
        self.started = False  # some byte of it reached the kernel
        self.cancelled = False  # drop it if it has not started


def _joined(parts: list[memoryview]) -> memoryview:
    return parts[0] if len(parts) == 1 else memoryview(b"".join(parts))


async def tls_handshake(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    server_side: bool,
    hostname: str | None = None,
) -> ssl.SSLSocket:
    """Wrap a connected socket in TLS and run the handshake on ``loop``.

    Callers bound it with a timeout. On failure the socket is closed and the
    ssl error (or OSError) raised.
    """
    try:
        sock.setblocking(False)
        ssock = ctx.wrap_socket(
            sock, server_side=server_side, server_hostname=hostname, do_handshake_on_connect=False
        )
    except BaseException:
        sock.close()
        raise
    try:
        while True:
            try:
                ssock.do_handshake()
                return ssock
            except ssl.SSLWantReadError:
                await _fd_ready(loop, ssock.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _fd_ready(loop, ssock.fileno(), write=True)
    except BaseException:
        ssock.close()
        raise


async def _fd_ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte memoryview of ``data`` (no copy); len() is its byte count."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def configure_socket(sock: socket.socket, cfg: DataPlaneConfig) -> None:
    """The socket options of every data-plane connection (event-loop or blocking)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cfg.socket_send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.socket_send_buffer_bytes)
    if cfg.socket_recv_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.socket_recv_buffer_bytes)


class Connection:
    """Base class: frame reading, frame writing, closing. See the module docstring."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, cfg: DataPlaneConfig, peer: str
    ) -> None:
        sock.setblocking(False)
        configure_socket(sock, cfg)
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.cfg = cfg
        self.peer = peer
        self.closed = False
        self.close_exc: BaseException | None = None
        # Reader.
        # An anonymous mapping, not a bytearray: only the pages traffic touches
        # become resident, so idle connections cost next to no memory.
        self._staging = map_anonymous(cfg.recv_staging_bytes)
        self._smv = memoryview(self._staging)
        self._start = 0  # unparsed bytes are staging[start:end]
        self._end = 0
        self._state = _FIXED
        self._hdr: FrameHeader | None = None
        self._header = b""
        self._big: memoryview | None = None  # _BIG_HEADER destination
        self._big_off = 0
        self._dest: list[memoryview] | None = None  # None in _PAYLOAD = discard
        self._dest_i = 0
        self._dest_off = 0
        self._remaining = 0
        # Largest header message accepted (a server lowers it to max_request_header_bytes).
        self.max_header_bytes = cfg.max_header_bytes
        self._paused = 0  # PAUSE_* bits
        self._reader_on = False
        self._resume_scheduled = False
        self.last_recv_monotonic = time.monotonic()
        # Writer.
        self._outq: deque[OutFrame] = deque()
        self._writer_on = False
        self._flushing = False
        self._flush_scheduled = False
        self.last_send_monotonic = time.monotonic()  # last progress of the send queue
        self.bytes_received = 0
        self.bytes_sent = 0
        # TLS: bytes of an SSL write that would block, to be retried unchanged
        # (OpenSSL requires it); whether they came from a file segment; the
        # buffer file segments are read into.
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._tls_out: memoryview | None = None
        self._tls_out_file = False
        self._tls_file_buf: memoryview | None = None

    # ---- subclass hooks -------------------------------------------------

    def _on_header(self, hdr: FrameHeader, header: bytes) -> None:
        """A frame's header arrived: call ``_begin_payload(dest)`` now or later."""
        raise NotImplementedError

    def _on_frame(self, hdr: FrameHeader, header: bytes) -> None:
        """A frame is complete (its payload is in the destination named earlier)."""
        raise NotImplementedError

    def _on_close(self, exc: BaseException | None) -> None:
        """The connection closed (exc None = orderly)."""

    def _big_header_buffer(self, nbytes: int) -> memoryview | None:
        """A buffer for a header message larger than staging, or None after
        pausing reading until ``_got_big_header_buffer`` hands one over."""
        return memoryview(bytearray(nbytes))

    def _big_header_done(self) -> None:
        """The big header buffer has been copied out (a server returns it to its pool)."""

    # ---- reading ---------------------------------------------------------

    def start_reading(self) -> None:
        if not self.closed and not self._paused and not self._reader_on:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reader_on = True
            self._poke_if_tls_pending()

    def _poke_if_tls_pending(self) -> None:
        # Bytes OpenSSL already decrypted do not make the socket readable again.
        if self.tls and not self.closed and self.sock.pending():  # type: ignore[attr-defined]
            self.loop.call_soon(self.poke)

    def pause_reading(self, reason: int) -> None:
        self._paused |= reason
        if self._reader_on:
            self.loop.remove_reader(self.fd)
            self._reader_on = False

    def resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and not self.closed and not self._resume_scheduled:
            # Bytes may already sit in staging with nothing left in the socket to
            # wake us: parse them first, from the loop, then watch the socket again.
            self._resume_scheduled = True
            self.loop.call_soon(self._resume)

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    def _resume(self) -> None:
        self._resume_scheduled = False
        if self.closed or self._paused:
            return
        self.last_recv_monotonic = time.monotonic()  # the stall clock restarts
        try:
            self._parse()
        except ChainfsError as e:
            self.close(e)
            return
        self.start_reading()

    def poke(self) -> None:
        """Read now, as if the socket were readable.

        uvloop stops watching a socket on POLLERR (a TCP reset) without ever
        calling the reader, so a reset peer would go unnoticed: the owners of
        connections call this periodically (``liveness_check_ms``); a dead
        socket then raises in recv and the connection closes.
        """
        if not self.closed and not self._paused:
            self._on_readable()

    @property
    def mid_frame(self) -> bool:
        """True while a frame is partly received (the stall watchdog looks at this)."""
        return self._state != _FIXED or self._start != self._end

    def _on_readable(self) -> None:
        sock = self.sock
        received = self.bytes_received
        try:
            for _ in range(_MAX_READS_PER_EVENT):
                if self._paused or self.closed:
                    return
                state = self._state
                # Straight into a destination only once staging holds nothing
                # unparsed: those bytes come first (a resume or a poke can find
                # some there).
                staged = self._start != self._end
                if (
                    state == _PAYLOAD
                    and not staged
                    and self._dest is not None
                    and self._remaining >= self.cfg.direct_recv_min_bytes
                ):
                    dest = self._dest
                    d = dest[self._dest_i]
                    off = self._dest_off
                    room = len(d) - off
                    if room >= self._remaining or self._dest_i + 1 == len(dest) or self.tls:
                        n = sock.recv_into(d[off : off + min(room, self._remaining)])
                    else:
                        n = sock.recvmsg_into(self._scatter_views())[0]
                    if n == 0:
                        self._eof()
                        return
                    self._advance_dest(n)
                    self._remaining -= n
                    self.bytes_received += n
                    if self._remaining == 0:
                        self._frame_done()
                elif state == _BIG_HEADER and not staged:
                    big = self._big
                    assert big is not None
                    n = sock.recv_into(big[self._big_off :])
                    if n == 0:
                        self._eof()
                        return
                    self._big_off += n
                    self.bytes_received += n
                    if self._big_off == len(big):
                        self._finish_big_header()
                    self._parse()
                else:
                    self._make_room()
                    asked = len(self._smv) - self._end
                    n = sock.recv_into(self._smv[self._end :])
                    if n == 0:
                        self._eof()
                        return
                    self._end += n
                    self.bytes_received += n
                    self._parse()
                    if n < asked and not self.tls and not self.mid_frame:
                        # Drained, on a frame boundary: a second recv would only say
                        # EAGAIN (a syscall per request); the loop calls again when
                        # bytes arrive. Mid-frame, it goes on: that recv also finds
                        # a reset (uvloop reports none) while a buffer is held.
                        break
            else:
                self._poke_if_tls_pending()  # stopped at the per-event bound
        except _WOULD_BLOCK:
            pass
        except ChainfsError as e:
            self.close(e)
            return
        except OSError as e:
            self.close(ChainfsError(Code.UNAVAILABLE, f"data plane {self.peer}: receive: {e}"))
            return
        if self.bytes_received != received:
            self.last_recv_monotonic = time.monotonic()

    def _make_room(self) -> None:
        start, end, size = self._start, self._end, len(self._staging)
        if start == end:
            self._start = self._end = 0
        elif size - end < size // 2 and start > 0:
            self._smv[0 : end - start] = self._smv[start:end]
            self._start, self._end = 0, end - start
        assert self._end < size, "staging full without a parseable frame"

    def _eof(self) -> None:
        if self.mid_frame:
            # The peer went away (a crash, a reset), it did not send a malformed
            # frame: UNAVAILABLE, so callers try another replica.
            self.close(
                ChainfsError(Code.UNAVAILABLE, f"data plane {self.peer}: connection lost mid-frame")
            )
        else:
            self.close(None)

    def _parse(self) -> None:
        """Consume whatever complete pieces staging holds."""
        cfg = self.cfg
        smv = self._smv
        while not self._paused and not self.closed:
            avail = self._end - self._start
            state = self._state
            if state == _FIXED:
                if avail < FIXED_HEADER_SIZE:
                    break
                hdr = decode_fixed(smv, self._start, self.max_header_bytes, cfg.max_payload_bytes)
                self._start += FIXED_HEADER_SIZE
                self._hdr = hdr
                hl = hdr.header_len
                if hl == 0:
                    self._header_done(b"")
                elif hl > len(self._staging) - FIXED_HEADER_SIZE:
                    # Bytes staged so far are copied in by the _BIG_HEADER branch.
                    self._state = _BIG_HEADER
                    self._big, self._big_off = self._big_header_buffer(hl), 0
                else:
                    self._state = _HEADER
            elif state == _HEADER:
                assert self._hdr is not None
                hl = self._hdr.header_len
                if avail < hl:
                    break
                header = bytes(smv[self._start : self._start + hl])
                self._start += hl
                self._header_done(header)
            elif state == _PAYLOAD:
                if avail == 0:
                    break
                take = min(avail, self._remaining)
                if self._dest is not None:
                    self._copy_in(smv[self._start : self._start + take])
                self._start += take
                self._remaining -= take
                if self._remaining == 0:
                    self._frame_done()
            elif state == _BIG_HEADER:
                pending_big = self._big
                assert pending_big is not None
                if avail == 0:
                    break
                off = self._big_off
                take = min(avail, len(pending_big) - off)
                pending_big[off : off + take] = smv[self._start : self._start + take]
                self._start += take
                self._big_off += take
                if self._big_off == len(pending_big):
                    self._finish_big_header()
            else:  # _WAIT_DEST: the destination is not known yet
                break
        if self._start == self._end:
            self._start = self._end = 0

    def _got_big_header_buffer(self, big: memoryview) -> None:
        """The buffer ``_big_header_buffer`` paused for; reading goes on."""
        assert self._state == _BIG_HEADER and self._big is None
        self._big, self._big_off = big, 0

    def _finish_big_header(self) -> None:
        big = self._big
        assert big is not None
        header = big.tobytes()
        self._big = None
        self._big_header_done()
        self._header_done(header)

    def _header_done(self, header: bytes) -> None:
        assert self._hdr is not None
        self._header = header
        self._state = _WAIT_DEST
        self._on_header(self._hdr, header)

    def _begin_payload(self, dest: list[memoryview] | None) -> None:
        """Name where the current frame's payload goes (None = discard it)."""
        assert self._state == _WAIT_DEST and self._hdr is not None
        if dest is not None and self._hdr.payload_len:
            assert sum(len(d) for d in dest) >= self._hdr.payload_len
            dest = [d for d in dest if len(d)]
        self._dest = dest
        self._dest_i = 0
        self._dest_off = 0
        self._remaining = self._hdr.payload_len
        self._state = _PAYLOAD
        if self._remaining == 0:
            self._frame_done()

    def _discard_current(self) -> None:
        """Stop writing the current payload into its destination (the owner gave up)."""
        if self._state == _PAYLOAD:
            self._dest = None

    def _scatter_views(self) -> list[memoryview]:
        """Destination views covering the rest of the payload (for one recvmsg_into)."""
        dest = self._dest
        assert dest is not None
        left = self._remaining
        i = self._dest_i
        first = dest[i][self._dest_off :]
        views = [first[:left]]
        left -= len(views[0])
        i += 1
        while left > 0 and i < len(dest) and len(views) < self.cfg.max_iov_per_send:
            v = dest[i][:left]
            views.append(v)
            left -= len(v)
            i += 1
        return views

    def _copy_in(self, src: memoryview) -> None:
        dest = self._dest
        assert dest is not None
        pos, total = 0, len(src)
        while pos < total:
            d = dest[self._dest_i]
            off = self._dest_off
            k = min(len(d) - off, total - pos)
            d[off : off + k] = src[pos : pos + k]
            pos += k
            self._advance_dest(k)

    def _advance_dest(self, n: int) -> None:
        dest = self._dest
        assert dest is not None
        i, off = self._dest_i, self._dest_off + n
        last = len(dest) - 1
        while i < last and off >= len(dest[i]):
            off -= len(dest[i])
            i += 1
        self._dest_i, self._dest_off = i, off

    def _frame_done(self) -> None:
        hdr, header = self._hdr, self._header
        assert hdr is not None
        self._state = _FIXED
        self._hdr = None
        self._header = b""
        self._dest = None
        self._on_frame(hdr, header)

    @property
    def current_frame(self) -> FrameHeader | None:
        return self._hdr

    # ---- writing ---------------------------------------------------------

    def send_frame(self, segs: list[Segment], done: Callable[[bool], None] | None) -> OutFrame:
        """Queue a frame; ``done(sent)`` runs when it is in the kernel or dropped."""
        frame = OutFrame(segs, done)
        if self.closed:
            frame.idx = len(segs)
            if done is not None:
                done(False)
            return frame
        if not self._outq:
            self.last_send_monotonic = time.monotonic()
        self._outq.append(frame)
        if not self._writer_on and not self._flushing and not self._flush_scheduled:
            # Cork until the loop has run what is ready: frames queued by other
            # callbacks of this iteration leave in the same sendmsg.
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_corked)
        return frame

    def _flush_corked(self) -> None:
        self._flush_scheduled = False
        if not self._writer_on:
            self._flush()

    def cancel_frame(self, frame: OutFrame) -> bool:
        """Drop a queued frame that has not started; False if it started (or finished)."""
        if frame.started:
            return frame.idx >= len(frame.segs)
        frame.cancelled = True
        return True

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        self._flushing = True
        sent = self.bytes_sent
        try:
            if self.tls:
                self._flush_tls()
            else:
                self._flush_inner()
        except _WOULD_BLOCK:
            pass
        except ChainfsError as e:
            self.close(e)
        except OSError as e:
            self.close(ChainfsError(Code.UNAVAILABLE, f"data plane {self.peer}: send: {e}"))
        finally:
            self._flushing = False
            if self.bytes_sent != sent:
                self.last_send_monotonic = time.monotonic()
        if self.closed:
            return
        if self._outq and not self._writer_on:
            self.loop.add_writer(self.fd, self._on_writable)
            self._writer_on = True
        elif not self._outq and self._writer_on:
            self.loop.remove_writer(self.fd)
            self._writer_on = False

    def _flush_inner(self) -> None:
        outq = self._outq
        max_iov = self.cfg.max_iov_per_send
        while outq and not self.closed:
            frame = outq[0]
            if self._drop_if_over(frame):
                continue
            seg = frame.segs[frame.idx]
            if isinstance(seg, _FileSeg):
                frame.started = True
                n = os.sendfile(self.fd, seg.fd, seg.offset, seg.remaining)
                if n == 0:
                    raise ChainfsError(
                        Code.EIO, f"data plane {self.peer}: file region ended early (fd {seg.fd})"
                    )
                self.bytes_sent += n
                seg.offset += n
                seg.remaining -= n
                if seg.remaining == 0:
                    frame.idx += 1
                continue
            iov: list[memoryview] = []
            for f in islice(outq, 0, max_iov):
                if f.cancelled and not f.started:
                    break
                stop = False
                for s in islice(f.segs, f.idx, None):
                    if not isinstance(s, memoryview) or len(iov) >= max_iov:
                        stop = True
                        break
                    iov.append(s)
                if stop or len(iov) >= max_iov:
                    break
            want = sum(len(b) for b in iov)
            n = self.sock.sendmsg(iov)
            self.bytes_sent += n
            self._consume(n)
            if n < want:
                return  # socket full: wait for writability

    def _drop_if_over(self, frame: OutFrame) -> bool:
        """Pop the head ``frame`` if it is all sent, or cancelled before it started."""
        if frame.idx < len(frame.segs) and not (frame.cancelled and not frame.started):
            return False
        self._outq.popleft()
        if frame.done is not None:
            frame.done(not frame.cancelled or frame.started)
        return True

    def _consume(self, n: int) -> None:
        outq = self._outq
        while n > 0 and not self.closed:
            frame = outq[0]
            frame.started = True
            seg = frame.segs[frame.idx]
            assert isinstance(seg, memoryview)
            if n >= len(seg):
                n -= len(seg)
                frame.idx += 1
                if frame.idx == len(frame.segs):
                    outq.popleft()
                    if frame.done is not None:
                        frame.done(True)
            else:
                frame.segs[frame.idx] = seg[n:]
                n = 0
        # Frames with nothing left to send (all segments consumed) are finished here too.
        while outq and not self.closed and outq[0].idx >= len(outq[0].segs):
            frame = outq.popleft()
            if frame.done is not None:
                frame.done(True)

    def _flush_tls(self) -> None:
        """The writer of a TLS connection (see the module docstring)."""
        outq = self._outq
        while outq and not self.closed:
            frame = outq[0]
            if self._drop_if_over(frame):
                continue
            if self._tls_out is None:
                self._tls_out = self._tls_gather(frame)
            out = self._tls_out
            n = self.sock.send(out)  # SSLWantWriteError: retried with these very bytes
            self._tls_out = out[n:] if n < len(out) else None
            self.bytes_sent += n
            if self._tls_out_file:
                seg = frame.segs[frame.idx]
                assert isinstance(seg, _FileSeg)
                seg.offset += n
                seg.remaining -= n
                if seg.remaining == 0:
                    frame.idx += 1
            else:
                self._consume(n)

    def _tls_gather(self, head: OutFrame) -> memoryview:
        """The next bytes to write: a piece of the head's file segment, or up to
        TLS_WRITE_BYTES of consecutive memory segments (joined when several).
        Every frame with bytes in them is marked started: it can no longer be
        cancelled, since those bytes will go out."""
        seg = head.segs[head.idx]
        head.started = True
        self._tls_out_file = isinstance(seg, _FileSeg)
        if isinstance(seg, _FileSeg):
            return self._tls_read_file(seg)
        parts: list[memoryview] = []
        size = 0
        for f in self._outq:
            if f.cancelled and not f.started:
                break
            for s in islice(f.segs, f.idx, None):
                if not isinstance(s, memoryview) or size == TLS_WRITE_BYTES:
                    return _joined(parts)
                parts.append(s[: TLS_WRITE_BYTES - size])
                size += len(parts[-1])
                f.started = True
        return _joined(parts)

    def _tls_read_file(self, seg: _FileSeg) -> memoryview:
        if self._tls_file_buf is None:
            self._tls_file_buf = memoryview(bytearray(TLS_WRITE_BYTES))
        buf = self._tls_file_buf[: min(seg.remaining, TLS_WRITE_BYTES)]
        n = os.preadv(seg.fd, [buf], seg.offset)
        if n == 0:
            raise ChainfsError(
                Code.EIO, f"data plane {self.peer}: file region ended early (fd {seg.fd})"
            )
        return buf[:n]

    @property
    def send_queue_frames(self) -> int:
        return len(self._outq)

    # ---- closing ---------------------------------------------------------

    def close(self, exc: BaseException | None = None) -> None:
        """Close now: queued frames are dropped (done(False)), subclasses fail their work."""
        if self.closed:
            return
        self.closed = True
        self.close_exc = exc
        # Unconditionally: uvloop keeps a poller it closed on POLLERR registered
        # under the fd until removed, and a new socket reusing the fd would inherit it.
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self._reader_on = self._writer_on = False
        try:
            self.sock.close()
        except OSError as e:  # pragma: no cover - close of a socket we own
            if e.errno != errno.EBADF:
                raise
        dropped = list(self._outq)
        self._outq.clear()
        try:
            self._on_close(exc)
        finally:
            for frame in dropped:
                if frame.done is not None:
                    frame.done(False)
            self._dest = None
            self._big = None
            try:
                self._smv.release()
                self._staging.close()
            except BufferError:  # a slice is still alive somewhere: the GC unmaps it
                pass
