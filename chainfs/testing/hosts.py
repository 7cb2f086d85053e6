"""Several "hosts" on this machine, and a chainfs cluster spread over them.

    with HostNetwork.create(["mgmtd", "meta", "storage1", "client"]) as net:
        host = net.hosts["meta"]
        host.address        # its address on the bridge (its only one besides lo)
        host.exec_prefix()  # prepend to a command to run it on that host
        net.address         # this machine's own address on the bridge

Each host is a network namespace with one veth link into a Linux bridge; the
bridge holds this machine's address, so a test here is one more host. The
addresses come from a /24 of 10.214.0.0/16 that overlaps nothing this
machine has. Traffic stays inside: the namespaces have no route but the
bridge's subnet. Needs root and ip(8), nsenter(1), unshare(1).

A command on a host runs in the host's network namespace and in a UTS
namespace of its own with the host's name as hostname: chainfs takes "same
hostname" to mean "same machine" (storage nodes are then reached through their
unix socket), so hosts must not share the real one. The mount namespace stays
this machine's (nsenter --net, not `ip netns exec`, which unshares it): a FUSE
mount made on a host is visible and unmountable here as usual.

Names carry this process's pid; ``close()`` (also on exit of the ``with``
block, on failure, and at interpreter exit) SIGKILLs what still runs in our
namespaces and removes them and the bridge; what a killed run left behind
(namespaces, their processes, bridge, FUSE mounts named by :func:`mount_name`)
is swept by the next ``create()``.

:class:`MultiHostCluster` runs a cluster over such a network the way
deploy/README.md tells an operator to: each service with ``chainfs serve KIND
--config F`` on its own host, the configs made from deploy/*.example.toml
with the host's bridge address, the chains made by ``chainfs admin
init-cluster``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chainfs.common import config as cfg
from chainfs.common.dataplane.address import MAX_UNIX_PATH_BYTES
from chainfs.common.errors import ChainfsError, Code
from chainfs.local.cluster import LocalCluster
from chainfs.local.process import FUSERMOUNT_TIMEOUT_S, MountProcess
from chainfs.testing.netns import free_network, pid_alive, run_ip

log = logging.getLogger(__name__)

POOL = ipaddress.IPv4Network("10.214.0.0/16")  # private; /24 blocks of it are handed out
_PREFIXLEN = 24
_NAMESPACE = re.compile(r"^chainfs-mh-(\d+)-(\d+)-(\d+)$")
_BRIDGE = re.compile(r"^mh(\d+)n(\d+)br$")
_MOUNT = re.compile(r"^chainfs-mh-(\d+)-")
_IFNAMSIZ = 15  # longest interface name Linux takes
_counter = itertools.count()

# Where the example configs live (a source checkout): what the cluster is made from.
DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"


def _bridge_name(pid: int, n: int) -> str:
    return f"mh{pid}n{n}br"


def mount_name(tag: str) -> str:
    """A mount point name the next sweep recognizes (and unmounts) if this process dies."""
    return f"chainfs-mh-{os.getpid()}-{tag}"


def _kill_namespace(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (ours: started inside it), then remove it."""
    for pid in run_ip("netns", "pids", namespace, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run_ip("netns", "del", namespace, check=False)  # takes its end of the veth pair along


def _cleanup(namespaces: list[str], bridge: str) -> None:
    for namespace in namespaces:
        _kill_namespace(namespace)
    run_ip("link", "del", bridge, check=False)


def _fuse_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        fields = [line.split() for line in f]
    return [p[1] for p in fields if len(p) > 2 and p[2].startswith("fuse")]


def sweep_stale() -> list[str]:
    """Remove what a HostNetwork of a process that no longer exists left behind;
    the names of what was removed."""
    removed = []
    for line in run_ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAMESPACE.match(name)
        if m and not pid_alive(int(m.group(1))):
            _kill_namespace(name)
            removed.append(name)
    for line in run_ip("-o", "link", "show", "type", "bridge").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = _BRIDGE.match(name)
        if m and not pid_alive(int(m.group(1))):
            run_ip("link", "del", name, check=False)
            removed.append(name)
    for mountpoint in _fuse_mounts():
        m = _MOUNT.match(Path(mountpoint).name)
        if m and not pid_alive(int(m.group(1))):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True,
                           timeout=FUSERMOUNT_TIMEOUT_S, check=False)  # fmt: skip
            removed.append(mountpoint)
    for name in removed:
        log.warning("removed %s left by a dead process", name)
    return removed


