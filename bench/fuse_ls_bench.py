"""`ls -l` of a large directory through the FUSE mount (issue 6's figure).

    .venv/bin/python bench/fuse_ls_bench.py [--files 10000] [--base /tmp/x]

Starts a LocalCluster with a FUSE mount, creates the files with the async
client (concurrently, so meta's create rate is not the figure), remounts so
nothing is cached, then times `ls -l DIR` (cold: first listing on a fresh
mount; warm: again at once) and `ls` (names only). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

from chainfs.testing.cluster import LocalCluster, MountProcess


async def _create(address: str, directory: str, n: int, concurrency: int) -> float:
    import chainfs.aio

    fs = await chainfs.aio.connect(address)
    try:
        await fs.mkdir(directory, exist_ok=True)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                f = await fs.open(f"{directory}/file{i:06d}", "wb")
                await f.close()

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.monotonic() - t0
    finally:
        await fs.close()


def _timed(cmd: list[str]) -> tuple[float, int]:
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=600)
    return time.monotonic() - t0, len(out.stdout.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--base", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    base = Path(args.base or tempfile.mkdtemp(prefix="chainfs-ls-bench-"))
    mnt = base / "mnt"
    with LocalCluster(base / "cluster", mount=mnt) as cluster:
        create_s = asyncio.run(_create(cluster.address, "/big", args.files, args.concurrency))
        # A second, fresh mount: no dentry, attribute or page cache from the creation.
        mnt2 = base / "mnt2"
        mnt2.mkdir(exist_ok=True)
        fresh = MountProcess(mnt2, cluster.address, base / "mount2")
        fresh.start(60)
        try:
            cold_s, lines = _timed(["ls", "-l", str(mnt2 / "big")])
            warm_s, _ = _timed(["ls", "-l", str(mnt2 / "big")])
            names_s, names = _timed(["ls", str(mnt2 / "big")])
        finally:
            fresh.stop()
    print(
        json.dumps(
            {
                "files": args.files,
                "create_seconds": round(create_s, 2),
                "ls_l_cold_seconds": round(cold_s, 3),
                "ls_l_warm_seconds": round(warm_s, 3),
                "ls_names_seconds": round(names_s, 3),
                "ls_l_lines": lines,
                "ls_names": names,
            }
        )
    )


if __name__ == "__main__":
    main()
