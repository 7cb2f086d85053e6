"""A cluster with TLS on (`LocalCluster(tls=True)`, `chainfs up --tls`): users
with the cluster's CA read what they wrote; everyone else is refused clearly."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import chainfs
from chainfs.client.config import ClientConfig
from chainfs.common import tls
from chainfs.common.dataplane import DataClient, DataPlaneConfig
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.common.tls import TlsConfig
from chainfs.proto import mgmt_pb2 as mp
from chainfs.testing import LocalCluster
from tests.conftest import require

pytestmark = pytest.mark.timeout(180)
MiB = 1024 * 1024
T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    require("cryptography", importlib.util.find_spec("cryptography") is not None)
    base = tmp_path_factory.mktemp("tls-cluster")
    with LocalCluster(base, storage_nodes=2, targets_per_node=1, replicas=2, tls=True) as c:
        yield c


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    """Material of another CA: a CA file and a node certificate it signed."""
    from chainfs.local.tls_material import init_tls_dir

    return init_tls_dir(tmp_path_factory.mktemp("foreign"), nodes=["rogue"])


def _run(tls_config: TlsConfig, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh loop under ``tls_config`` (a process of its own, in effect)."""
    with tls.using(tls_config):
        return asyncio.run(coro)


async def _routing_version(address: str) -> int:
    async with MgmtClient(address, timeout_s=3.0) as mgmt:
        routing = await mgmt.get_routing()
        assert routing is not None
        return routing.version


async def _register_rogue_node(address: str) -> None:
    node = mp.NodeInfo(type=mp.STORAGE, hostname="rogue", rpc_address="127.0.0.1:1")
    async with MgmtClient(address, timeout_s=3.0) as mgmt:
        await mgmt.register_node(node)


def test_client_with_the_cluster_ca_reads_what_it_wrote(cluster: LocalCluster) -> None:
    # Storage over TCP (not the same-host unix socket): the chunk bytes travel TLS.
    tcp = ClientConfig(storage=StorageClientConfig(prefer_unix_socket=False))
    fs = cluster.client(config=tcp)
    assert fs.config.tls is not None and fs.config.tls.ca_file  # TLS as a user: CA only
    assert not fs.config.tls.cert_file
    data = os.urandom(9 * MiB + 17)  # three chunks on both chains
    fs.mkdir("/tls")
    with fs.open("/tls/blob", "wb") as f:
        f.write(data)
    with fs.open("/tls/blob", "rb") as f:
        assert f.read() == data
    fs.rename("/tls/blob", "/tls/moved")
    assert fs.listdir("/tls") == ["moved"]
    assert fs.stat("/tls/moved").st_size == len(data)
    assert fs.read_ranges([("/tls/moved", 4 * MiB - 3, 10)]) == [data[4 * MiB - 3 : 4 * MiB + 7]]
    fs.remove("/tls/moved")
    fs.rmdir("/tls")


def test_client_with_a_wrong_ca_fails_clearly(
    cluster: LocalCluster, foreign: dict[str, TlsConfig]
) -> None:
    config = ClientConfig(tls=TlsConfig(ca_file=foreign["rogue"].ca_file), connect_timeout_ms=3000)
    with pytest.raises(OSError) as ei:
        chainfs.connect(cluster.address, config=config)
    assert "not trusted" in str(ei.value), ei.value


def test_grpc_with_a_wrong_ca_fails(cluster: LocalCluster, foreign: dict[str, TlsConfig]) -> None:
    wrong = TlsConfig(
        ca_file=foreign["rogue"].ca_file,
        cert_file=cluster.tls.cert_file,  # type: ignore[union-attr]
        key_file=cluster.tls.key_file,  # type: ignore[union-attr]
    )
    with pytest.raises(ChainfsError) as ei:
        _run(wrong, _routing_version(cluster.address))
    assert ei.value.code in (Code.UNAVAILABLE, Code.ETIMEDOUT)


