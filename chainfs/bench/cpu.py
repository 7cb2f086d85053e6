"""CPU time each process spent during a workload.

On a shared machine a rate swings with whatever else runs, while the CPU a
process spends on the same work does not (much): the report gives both. Each
workload's window covers the processes it makes busy (``process_pids``: the
servers this run started, the FUSE mount, the client processes), read from
``/proc`` through psutil (user + system time of the process itself, not of
its children). With ``--address`` the servers are not ours and only the
clients are counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import psutil


def _cpu_s(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except psutil.Error:  # gone (a fault workload may kill it) or not ours to read
        return None
    return float(t.user + t.system)


@dataclass
class CpuWindow:
    """CPU seconds of named processes between :meth:`start` and :meth:`stop`."""

    procs: dict[str, psutil.Process] = field(default_factory=dict)
    begin: dict[str, float] = field(default_factory=dict)
    t0: float = 0.0

    @classmethod
    def start(cls, pids: dict[str, int]) -> CpuWindow:
        w = cls(t0=time.monotonic())
        for name, pid in pids.items():
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                continue
            cpu = _cpu_s(proc)
            if cpu is not None:
                w.procs[name], w.begin[name] = proc, cpu
        return w

    def stop(self, ops: int | None = None) -> dict[str, Any]:
        """``wall_s``, ``cpu_s`` per process (None: it ended during the window),
        ``total_cpu_s`` of those still there, and ``ops`` when the figures
        counted their operations."""
        wall = time.monotonic() - self.t0
        cpu: dict[str, float | None] = {}
        for name, proc in self.procs.items():
            end = _cpu_s(proc)
            cpu[name] = None if end is None else round(max(0.0, end - self.begin[name]), 3)
        total = sum(v for v in cpu.values() if v is not None)
        out: dict[str, Any] = {"wall_s": round(wall, 2), "cpu_s": cpu}
        out["total_cpu_s"] = round(total, 3)
        if ops:
            out["ops"] = ops
        return out


def workload_ops(results: list[Any]) -> int | None:
    """Operations the workload's figures counted (their ``ops`` details), when
    every figure counted them and nothing else ran in the window; else None."""
    done = [r for r in results if r.value is not None]
    if any("churn_ops" in r.details for r in done):
        return None  # the window also holds the churn before the figures
    counts = [r.details.get("ops") for r in done]
    if not counts or any(not isinstance(c, int) for c in counts):
        return None
    return sum(counts)


def cpu_lines(cpu: dict[str, dict[str, Any]], cores: int | None) -> list[str]:
    """The report's "CPU by process" section."""
    lines = [
        "",
        "## CPU by process (each workload)",
        "",
        "CPU seconds (user + system) each process spent while the workload ran, and "
        "in cores busy on average; less noisy than the rates on a shared machine. "
        "`per op`: all the processes' CPU divided by the operations the figures "
        "counted (the workload's mix of operations).",
        "",
        "| workload | wall s | CPU s by process (cores) | all | per op (mix) |",
        "|---|---:|---|---:|---:|",
    ]
    for workload, w in cpu.items():
        wall = float(w.get("wall_s") or 0.0)
        parts = []
        busy = sorted(
            ((n, s) for n, s in w.get("cpu_s", {}).items() if s is None or s >= 0.01),
            key=lambda ns: -(ns[1] or 0.0),
        )
        for name, s in busy:
            if s is None:
                parts.append(f"{name} ended")
            else:
                parts.append(f"{name} {s:.2f} ({s / wall:.2f})" if wall > 0 else f"{name} {s:.2f}")
        total = float(w.get("total_cpu_s") or 0.0)
        cores_busy = f" ({total / wall:.2f} of {cores})" if wall > 0 and cores else ""
        ops = w.get("ops")
        per_op = f"{1e6 * total / ops:,.0f} us" if ops else "-"
        lines.append(
            f"| {workload} | {wall:.1f} | {', '.join(parts) or '-'} | "
            f"{total:.2f}{cores_busy} | {per_op} |"
        )
    return lines
