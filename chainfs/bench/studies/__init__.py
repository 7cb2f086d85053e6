"""Focused measurements outside the suite: ``chainfs bench <study>``.

The suite (``chainfs bench``) measures what a user sees against this machine's
ceilings. A study looks closer at one part (the data plane, the storage read
path, the KV backends, failover...) with its own knobs. Each study is a
function ``run(opts, echo) -> report``: ``opts`` holds its options by name
(declared as data here, so the CLI builds the command from them; every study
also gets ``data_dir``, where its servers' data go, None for the temp
directory), ``echo``
prints progress and the final table, and the report is a JSON-ready dict
(``chainfs bench <study> --json FILE`` writes it).

Studies bring up servers only through :mod:`chainfs.bench.cluster` and
measure iperf3, fio and the local directory only through
:mod:`chainfs.bench.ceilings`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Echo = Callable[[str], None]
StudyFn = Callable[[dict[str, Any], Echo], dict[str, Any]]


@dataclass(frozen=True)
class Opt:
    """One option of a study: ``--name`` with its default (its type) and help."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Study:
    name: str  # the subcommand
    entry: str  # "module.function" under chainfs.bench.studies: function(opts, echo)
    help: str
    options: tuple[Opt, ...]

    def run(self, opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
        module, function = self.entry.rsplit(".", 1)
        mod = importlib.import_module(f"chainfs.bench.studies.{module}")
        fn: StudyFn = getattr(mod, function)
        return fn(opts, echo)


def _default(text: str) -> Any:
    """A default as an options table writes it: ``flag``, ``-`` (empty), a number, text."""
    if text == "flag":
        return False
    if text == "-":
        return ""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options(table: str) -> tuple[Opt, ...]:
    """Options from a table of ``--name  default  help`` lines (read like ``--help``);
    a default ``a|b`` is a choice whose first item is the default."""
    out = []
    for line in table.strip().splitlines():
        flag, default, text = line.split(None, 2)
        assert flag.startswith("--"), line
        choices = tuple(default.split("|")) if "|" in default else None
        out.append(Opt(flag[2:], choices[0] if choices else _default(default), text, choices))
    return tuple(out)


STUDIES: tuple[Study, ...] = (
    Study(
        "client",
        "client_read.run",
        "Client sequential reads, read_ranges and the RSS of reading 2 GiB, against iperf3.",
        _options("""
            --file-mib        1024  size of the file read
            --seconds         8.0   seconds per measurement
            --block-mib       64    readinto block of the sequential reads
            --sample-kib      256   read_ranges sample size
            --batch           64    samples per read_ranges call
            --rss-total-mib   2048  bytes read with f.read() for the RSS figure
            --rss-block-mib   16    f.read() size for the RSS figure
            --iperf-seconds   5     each iperf3 run (one before, one after)
            --storage-set     -     storage config fields, FIELD=JSON,... e.g. verify_reads=false
        """),
    ),
    Study(
        "dataplane",
        "dataplane.run",
        "Data-plane transport (one server, one client process) against iperf3 per case.",
        _options("""
            --seconds   2.0   per case
            --unix      flag  also measure a unix socket
            --quick     flag  three cases only
            --sockbuf   0     SO_SNDBUF/SO_RCVBUF bytes to try (0: the kernel's)
        """),
    ),
    Study(
        "storage",
        "storage.writes_and_reads",
        "Storage chunk writes (3 replicas) and batched chunk reads from one client process, "
        "storage RSS under 4 clients, chunk-engine costs, O_DIRECT disk ceiling, iperf3.",
        _options("""
            --seconds     4.0       seconds per measurement
            --chunk-mib   4         chunk size
            --transport   unix|tcp  same-host peers over unix sockets or loopback TCP
        """),
    ),
    Study(
        "storage-read",
        "storage.random_reads",
        "Storage random reads of 4 KiB and 256 KiB pieces of 4 MiB chunks (per-request cost).",
        _options("""
            --seconds        5.0         per phase
            --verify-reads   true|false  storage verifies CRCs on read
            --profile        -           directory for py-spy raw stacks of storage node 0
        """),
    ),
    Study(
        "kv",
        "kv_backends.run",
        "Transactions per second of each chainfs.kv backend (read-modify-write of one key), "
        "then meta server create/stat/readdir rates on each store.",
        _options("""
            --seconds               3.0                                             per cell
            --concurrency           1,8,64                                          task counts
            --backends              memory,rocksdb,rocksdb-nogroup,etcd,postgresql  comma-separated
            --keys                  10000                                           key space
            --uvloop                flag                                            run on uvloop
            --meta-backends         rocksdb,etcd,postgresql                         meta's stores
            --meta-files            2000                                            per client
            --meta-clients          4                                               processes
            --meta-depth            8                                               in flight each
            --meta-readdir-rounds   5                                               per client
        """),
    ),
    Study(
        "kvcache",
        "kvcache.run",
        "KV cache batch_get/batch_get_into of 1 MiB values, 4 KiB gets (batched, pipelined, "
        "threaded, one thread, a new handle's first get of each key) and puts, against iperf3.",
        _options("""
            --address         -        mgmtd address of a running cluster (default: start one)
            --storage-nodes   3        of the started cluster
            --replicas        3        of the started cluster
            --batch           64       values per batch_get (1 MiB)
            --value-bytes     1048576  size of the large values
            --small-values    4096     4 KiB values stored
            --small-batch     256      keys per 4 KiB batch_get
            --threads         64       threads calling get() at once
            --pipeline        4        threads calling batch_get at once
            --seconds         5.0      seconds per measurement
            --iperf-seconds   3        iperf3 run
        """),
    ),
    Study(
        "meta-server",
        "meta_server.run",
        "Create/stat/readdir rates of one meta server process next to a local directory.",
        _options("""
            --files            2000                 files per client
            --clients          4                    client processes
            --depth            8                    requests in flight per client
            --readdir-rounds   5                    listings of its directory per client
            --kv               rocksdb|etcd|postgresql|memory  meta's store
            --transport        frame|grpc           client to meta
        """),
    ),
    Study(
        "failover",
        "failover.storage_failover",
        "Storage failover (time to the first read/write after SIGKILL of a node) and resync "
        "speed against iperf3.",
        _options("""
            --runs        5    fresh clusters, one kill each
            --resync-mb   256  data written while the node is down
        """),
    ),
    Study(
        "rebalance",
        "rebalance.run",
        "Replicas moved onto a new storage node by `admin add-node` (rate limit off), "
        "bytes/s against iperf3.",
        _options("""
            --runs            3    fresh clusters, one add-node each
            --targets         4    targets per node (= chains; the new node gets as many)
            --data-mib        512  data written before the node joins
            --concurrency     4    moves at once
            --iperf-seconds   3    iperf3 run
        """),
    ),
    Study(
        "ha",
        "failover.ha",
        "mgmtd, meta and etcd failover under a seeded metadata load (3 etcd, 2 mgmtd, 2 meta).",
        _options("""
            --runs       5     fresh clusters
            --lease-ms   3000  mgmtd lease
        """),
    ),
    Study(
        "tls",
        "tls.run",
        "Sequential client writes and reads (4 MiB) on a plain and a TLS cluster, all hops TCP.",
        _options("""
            --file-mib        512  size of the file written, then read
            --block-mib       4    write and readinto size
            --passes          3    reads of the whole file
            --storage-nodes   2    of each cluster
            --replicas        2    chain length
        """),
    ),
    Study(
        "fuse-ls",
        "fuse.ls_large_directory",
        "`ls -l` of a large directory through a fresh FUSE mount (cold, warm, names only).",
        _options("""
            --files         10000  files in the directory
            --concurrency   32     creates in flight while filling it
        """),
    ),
    Study(
        "mgmt-scale",
        "mgmt_scale.run",
        "mgmtd CPU with simulated storage nodes (one process, simulated clock): steady "
        "heartbeats, then nodes failing, timed out, returning and resyncing.",
        _options("""
            --nodes                   1000  simulated storage nodes
            --targets-per-node        10    targets of each node
            --heartbeat-interval-ms   1000  heartbeat interval
            --seconds                 10.0  simulated seconds of steady heartbeats
            --failures                10    nodes that fail at once, then return
        """),
    ),
    Study(
        "open-random",
        "fuse.open_random",
        "Costs of open files: read sessions, client buffering, fio 4 KiB random I/O "
        "through the mount.",
        _options("""
            --runtime   10   seconds per fio job
            --files     200  files opened, read and closed
            --reads     300  random reads per buffering mode
        """),
    ),
)
