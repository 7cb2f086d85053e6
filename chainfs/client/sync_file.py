"""The synchronous file: :class:`File`, an ``io.BufferedIOBase`` over an
:class:`~chainfs.client.file.AsyncFile` run on the FileSystem's loop thread."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from chainfs.client import posix_io
from chainfs.client.file import AsyncFile, Buffer
from chainfs.client.layout import Layout

if TYPE_CHECKING:
    from chainfs.client._loop import LoopThread

log = logging.getLogger(__name__)


class File(io.BufferedIOBase):
    """A chainfs file for synchronous code: an ``io.BufferedIOBase``.

    Calls run the AsyncFile on the FileSystem's event-loop thread; reads served
    by the read buffer and small writes inside one chunk skip that hop.
    """

    def __init__(self, afile: AsyncFile, loop: LoopThread) -> None:
        super().__init__()
        self._af = afile
        self._loop = loop
        self.name = afile.name
        self.mode = afile.mode

    @property
    def raw(self) -> Any:
        raise AttributeError("chainfs files have no raw stream")

    @property
    def closed(self) -> bool:
        return self._af.closed

    @property
    def inode(self) -> int:
        return self._af.inode

    @property
    def layout(self) -> Layout:
        return self._af.layout

    def size(self) -> int:
        """The file's length as this handle sees it."""
        return self._af.size()

    def readable(self) -> bool:
        return self._af.readable()

    def writable(self) -> bool:
        return self._af.writable()

    def seekable(self) -> bool:
        return self._af.seekable()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("chainfs files have no OS file descriptor")

    def isatty(self) -> bool:
        return self._af.isatty()

    def tell(self) -> int:
        return self._af.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._af.seek_sync(offset, whence)

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            fast = self._af.try_read_buffered(size)
            if fast is not None:
                return fast
        return self._loop.run(self._af.read(-1 if size is None else size))

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, b: Buffer) -> int:
        return self._loop.run(self._af.readinto(b))

    def readinto1(self, b: Buffer) -> int:
        return self.readinto(b)

    def readline(self, size: int | None = -1) -> bytes:
        return self._loop.run(self._af.readline(size))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return self._loop.run(self._af.readlines(-1 if hint is None else hint))

    def __iter__(self) -> File:
        self._af._check_open()
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def write(self, data: Buffer) -> int:
        fast = self._af.try_write_buffered(data)
        if fast is not None:
            return fast
        return self._loop.run(self._af.write(data))

    def writelines(self, lines: Iterable[Buffer]) -> None:
        for line in lines:
            self.write(line)

    def truncate(self, size: int | None = None) -> int:
        return self._loop.run(self._af.truncate(size))

    def fallocate(self, offset: int, length: int, mode: int = 0) -> None:
        self._loop.run(self._af.fallocate(offset, length, mode))

    def lock(
        self,
        exclusive: bool = True,
        start: int = 0,
        length: int = 0,
        *,
        blocking: bool = True,
        timeout_s: float | None = None,
        kind: str = "posix",
    ) -> None:
        self._loop.run(
            self._af.lock(
                exclusive, start, length, blocking=blocking, timeout_s=timeout_s, kind=kind
            )
        )

    def unlock(self, start: int = 0, length: int = 0, *, kind: str = "posix") -> None:
        self._loop.run(self._af.unlock(start, length, kind=kind))

    def test_lock(
        self, exclusive: bool = True, start: int = 0, length: int = 0, *, kind: str = "posix"
    ) -> posix_io.LockInfo | None:
        return self._loop.run(self._af.test_lock(exclusive, start, length, kind=kind))

    def flush(self) -> None:
        if self._af.closed:
            return  # io.IOBase calls flush() from close(); nothing left to push
        self._loop.run(self._af.flush())

    def fsync(self) -> None:
        self._loop.run(self._af.fsync())

    def close(self) -> None:
        if self._af.closed:
            return
        if not self._loop.alive:
            raise ValueError(f"{self.name}: its FileSystem was closed before the file")
        if self._af.close_unwritten(self._loop.call_soon):  # a create: no hop to the loop
            return
        self._loop.run(self._af.close())

    def detach(self) -> Any:
        raise io.UnsupportedOperation("chainfs files cannot be detached")

    def __enter__(self) -> File:
        self._af._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # io.IOBase.__del__ would close() from any thread at any time; a file
        # dropped without close() is closed only when its loop is still alive.
        try:
            if not self._af.closed and self._loop.alive and not self._loop.in_loop_thread():
                self.close()
        except Exception:  # nobody to raise to: say that written bytes may be lost
            log.warning(
                "chainfs file %s dropped without close(): closing failed", self.name, exc_info=True
            )

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self._af.tell()}"
        return f"<chainfs.File {self.name!r} mode={self.mode!r} {state}>"
