"""Data-plane addresses: ``host:port``, ``[v6]:port`` or ``unix:/path``."""

from __future__ import annotations

import socket

from chainfs.common.errors import ChainfsError, Code

UNIX_PREFIX = "unix:"
MAX_UNIX_PATH_BYTES = 108  # sizeof(sockaddr_un.sun_path) on Linux, NUL included


def parse_address(address: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """(family, sockaddr) of an address string; EINVAL if it is not one."""
    if address.startswith(UNIX_PREFIX):
        path = address[len(UNIX_PREFIX) :]
        if not path:
            raise ChainfsError(Code.EINVAL, f"bad data-plane address {address!r}")
        return socket.AF_UNIX, path
    host, sep, port_s = address.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ChainfsError(Code.EINVAL, f"bad data-plane address {address!r} (want host:port)")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port_s))
    return socket.AF_INET, (host, int(port_s))


def format_tcp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