def test_plain_clients_cannot_talk_to_a_tls_cluster(cluster: LocalCluster) -> None:
    plain = ClientConfig(tls=TlsConfig(), connect_timeout_ms=3000)
    with pytest.raises(OSError):
        chainfs.connect(cluster.address, config=plain)
    with pytest.raises(ChainfsError) as ei:
        _run(TlsConfig(), _routing_version(cluster.address))
    assert ei.value.code in (Code.UNAVAILABLE, Code.ETIMEDOUT)
    assert cluster.tls is not None
    storage = _run(cluster.tls, _storage_data_addresses(cluster.address))
    assert storage
    for address in storage:  # the storage nodes' TCP data plane is TLS too
        with pytest.raises(ChainfsError) as ei:
            _run(TlsConfig(), _plain_request(address))
        assert ei.value.code == Code.UNAVAILABLE, ei.value


async def _storage_data_addresses(address: str) -> list[str]:
    async with MgmtClient(address, timeout_s=3.0) as mgmt:
        routing = await mgmt.get_routing()
        assert routing is not None
        return [n.data_address for n in routing.nodes_of_type(mp.STORAGE)]


async def _plain_request(address: str) -> None:
    client = DataClient(DataPlaneConfig(tls=TlsConfig()))
    try:
        await client.request(address, 1, b"", timeout_s=5)
    finally:
        await client.close()


def test_grpc_requires_a_certificate_of_the_cluster_ca(
    cluster: LocalCluster, foreign: dict[str, TlsConfig]
) -> None:
    """Mutual TLS on gRPC: the CA alone (a user), or a certificate another CA
    signed, cannot call node RPCs; the admin certificate can."""
    assert cluster.tls is not None
    assert _run(cluster.tls, _routing_version(cluster.address)) > 0
    user = TlsConfig(ca_file=cluster.tls.ca_file)
    rogue = TlsConfig(
        ca_file=cluster.tls.ca_file,
        cert_file=foreign["rogue"].cert_file,
        key_file=foreign["rogue"].key_file,
    )
    for who in (user, rogue):
        with pytest.raises(ChainfsError) as ei:
            _run(who, _register_rogue_node(cluster.address))
        assert ei.value.code in (Code.UNAVAILABLE, Code.ETIMEDOUT), ei.value
    nodes = _run(cluster.tls, _hostnames(cluster.address))
    assert "rogue" not in nodes


async def _hostnames(address: str) -> list[str]:
    async with MgmtClient(address, timeout_s=3.0) as mgmt:
        routing = await mgmt.get_routing()
        assert routing is not None
        return [n.hostname for n in routing.nodes.values()]


def test_private_keys_are_readable_by_their_owner_only(cluster: LocalCluster) -> None:
    assert cluster.tls is not None
    tls_dir = Path(cluster.tls.ca_file).parent
    keys = sorted(tls_dir.glob("*.key"))
    names = {k.name for k in keys}
    assert names >= {"ca.key", "admin.key", "mgmtd.key", "meta.key", "storage0.key"}
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_chainfs_up_tls_serves_users_and_admins_what_it_prints(tmp_path: Path) -> None:
    """`chainfs up --tls`: the printed exports are what users and admin tools need."""
    require("cryptography", importlib.util.find_spec("cryptography") is not None)
    from tests.integration.test_ops_commands import chainfs_up

    data = tmp_path / "up"
    shape = ("--storage-nodes", "1", "--targets-per-node", "1", "--replicas", "1")
    with chainfs_up(data, "--tls", *shape, "--sample-data") as address:
        out = (tmp_path / "up-up.out").read_text()
        exports = dict(re.findall(r"export (CHAINFS_TLS_\w+)=(\S+)", out))
        assert set(exports) == {tls.CA_FILE_ENV, tls.CERT_FILE_ENV, tls.KEY_FILE_ENV}, out
        user = dict(os.environ, CHAINFS_ADDRESS=address, COLUMNS="240")
        user[tls.CA_FILE_ENV] = exports[tls.CA_FILE_ENV]
        admin = {**user, **exports}
        status = [sys.executable, "-m", "chainfs", "admin", "status", "--json"]
        ok = subprocess.run(status, env=admin, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["mgmtd"] == address
        refused = subprocess.run(status, env=user, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0  # gRPC wants a certificate
        config = ClientConfig(tls=TlsConfig(ca_file=exports[tls.CA_FILE_ENV]))
        with chainfs.connect(address, config=config) as fs:
            with fs.open("/from-user", "wb") as f:
                f.write(b"tls user")
            with fs.open("/from-user", "rb") as f:
                assert f.read() == b"tls user"
