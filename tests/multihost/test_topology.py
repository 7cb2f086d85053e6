"""The cluster over hosts is laid out as deploy/README.md says: each service on its
host, bound to and registered with the host's bridge address, never loopback."""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterator
from typing import Any

from chainfs.testing.hosts import MultiHostCluster


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_configs_name_no_loopback_address(hosts: MultiHostCluster) -> None:
    paths = hosts.config_paths()
    assert len(paths) == 2 + hosts.n_storage
    for path in paths:
        for s in _strings(tomllib.loads(path.read_text())):
            assert "127.0.0." not in s and "localhost" not in s and "::1" not in s, (path, s)


def test_every_node_registered_from_its_own_host(hosts: MultiHostCluster) -> None:
    mgmtd = hosts.host_of("mgmtd")
    nodes = hosts.admin(hosts.host_of("meta"), "nodes")  # run the admin tool on another host
    want = {hosts.host_of(f"storage{i}").name for i in range(hosts.n_storage)} | {"meta"}
    by_host = {n["hostname"]: n for n in nodes}
    assert set(by_host) == want
    bridge = hosts.net.network
    for name, node in by_host.items():
        address = hosts.net.hosts[name].address
        assert node["status"] == "online"
        assert node["rpc_address"].rsplit(":", 1)[0] == address
        assert node["data_address"].rsplit(":", 1)[0] == address
        assert ipaddress.ip_address(address) in bridge
    assert hosts.address.startswith(f"{mgmtd.address}:")
    chains = hosts.admin(mgmtd, "chains")
    assert chains and all(len(c["targets"]) == hosts.replicas for c in chains)
