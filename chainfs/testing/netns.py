"""A network namespace joined to this one by a veth pair, for partition tests.

    with NetnsLink.create() as net:
        ServiceProcess(..., prefix=net.exec_prefix())  # a process inside the namespace
        net.outer_address, net.inner_address           # the two ends of a private /30
        net.cut()        # the namespace can reach nothing outside, nor be reached
        net.restore()

Needs root and ip(8) (iproute2). The names carry this process's pid and the
/30 comes from 10.213.0.0/16, picked so it overlaps no address or route this
machine already has. Traffic stays on this machine: the veth pair only links
our namespace to this one. Everything created here (namespace, veth pair,
route) is removed by close(), on exit of the ``with`` block (also when it
fails) and at interpreter exit; what a killed process left behind is swept by
the next create(). Stop the processes inside the namespace first:
a namespace lives on while a process is in it.

While cut, the outer end is down and an ``unreachable`` route (higher metric
than the link's own) answers EHOSTUNREACH to anything here that still sends to
the inner address, so those packets never leave through the default route.
From inside, packets to the outside are dropped silently (no carrier): the
node sees timeouts, as across a real partition. Inside, the node still
reaches its own address (clients started in the namespace see it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import os
import re
import subprocess
import weakref

from chainfs.common.errors import ChainfsError, Code

log = logging.getLogger(__name__)

POOL = ipaddress.IPv4Network("10.213.0.0/16")  # private; /30 blocks of it are handed out
_UNREACHABLE_METRIC = 4000  # above the kernel's own prefix route (metric 0)
_IP_TIMEOUT_S = 30.0
_counter = itertools.count()
# Route types that `ip route` prints before the destination.
_ROUTE_TYPES = frozenset({"unreachable", "blackhole", "prohibit", "local", "broadcast", "throw"})


def run_ip(*args: str, check: bool = True) -> str:
    out = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False
    )
    if check and out.returncode != 0:
        raise ChainfsError(
            Code.EIO, f"ip {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}"
        )
    return out.stdout


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this namespace has an address in or a route to."""
    nets = []
    for line in run_ip("-4", "-o", "addr", "show").splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for line in run_ip("-4", "route", "show", "table", "all").splitlines():
        parts = line.split()
        if parts and parts[0] in _ROUTE_TYPES:
            parts = parts[1:]
        if not parts or parts[0] == "default":
            continue
        dest = parts[0]
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(dest, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def free_network(pool: ipaddress.IPv4Network, prefixlen: int, seed: int) -> ipaddress.IPv4Network:
    """A /``prefixlen`` of ``pool`` that overlaps no address or route in use here,
    searched from block ``seed`` on (so concurrent users start apart)."""
    used = [n for n in networks_in_use() if n.prefixlen > 0]
    blocks = list(pool.subnets(new_prefix=prefixlen))
    for k in range(len(blocks)):
        net = blocks[(seed + k) % len(blocks)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise ChainfsError(Code.EBUSY, f"no free /{prefixlen} left in {pool}")


def _cleanup(namespace: str, outer: str, route: str) -> None:
    """Remove what NetnsLink created; every step runs even if an earlier one failed
    (or never happened: removing what is not there only fails quietly)."""
    run_ip("route", "del", "unreachable", route, "metric", str(_UNREACHABLE_METRIC), check=False)
    run_ip("link", "del", outer, check=False)  # takes the peer along
    run_ip("netns", "del", namespace, check=False)


def _outer_if(tag: str, pid: int, n: int) -> str:
    return f"{tag[:3]}{pid}o{n}"[:15]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(tag: str = "cfs") -> list[str]:
    """Remove what a NetnsLink of a process that no longer exists left behind
    (it was killed before it could clean up); the names of namespaces removed."""
    pattern = re.compile(rf"^chainfs-{re.escape(tag)}-(\d+)-(\d+)-(\d+)$")
    removed = []
    for line in run_ip("netns", "list").splitlines():
        m = pattern.match(line.split()[0]) if line.strip() else None
        if m is None:
            continue
        pid, n, block = (int(g) for g in m.groups())
        if pid_alive(pid):
            continue
        route = f"{POOL[block * 4]}/30"
        log.warning("removing namespace %s left by dead process %d", m.group(0), pid)
        _cleanup(m.group(0), _outer_if(tag, pid, n), route)
        removed.append(m.group(0))
    return removed


class NetnsLink:
    """A namespace ``name`` with one veth link to this namespace (a private /30)."""

    def __init__(self, name: str, outer_if: str, inner_if: str, network: ipaddress.IPv4Network):
        self.name = name
        self.outer_if = outer_if
        self.inner_if = inner_if
        self.network = network
        hosts = list(network.hosts())
        self.outer_address = str(hosts[0])  # this side
        self.inner_address = str(hosts[1])  # inside the namespace
        self.is_cut = False
        self._finalizer = weakref.finalize(self, _cleanup, name, outer_if, str(network))

    @classmethod
    def create(cls, tag: str = "cfs") -> NetnsLink:
        """Create the namespace, the veth pair and their addresses; links up."""
        sweep_stale(tag)
        n = next(_counter)
        pid = os.getpid()
        network = free_network(POOL, 30, pid * 31 + n)
        block = (int(network.network_address) - int(POOL.network_address)) // 4
        # The name records what a later sweep_stale() needs; interface names are
        # at most 15 bytes.
        net = cls(
            f"chainfs-{tag}-{pid}-{n}-{block}",
            _outer_if(tag, pid, n),
            f"{tag[:3]}{pid}i{n}"[:15],
            network,
        )
        try:
            run_ip("netns", "add", net.name)
            run_ip("link", "add", net.outer_if, "type", "veth", "peer", "name", net.inner_if,
                "netns", net.name)  # fmt: skip
            run_ip("addr", "add", f"{net.outer_address}/30", "dev", net.outer_if)
            run_ip("-n", net.name, "addr", "add", f"{net.inner_address}/30", "dev", net.inner_if)
            run_ip("-n", net.name, "link", "set", "lo", "up")
            run_ip("-n", net.name, "link", "set", net.inner_if, "up")
            run_ip("link", "set", net.outer_if, "up")
            run_ip("route", "add", "unreachable", str(net.network),
                "metric", str(_UNREACHABLE_METRIC))  # fmt: skip
        except BaseException:
            net.close()
            raise
        log.info("namespace %s: %s <-> %s", net.name, net.outer_address, net.inner_address)
        return net

    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside the namespace (execs it: same pid)."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """Partition: nothing crosses the link until restore()."""
        run_ip("link", "set", self.outer_if, "down")
        self.is_cut = True

    def restore(self) -> None:
        run_ip("link", "set", self.outer_if, "up")
        self.is_cut = False

    def close(self) -> None:
        """Remove the route, the veth pair and the namespace (idempotent)."""
        self._finalizer()

    def __enter__(self) -> NetnsLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
