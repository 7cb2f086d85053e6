"""The cluster secret and the keys derived from it.

Every server of a cluster (mgmtd, meta, storage) reads the same secret from a
file (0600). From it:

- a node's key: HMAC(secret, "node|<id>"). A node presents (id, key); any
  server recomputes the key to check it, so no key table is needed. A node
  that leaks its key exposes only its own identity; one that leaks the
  secret exposes the cluster (the threat model in deploy/README.md).
- the capability key: HMAC(secret, "capability|<key_id>"), shared by meta
  (which signs) and storage (which checks).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cpb

SECRET_BYTES = 32
SECRET_FILE_NAME = "cluster.secret"


def create_secret_file(path: str | Path) -> bytes:
    """Write a new random secret to ``path`` (0600; never overwrites)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_secret(p)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return secret


def load_secret(path: str | Path) -> bytes:
    """The secret in ``path``; CONFIG_ERROR if absent, malformed or readable by others."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text().strip()
    except OSError as e:
        raise ChainfsError(Code.CONFIG_ERROR, f"cannot read cluster secret {p}: {e}") from None
    if st.st_mode & 0o077:
        raise ChainfsError(
            Code.CONFIG_ERROR,
            f"cluster secret {p} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it",
        )
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ChainfsError(Code.CONFIG_ERROR, f"cluster secret {p} is not hex") from None
    if len(secret) < 16:
        raise ChainfsError(Code.CONFIG_ERROR, f"cluster secret {p} is shorter than 128 bits")
    return secret


# The node id a meta or storage node presents before mgmtd gave it one: its key
# (derived from the cluster secret like any node's) lets it register as a new
# node and nothing else (mgmtd checks).
JOIN_NODE_ID = (1 << 32) - 1
# The node id mgmtd presents when it calls storage nodes (the rebalancer's
# DropChunks); no storage or meta node is ever given it.
MGMTD_NODE_ID = (1 << 32) - 2


def node_key(secret: bytes, node_id: int) -> bytes:
    return hmac.digest(secret, b"node|%d" % node_id, hashlib.sha256)


def check_node_key(secret: bytes, node_id: int, key: bytes) -> bool:
    return node_id > 0 and hmac.compare_digest(node_key(secret, node_id), key)


def capability_key(secret: bytes, key_id: int = 1) -> bytes:
    return hmac.digest(secret, b"capability|%d" % key_id, hashlib.sha256)


def node_credential(secret: bytes, node_id: int) -> cpb.Credential:
    """What node ``node_id`` presents to mgmtd and its peers (HELLO, gRPC
    metadata); 0 = not yet registered, presented as :data:`JOIN_NODE_ID`."""
    if node_id < 0:
        raise ChainfsError(Code.EINVAL, f"a node id is never negative (got {node_id})")
    nid = node_id or JOIN_NODE_ID
    return cpb.Credential(node_id=nid, node_key=node_key(secret, nid))
