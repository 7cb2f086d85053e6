"""The async client: ``fs = await chainfs.aio.connect(address)``.

Same method names as the sync :class:`chainfs.FileSystem`, as coroutines.
"""

from __future__ import annotations

from chainfs.client.aio_fs import AsyncFileSystem, DirEntry, connect
from chainfs.client.config import ClientConfig
from chainfs.client.file import AsyncFile

__all__ = ["AsyncFile", "AsyncFileSystem", "ClientConfig", "DirEntry", "connect"]
