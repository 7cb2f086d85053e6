"""``chainfs bench tls``: sequential client writes and reads with TLS off, then on.

Two LocalClusters in turn, the same shape, one plain and one with
``tls=True``. Storage nodes serve no unix socket here, so every hop (client
to storage, chain forwarding) is TCP in both and TLS is the only difference.
In each: write a file of ``file_mib`` with ``block_mib`` writes, then read it
``passes`` times with ``readinto`` of ``block_mib``, checking the bytes read
against the bytes written. Reported: MB/s of each and the TLS/plain ratios.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from chainfs.bench.cluster import LocalCluster
from chainfs.bench.context import MB, MiB
from chainfs.bench.studies import Echo
from chainfs.client.config import ClientConfig
from chainfs.client.sync import FileSystem

PATH = "/bench/tls.bin"


def _no_unix_socket(i: int, conf: Any) -> None:
    conf.unix_socket = ""  # every data-plane hop over TCP, so TLS applies to it


def _write(fs: FileSystem, file_mib: int, block_mib: int) -> tuple[float, bytes]:
    block = bytes(range(256)) * (block_mib * MiB // 256)
    fs.makedirs("/bench", exist_ok=True)
    t0 = time.perf_counter()
    with fs.open(PATH, "wb") as f:
        for _ in range(file_mib // block_mib):
            f.write(block)
    return (file_mib // block_mib) * len(block) / (time.perf_counter() - t0) / MB, block


def _read(fs: FileSystem, passes: int, block: bytes) -> float:
    buf = bytearray(len(block))
    total = 0
    t0 = time.perf_counter()
    for _ in range(passes):
        with fs.open(PATH, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                if (buf if n == len(buf) else buf[:n]) != block[:n]:  # no copy when whole
                    raise AssertionError(f"bytes read differ from bytes written near {total}")
                total += n
    return total / (time.perf_counter() - t0) / MB


def _measure(o: dict[str, Any], tls: bool) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="cfsb-tls-", dir=o["data_dir"]) as tmp,
        LocalCluster(
            Path(tmp),
            storage_nodes=o["storage_nodes"],
            targets_per_node=1,
            replicas=o["replicas"],
            configure_storage=_no_unix_socket,
            tls=tls,
        ) as cluster,
    ):
        fs = cluster.client(config=ClientConfig())
        write_mbps, block = _write(fs, o["file_mib"], o["block_mib"])
        read_mbps = _read(fs, o["passes"], block)
        fs.close()
    return {"write_MBps": write_mbps, "read_MBps": read_mbps}


def run(opts: dict[str, Any], echo: Echo) -> dict[str, Any]:
    if opts["file_mib"] % opts["block_mib"]:
        raise ValueError("--file-mib must be a multiple of --block-mib")
    plain = _measure(opts, tls=False)
    echo(f"plain: write {plain['write_MBps']:.0f} MB/s, read {plain['read_MBps']:.0f} MB/s")
    tls = _measure(opts, tls=True)
    echo(f"tls:   write {tls['write_MBps']:.0f} MB/s, read {tls['read_MBps']:.0f} MB/s")
    ratios = {k: tls[k] / plain[k] for k in plain}
    for line in (
        "| figure | plain | TLS | TLS / plain |",
        "|---|---|---|---|",
        *(
            f"| {k.removesuffix('_MBps')} | {plain[k]:.0f} MB/s | {tls[k]:.0f} MB/s | "
            f"{ratios[k]:.2f} |"
            for k in plain
        ),
    ):
        echo(line)
    keys = ("file_mib", "block_mib", "passes", "storage_nodes", "replicas")
    return {
        "plain": plain,
        "tls": tls,
        "ratio": ratios,
        "config": {k: opts[k] for k in keys},
    }