@dataclass(frozen=True)
class Host:
    """One host: a network namespace with ``address`` on the bridge."""

    name: str
    namespace: str
    address: str

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it on this host (each step execs: same pid)."""
        set_hostname = 'hostname "$0" && exec "$@"'
        return [
            "nsenter", f"--net=/run/netns/{self.namespace}",
            "unshare", "--uts", "sh", "-c", set_hostname, self.name,
        ]  # fmt: skip


class HostNetwork:
    """A bridge holding this machine's address and one namespace per host."""

    def __init__(self, bridge: str, network: ipaddress.IPv4Network) -> None:
        self.bridge = bridge
        self.network = network
        self.address = str(network[1])  # this machine's
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []  # filled as they are made: cleanup sees each
        self._finalizer = weakref.finalize(self, _cleanup, self._namespaces, bridge)

    @classmethod
    def create(cls, names: Sequence[str]) -> HostNetwork:
        if not names or len(set(names)) != len(names) or len(names) > 250:
            raise ChainfsError(Code.EINVAL, f"host names must be 1-250 distinct names: {names}")
        sweep_stale()
        n = next(_counter)
        pid = os.getpid()
        net = cls(_bridge_name(pid, n), free_network(POOL, _PREFIXLEN, pid * 7 + n))
        try:
            run_ip("link", "add", net.bridge, "type", "bridge")
            run_ip("addr", "add", f"{net.address}/{_PREFIXLEN}", "dev", net.bridge)
            run_ip("link", "set", net.bridge, "up")
            for i, name in enumerate(names):
                net._add_host(name, f"chainfs-mh-{pid}-{n}-{i}", f"mh{pid}n{n}h{i}")
        except BaseException:
            net.close()
            raise
        log.info("hosts on %s (%s): %s", net.bridge, net.network, net.hosts)
        return net

    def _add_host(self, name: str, namespace: str, outer_if: str) -> None:
        if len(outer_if) > _IFNAMSIZ:
            raise ChainfsError(Code.EINVAL, f"interface name {outer_if!r} too long")
        address = str(self.network[len(self.hosts) + 2])
        run_ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        run_ip("link", "add", outer_if, "type", "veth", "peer", "name", "eth0",
               "netns", namespace)  # fmt: skip
        run_ip("link", "set", outer_if, "master", self.bridge, "up")
        run_ip("-n", namespace, "addr", "add", f"{address}/{_PREFIXLEN}", "dev", "eth0")
        run_ip("-n", namespace, "link", "set", "lo", "up")
        run_ip("-n", namespace, "link", "set", "eth0", "up")
        self.hosts[name] = Host(name, namespace, address)

    def close(self) -> None:
        """Kill what still runs on our hosts; remove namespaces and bridge (idempotent)."""
        self._finalizer()

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- a cluster over the hosts ------------------------------------------------------


def example_config(kind: str, overrides: dict[str, Any]) -> Any:
    """deploy/KIND.example.toml with ``overrides``, as KIND's config object."""
    from chainfs.meta_service.config import MetaConfig
    from chainfs.mgmt_service.config import MgmtdConfig
    from chainfs.storage_service.config import StorageConfig

    classes: dict[str, type] = {"mgmtd": MgmtdConfig, "meta": MetaConfig, "storage": StorageConfig}
    path = DEPLOY_DIR / f"{kind}.example.toml"
    if not path.exists():
        raise ChainfsError(Code.ENOENT, f"{path}: the example configs come with the source tree")
    return cfg.load(classes[kind], path, overrides)


def _check_layout(net: HostNetwork, storage_hosts: int, kwargs: dict[str, Any]) -> None:
    """Refuse what this layout does not build, before anything starts."""
    want = ["mgmtd", "meta"] + (["client"] if kwargs.get("mount") is not None else [])
    missing = [h for h in want if h not in net.hosts]
    if missing or storage_hosts < 1 or kwargs["storage_nodes"] != storage_hosts:
        raise ChainfsError(
            Code.EINVAL,
            f"needs hosts {want} and one host storage<i> per storage node "
            f"({kwargs['storage_nodes']}); missing {missing}, {storage_hosts} storage hosts",
        )
    extra = {
        k: kwargs[k] for k in ("kv", "mgmtds", "metas") if kwargs.get(k, 1) not in (1, "rocksdb")
    }
    if extra:
        raise ChainfsError(
            Code.EINVAL, f"one mgmtd and one meta server on the embedded store only, not {extra}"
        )


