"""Keys of mgmtd's records in the KV store (all under ``MGMT|``)."""

from __future__ import annotations

import time

KEY_PREFIX = b"MGMT|"
# The cluster state, one key per record so that one change writes a few keys:
# a header (routing version, cluster id, replicas: a RoutingInfo without its
# lists), then one NodeInfo / TargetInfo / ChainInfo per key, loaded by range.
KEY_STATE_HEADER = KEY_PREFIX + b"state"
KEY_NODE = KEY_PREFIX + b"node|"
KEY_TARGET = KEY_PREFIX + b"target|"
KEY_CHAIN = KEY_PREFIX + b"chain|"
# The old layout: the whole RoutingInfo in one value; converted once on load.
KEY_ROUTING = KEY_PREFIX + b"routing"
KEY_COUNTERS = KEY_PREFIX + b"counters"
KEY_PRIMARY = KEY_PREFIX + b"primary"
KEY_LEASE = KEY_PREFIX + b"lease"
KEY_PEER = KEY_PREFIX + b"peer|"
KEY_CONFIG = KEY_PREFIX + b"config|"
KEY_CONFIG_VERSION = KEY_PREFIX + b"config_version"
# The last rebalance run (a RebalanceRun), rewritten as its moves go on.
KEY_REBALANCE = KEY_PREFIX + b"rebalance"


def wall_ms() -> int:
    """Wall clock in ms, for records other processes display (never compared for leases)."""
    return int(time.time() * 1000)


def peer_key(node_id: int) -> bytes:
    return KEY_PEER + b"%010d" % node_id


def node_key(node_id: int) -> bytes:
    return KEY_NODE + b"%010d" % node_id


def target_key(target_id: int) -> bytes:
    return KEY_TARGET + b"%020d" % target_id


def chain_key(chain_id: int) -> bytes:
    return KEY_CHAIN + b"%010d" % chain_id


# Users: MGMT|user|<name> -> User proto; MGMT|token|<token hash> -> user name;
# MGMT|users_version -> decimal version of the token directory (bumped on every change).
KEY_USER = KEY_PREFIX + b"user|"
KEY_TOKEN = KEY_PREFIX + b"token|"
KEY_USERS_VERSION = KEY_PREFIX + b"users_version"


def user_key(name: str) -> bytes:
    return KEY_USER + name.encode()


def token_key(token_hash: str) -> bytes:
    return KEY_TOKEN + token_hash.encode()
