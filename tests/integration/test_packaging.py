"""A client-only install (`pip install chainfs`, no extras) connects and reads.

The package is built from this checkout into a fresh virtualenv; the cluster
runs from the development environment, as servers and clients are separate
installs in practice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.testing.cluster import LocalCluster
from tests.integration.client_fixtures import module_cluster, pattern

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("rocksdict", "aetcd", "pyfuse3", "trio", "psutil", "matplotlib")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "packaging", storage_nodes=3, replicas=2)


def test_client_only_install_connects_and_reads(cluster: LocalCluster, tmp_path: Path) -> None:
    data = pattern(5 * 1024 * 1024 + 17, "packaging")
    fs = cluster.client()
    with fs.open("/pkg.bin", "wb") as f:
        f.write(data)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr

    script = textwrap.dedent(
        f"""
        import hashlib, importlib.util, json, sys
        import chainfs
        fs = chainfs.connect({cluster.address!r})
        with fs.open("/pkg.bin", "rb") as f:
            body = f.read()
        fs.close()
        print(json.dumps({{
            "file": chainfs.__file__,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "server_modules": [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)],
        }}))
        """
    )
    run = subprocess.run(
        [str(py), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert run.returncode == 0, run.stderr
    import hashlib
    import json

    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(venv))  # the installed copy, not this checkout
    assert got["size"] == len(data)
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    assert got["server_modules"] == []  # no server dependency came along