class MultiHostCluster(LocalCluster):
    """mgmtd on host "mgmtd", meta on "meta", a storage node on each "storage*"
    host, the FUSE mount on "client" (``mount=DIR``: at ``DIR/mount_name("mnt")``,
    so that a later sweep finds it); this machine is one more client.

    Everything binds to and advertises its host's bridge address. Faults and
    clients as in LocalCluster (``kill_storage(i)``: the i-th storage host's node).
    """

    def __init__(self, base_dir: str | Path, net: HostNetwork, **kwargs: Any) -> None:
        self.net = net
        storage_hosts = sorted(h for h in net.hosts if h.startswith("storage"))
        self.storage_hosts = [net.hosts[h] for h in storage_hosts]
        kwargs.setdefault("storage_nodes", len(storage_hosts))
        _check_layout(net, len(storage_hosts), kwargs)
        super().__init__(base_dir, **kwargs)

    def host_of(self, name: str) -> Host:
        """The host a process (``mgmtd``, ``meta``, ``storage<i>``, ``mount``) runs on."""
        if name.startswith("storage"):
            return self.storage_hosts[int(name.removeprefix("storage"))]
        return self.net.hosts["client" if name == "mount" else name]

    def _start(self) -> None:
        """The operator's order (deploy/README.md "First start")."""
        mgmtd = self.host_of("mgmtd")
        self._prepare_credentials()
        self.mgmtds.append(self._spawn("mgmtd", "mgmtd", self._mgmtd_config(0)))
        self.mgmtd = self.mgmtds[0]
        for i in range(self.n_storage):
            self.storage.append(self._spawn("storage", f"storage{i}", self._storage_config(i)))
        self.metas.append(self._spawn("meta", "meta", self._meta_config(0)))
        self.meta = self.metas[0]
        want = self.n_storage * self.targets_per_node
        self._wait_routing(
            lambda r: len(r.targets) >= want,
            lambda r: f"only {len(r.targets)} of {want} storage targets registered",
        )
        self.admin(mgmtd, "init-cluster", "--replicas", str(self.replicas))
        self._wait_meta(1)
        if self._mount_request is not None:
            self._mount(self._mount_request)

    def admin(self, host: Host, *args: str) -> Any:
        """``chainfs admin ARGS --json`` run on ``host``; its answer."""
        cmd = [*host.exec_prefix(), sys.executable, "-m", "chainfs", "admin", *args]
        cmd += ["--address", self.address, "--token-file", str(self.admin_token_file), "--json"]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=self.start_timeout_s, check=False
        )
        if out.returncode != 0:
            raise ChainfsError(
                Code.EIO, f"chainfs admin {' '.join(args)} on {host.name}: {out.stderr[-2000:]}"
            )
        return json.loads(out.stdout)

    def exec_prefix(self, name: str) -> list[str]:
        return self.host_of(name).exec_prefix()

    def _mgmtd_config(self, i: int) -> Any:
        overrides: dict[str, Any] = {
            "listen_host": self.host_of("mgmtd").address,
            "data_dir": str(self.base_dir / "mgmtd" / "data"),
            "cluster_secret_file": str(self.secret_file),
            "admin_token_file": str(self.admin_token_file),
        }
        if self.heartbeat_interval_ms is not None:
            overrides["heartbeat_interval_ms"] = self.heartbeat_interval_ms
        if self.heartbeat_timeout_ms is not None:
            overrides["heartbeat_timeout_ms"] = self.heartbeat_timeout_ms
        return example_config("mgmtd", overrides)

    def _storage_config(self, i: int) -> Any:
        node_dir = self.base_dir / f"storage{i}"
        overrides: dict[str, Any] = {
            "listen_host": self.host_of(f"storage{i}").address,
            "mgmtd_addresses": self.mgmtd_addresses,
            "targets": [str(node_dir / f"t{j}") for j in range(self.targets_per_node)],
            "cluster_secret_file": str(self.secret_file),
        }
        if self.heartbeat_interval_ms is not None:
            overrides["heartbeat_interval_ms"] = self.heartbeat_interval_ms
        c = example_config("storage", overrides)
        if self.configure_storage is not None:
            self.configure_storage(i, c)
        return c

    def _meta_config(self, i: int = 0) -> Any:
        overrides = {
            "listen_host": self.host_of("meta").address,
            "kv_url": f"rocksdb://{self.base_dir / 'meta' / 'kv'}",
            "mgmtd_addresses": self.mgmtd_addresses,
            "cluster_secret_file": str(self.secret_file),
            # In the run's directory, not the example's /run/chainfs-meta.
            "unix_socket": _short_socket(self.base_dir / "meta" / "meta.sock"),
        }
        return example_config("meta", overrides)

    def _mount(self, mountpoint: Path) -> None:
        """`chainfs mount` on the client host, at a mount point a later sweep knows."""
        mountpoint = mountpoint / mount_name("mnt")
        mountpoint.mkdir(parents=True, exist_ok=True)
        proc = MountProcess(
            mountpoint,
            self.address,
            self.base_dir / "mount",
            self.mount_options,
            token_file=self._mount_token_file(),
        )
        proc.prefix = self.exec_prefix("mount")
        self._mount_proc = proc
        proc.start(self.start_timeout_s)
        self.mountpoint = mountpoint

    def config_paths(self) -> list[Path]:
        """The config file of every service started."""
        return [p.config_path for p in self._procs]

    @property
    def mount_process(self) -> MountProcess | None:
        """The FUSE mount's process (on the client host), if mounted."""
        return self._mount_proc


__all__ = [
    "Host",
    "HostNetwork",
    "MultiHostCluster",
    "example_config",
    "mount_name",
    "sweep_stale",
]


def _short_socket(path: Path) -> str:
    """``path`` as a unix socket path, or "" (TCP only) when the kernel cannot take it."""
    return str(path) if len(os.fsencode(str(path))) < MAX_UNIX_PATH_BYTES else ""
