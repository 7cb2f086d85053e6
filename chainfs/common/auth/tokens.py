"""Users' tokens: 256 random bits, shown once, stored only as a SHA-256 hash.

A token is ``cfs_`` + 43 base64url characters. Its hash (hex) is the key
that finds its user, so checking a token is one hash and one lookup; a
stolen copy of the store yields no usable token. (A slow password hash buys
nothing for 256-bit random secrets.)
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from chainfs.common.errors import ChainfsError, Code

PREFIX = "cfs_"
TOKEN_BYTES = 32
TOKEN_ENV = "CHAINFS_TOKEN"
TOKEN_FILE_ENV = "CHAINFS_TOKEN_FILE"
ADMIN_TOKEN_FILE_NAME = "admin.token"


def new_token() -> str:
    raw = secrets.token_bytes(TOKEN_BYTES)
    return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token_hash(token: str) -> str:
    """The stored form of ``token`` (hex SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(token: str) -> bool:
    return token.startswith(PREFIX) and 40 <= len(token) <= 64


def write_token_file(path: str | Path, token: str) -> None:
    """Write ``token`` to ``path`` with mode 0600 (replacing any old file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, p)


def read_token_file(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ChainfsError(Code.CONFIG_ERROR, f"cannot read token file {path}: {e}") from None
    if not looks_like_token(token):
        raise ChainfsError(Code.CONFIG_ERROR, f"{path} does not hold a chainfs token")
    return token


def resolve_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The token a client uses: the argument, else ``token_file``, else
    $CHAINFS_TOKEN, else the file named by $CHAINFS_TOKEN_FILE; None if none."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env.strip()
    env_file = os.environ.get(TOKEN_FILE_ENV)
    if env_file:
        return read_token_file(env_file)
    return None
