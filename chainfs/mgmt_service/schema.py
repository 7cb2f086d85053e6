"""Keys of mgmtd's records in the KV store (all under ``MGMT|``)."""

from __future__ import annotations

import time

KEY_PREFIX = b"MGMT|"
KEY_ROUTING = KEY_PREFIX + b"routing"
KEY_COUNTERS = KEY_PREFIX + b"counters"
KEY_PRIMARY = KEY_PREFIX + b"primary"
KEY_LEASE = KEY_PREFIX + b"lease"
KEY_PEER = KEY_PREFIX + b"peer|"
KEY_CONFIG = KEY_PREFIX + b"config|"
KEY_CONFIG_VERSION = KEY_PREFIX + b"config_version"


def wall_ms() -> int:
    """Wall clock in ms, for records other processes display (never compared for leases)."""
    return int(time.time() * 1000)


def peer_key(node_id: int) -> bytes:
    return KEY_PEER + b"%010d" % node_id


# Users: MGMT|user|<name> -> User proto; MGMT|token|<token hash> -> user name;
# MGMT|users_version -> decimal version of the token directory (bumped on every change).
KEY_USER = KEY_PREFIX + b"user|"
KEY_TOKEN = KEY_PREFIX + b"token|"
KEY_USERS_VERSION = KEY_PREFIX + b"users_version"


def user_key(name: str) -> bytes:
    return KEY_USER + name.encode()


def token_key(token_hash: str) -> bytes:
    return KEY_TOKEN + token_hash.encode()
