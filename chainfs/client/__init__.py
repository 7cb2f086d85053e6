"""The user-facing client library: FileSystem (sync), AsyncFileSystem, files, adapters.

The fsspec adapter (``chainfs.client.fsspec_adapter``) and the PyTorch
helpers (``chainfs.client.torch``) are imported only when asked for.
"""

from __future__ import annotations

from chainfs.client.aio_fs import AsyncFileSystem, DirEntry
from chainfs.client.config import ClientConfig
from chainfs.client.file import AsyncFile
from chainfs.client.sync import FileSystem, connect
from chainfs.client.sync_file import File

__all__ = [
    "AsyncFile",
    "AsyncFileSystem",
    "ClientConfig",
    "DirEntry",
    "File",
    "FileSystem",
    "connect",
]
