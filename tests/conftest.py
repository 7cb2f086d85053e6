"""Shared test set-up.

``require(capability, available, why)``: when a capability (etcd, FUSE, torch,
...) is missing, the test skips locally but *fails* under CHAINFS_REQUIRE_ALL=1
(as CI runs), so nothing hides behind a skip.
"""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A per-test directory for data and logs of processes the test starts."""
    yield tmp_path
