"""Measure failover and resync (issue 7): not a test, figures for the closing notes.

    .venv/bin/python bench/failover_measure.py --runs 5 --resync-mb 512

Per run: a 3-node cluster (2 targets each, 3 replicas), a reader and a writer
thread doing small ops in a loop; SIGKILL one storage node; report the time
from the kill to the first read and the first write *started after the kill*
that succeed. Then the node restarts and resyncs everything written while it
was down (rate limit off): resync bytes/s from the storage logs, next to
iperf3 on loopback measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from chainfs.client.config import ClientConfig
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.testing.cluster import LocalCluster

HB_INTERVAL_MS = 300
HB_TIMEOUT_MS = 3000


def _probe(fn: Any, kill_at: list[float], out: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            fn()
        except OSError:
            continue
        if kill_at and started > kill_at[0] and not out:
            out.append(time.monotonic() - kill_at[0])


def iperf3_gbps() -> float:
    port = "5299"
    srv = subprocess.Popen(["iperf3", "-s", "-1", "-p", port], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", port, "-t", "3", "-J"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 8
    finally:
        srv.wait(timeout=10)


def one_run(base: Path, resync_mb: int, run: int) -> dict[str, float]:
    def configure(i: int, c: Any) -> None:
        c.failure.resync_rate_bytes_per_s = 0

    with LocalCluster(
        base,
        storage_nodes=3,
        targets_per_node=2,
        replicas=3,
        heartbeat_interval_ms=HB_INTERVAL_MS,
        heartbeat_timeout_ms=HB_TIMEOUT_MS,
        configure_storage=configure,
    ) as c:
        fs = c.client(config=ClientConfig(storage=StorageClientConfig(retry_total_ms=30_000)))
        payload = os.urandom(64 * 1024)
        fs.write_file("/probe_r", payload)
        kill_at: list[float] = []
        read_out: list[float] = []
        write_out: list[float] = []
        stop = threading.Event()
        n = [0]

        def do_write() -> None:
            n[0] += 1
            fs.write_file(f"/probe_w{n[0] % 50}", payload)

        def do_read() -> None:
            assert fs.read_file("/probe_r") == payload

        threads = [
            threading.Thread(target=_probe, args=(do_read, kill_at, read_out, stop), daemon=True),
            threading.Thread(target=_probe, args=(do_write, kill_at, write_out, stop), daemon=True),
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)
        victim = run % 3
        kill_at.append(time.monotonic())
        c.kill_storage(victim)
        deadline = time.monotonic() + 60
        while (not read_out or not write_out) and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        # Data written while the node is down, resynced after its restart.
        blob = os.urandom(4 * 1024 * 1024)
        for i in range(resync_mb // 4):
            fs.write_file(f"/bulk{i}", blob)
        log = Path(c.base_dir) / f"storage{(victim + 1) % 3}"
        c.restart_storage(victim)
        deadline = time.monotonic() + 300
        done: list[tuple[int, float]] = []
        pat = re.compile(
            r"resync \d+ -> \d+ \(chain \d+\) done: \d+ chunks \((\d+) bytes\) sent.*, ([\d.]+)s"
        )
        while time.monotonic() < deadline:
            done = []
            for p in Path(c.base_dir).glob("storage*/*.log"):
                for m in pat.finditer(p.read_text()):
                    done.append((int(m.group(1)), float(m.group(2))))
            if len(done) >= 2:
                break
            time.sleep(0.2)
        del log
        total = sum(b for b, _ in done)
        secs = max((s for _, s in done), default=0.0)
        return {
            "read_resume_s": read_out[0] if read_out else float("nan"),
            "write_resume_s": write_out[0] if write_out else float("nan"),
            "resync_bytes": float(total),
            "resync_s": secs,
            "resync_Bps": total / secs if secs else float("nan"),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--resync-mb", type=int, default=256)
    args = ap.parse_args()
    results = []
    for r in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="chainfs-failover-"))
        try:
            res = one_run(base, args.resync_mb, r)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        print(json.dumps(res), flush=True)
        results.append(res)
    ip = iperf3_gbps() if shutil.which("iperf3") else float("nan")
    for k in ("read_resume_s", "write_resume_s"):
        v = sorted(x[k] for x in results)
        print(
            f"{k}: min {v[0]:.3f} median {statistics.median(v):.3f} max {v[-1]:.3f}",
            f"all {[round(x, 3) for x in v]}",
        )
    rs = [x["resync_Bps"] for x in results]
    print(
        f"resync MB/s per run: {[round(x / 1e6, 1) for x in rs]};",
        f"median {statistics.median(rs) / 1e6:.1f}",
    )
    print(f"iperf3 loopback MB/s: {ip / 1e6:.1f}; resync/iperf3 = {statistics.median(rs) / ip:.3f}")


if __name__ == "__main__":
    main()
