"""Shared test set-up.

``require(capability, available, why)``: when a capability (etcd, FUSE, torch,
...) is missing, the test skips locally but *fails* under CHAINFS_REQUIRE_ALL=1
(as CI runs), so nothing hides behind a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_ALL = os.environ.get("CHAINFS_REQUIRE_ALL") == "1"


def require(capability: str, available: bool, why: str = "") -> None:
    if available:
        return
    msg = f"missing capability {capability}" + (f": {why}" if why else "")
    if REQUIRE_ALL:
        pytest.fail(msg + " (CHAINFS_REQUIRE_ALL=1)", pytrace=False)
    pytest.skip(msg)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(name, path is not None, f"`{name}` not on PATH (deploy/bootstrap.sh installs it)")
    assert path is not None
    return path


_HANDLED = re.compile(r'^grpc_server_handled_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)$', re.M)


def etcd_rpc_counts(client_url: str) -> Counter[str]:
    """gRPC calls an etcd member has answered, by method ("Range", "Txn", ...),
    from its own /metrics: round trips counted by the server, not by us."""
    with urllib.request.urlopen(f"{client_url}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    counts: Counter[str] = Counter()
    for method, n in _HANDLED.findall(text):
        counts[method] += int(float(n))
    return counts


@pytest.fixture(scope="session", autouse=True)
def session_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One admin token for the session: every LocalCluster adopts the token
    $CHAINFS_TOKEN_FILE names as its admin's, and clients (in this process and
    in the scripts tests spawn) present it by default, as a user's shell would."""
    from chainfs.common.auth.tokens import TOKEN_ENV, TOKEN_FILE_ENV, new_token, write_token_file

    token = new_token()
    path = tmp_path_factory.mktemp("credentials") / "admin.token"
    write_token_file(path, token)
    saved = {k: os.environ.pop(k, None) for k in (TOKEN_ENV, TOKEN_FILE_ENV)}
    os.environ[TOKEN_FILE_ENV] = str(path)
    yield token
    os.environ.pop(TOKEN_FILE_ENV, None)
    os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A per-test directory for data and logs of processes the test starts."""
    yield tmp_path
