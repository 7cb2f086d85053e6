"""chainfs: a 3FS-style distributed file system for AI workloads.

    import chainfs
    fs = chainfs.connect("127.0.0.1:PORT")      # the mgmtd address
    with fs.open("/data/x.bin", "wb") as f:
        f.write(b"...")

The async twin is ``await chainfs.aio.connect(address)``. The client is
imported on first use, so service processes importing ``chainfs`` stay lean.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from chainfs import aio
    from chainfs.client.aio_fs import AsyncFileSystem
    from chainfs.client.config import ClientConfig
    from chainfs.client.sync import FileSystem

__all__ = ["AsyncFileSystem", "ClientConfig", "FileSystem", "__version__", "aio", "connect"]


def connect(
    address: str | None = None, token: str | None = None, config: ClientConfig | None = None
) -> FileSystem:
    """Connect to the chainfs cluster whose mgmtd is at ``address`` ("host:port[,...]").

    ``address`` None takes $CHAINFS_ADDRESS (ValueError when that is unset too).
    ``token`` (a user's token, from `chainfs admin user-add`) None takes
    ``config.token``/``token_file``, else $CHAINFS_TOKEN, else the file
    $CHAINFS_TOKEN_FILE names; a cluster with authentication needs one.
    Returns a :class:`FileSystem`; an unreachable address fails within the
    configured connect timeout with a ConnectionError naming it.
    """
    from chainfs.client.sync import connect as _connect

    return _connect(address, token=token, config=config)


_LAZY = {
    "aio": ("chainfs.aio", None),
    "FileSystem": ("chainfs.client.sync", "FileSystem"),
    "AsyncFileSystem": ("chainfs.client.aio_fs", "AsyncFileSystem"),
    "ClientConfig": ("chainfs.client.config", "ClientConfig"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'chainfs' has no attribute {name!r}")
