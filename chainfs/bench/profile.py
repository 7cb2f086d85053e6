"""``--profile``: py-spy samples every process while each workload runs.

One ``py-spy record --format raw`` per process and workload (collapsed stacks,
``<stamp>-profiles/<workload>-<process>.txt``; speedscope or flamegraph.pl
read them), and a summary of where each process spent its samples (the
leaf functions with the largest shares) for the report. Sampling costs CPU on
the same cores: figures of a profiled run are lower and not for comparison.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from chainfs.bench.context import NotRun

SAMPLE_RATE_HZ = 97  # py-spy's default is 100; prime, so it does not beat with periodic work
TOP_FRAMES = 6  # leaf functions listed per process in the report
_STOP_TIMEOUT_S = 30.0  # py-spy writes its file after SIGINT; large profiles take a moment
_LINE_NO = re.compile(r":\d+\)$")


def find_py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise NotRun("py-spy is not installed (pip install py-spy)")
    return exe


def summarize(path: Path, top: int = TOP_FRAMES) -> dict[str, Any]:
    """Samples and the leaf functions (file, no line) with the largest share of them."""
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            leaf = _LINE_NO.sub(")", stack.split(";")[-1].strip())
            leaves[leaf] += int(count)
            total += int(count)
    return {
        "samples": total,
        "top": [[frame, round(n / total, 3)] for frame, n in leaves.most_common(top)]
        if total
        else [],
        "file": path.name,
    }


class Profiler:
    """Starts py-spy on a set of pids, stops it, summarizes what it saw."""

    def __init__(self, out_dir: Path) -> None:
        self.exe = find_py_spy()
        self.out_dir = out_dir
        self._running: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def start(self, label: str, pids: dict[str, int]) -> None:
        assert not self._running, "profiler already running"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            path = self.out_dir / f"{label}-{name}.txt"
            cmd = [self.exe, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE_HZ),
                   "--format", "raw", "--nonblocking", "--output", str(path)]  # fmt: skip
            log = open(self.out_dir / f"{label}-{name}.log", "wb")  # noqa: SIM115 - child's
            try:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            finally:
                log.close()
            self._running.append((name, path, proc))

    def stop(self) -> dict[str, dict[str, Any]]:
        """SIGINT each py-spy we started (it then writes its file); the summaries."""
        out: dict[str, dict[str, Any]] = {}
        for _, _, proc in self._running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, path, proc in self._running:
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out[name] = summarize(path)
        self._running.clear()
        return out
