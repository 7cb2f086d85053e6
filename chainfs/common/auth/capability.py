"""Capabilities: meta signs one at open, storage checks it on every request.

The MAC covers the inode, rights, client id, expiry and key id in a fixed
binary layout (not the protobuf bytes, whose encoding is not canonical).
Expiry is wall-clock ms: servers' clocks must agree within
``CLOCK_SKEW_MS`` (NTP does far better).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb

READ = cpb.CAP_READ
WRITE = cpb.CAP_WRITE
CLOCK_SKEW_MS = 5_000
_FIELDS = struct.Struct("<QIQI")  # inode, rights, expires_ms, key_id (client id follows)


def _mac(key: bytes, cap: cpb.Capability) -> bytes:
    body = _FIELDS.pack(cap.inode, cap.rights, cap.expires_ms, cap.key_id) + cap.client_id
    return hmac.digest(key, body, hashlib.sha256)


def sign(
    key: bytes,
    key_id: int,
    inode: int,
    rights: int,
    client_id: bytes,
    ttl_ms: int,
    step_ms: int = 1,
) -> cpb.Capability:
    """A capability that expires ``ttl_ms`` from now, rounded up to a multiple of
    ``step_ms``: every grant of the same rights on the same inode to the same
    client within one step is then the very same capability, bit for bit, so
    the checks storage has passed (and cached) keep passing without an HMAC."""
    assert step_ms >= 1
    expires_ms = -(-(int(time.time() * 1000) + ttl_ms) // step_ms) * step_ms
    cap = cpb.Capability(
        inode=inode,
        rights=rights,
        client_id=client_id,
        expires_ms=expires_ms,
        key_id=key_id,
    )
    cap.mac = _mac(key, cap)
    return cap


def check(
    keys: dict[int, bytes],
    cap: cpb.Capability,
    inode: int,
    rights: int,
    client_id: bytes | None = None,
    now_ms: int | None = None,
) -> None:
    """Raise BAD_CAPABILITY unless ``cap`` is genuine, unexpired, for ``inode``,
    grants every bit of ``rights`` and (when given) was issued to ``client_id``."""
    key = keys.get(cap.key_id)
    if key is None or not cap.mac:
        raise ChainfsError(Code.BAD_CAPABILITY, "no valid capability with the request")
    if not hmac.compare_digest(_mac(key, cap), cap.mac):
        raise ChainfsError(Code.BAD_CAPABILITY, "capability signature does not match")
    if cap.inode != inode:
        raise ChainfsError(Code.BAD_CAPABILITY, f"capability is for inode {cap.inode}, not {inode}")
    if cap.rights & rights != rights:
        raise ChainfsError(Code.BAD_CAPABILITY, "capability does not grant this access")
    if client_id is not None and cap.client_id != client_id:
        raise ChainfsError(Code.BAD_CAPABILITY, "capability was issued to another client")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if cap.expires_ms + CLOCK_SKEW_MS < now:
        raise ChainfsError(Code.BAD_CAPABILITY, "capability expired")
