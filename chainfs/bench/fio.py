"""Running fio: the one place the bench finds it and reads its JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from chainfs.bench.context import NotRun, WorkloadFailed


def json_out(stdout: str) -> dict[str, Any]:
    """The JSON document in a tool's stdout (fio may print warnings before it)."""
    start = stdout.find("{")
    if start < 0:
        raise WorkloadFailed(f"no JSON in output: {stdout[:300]!r}")
    doc: dict[str, Any] = json.loads(stdout[start:])
    return doc


def fio_exe() -> str:
    exe = shutil.which("fio")
    if exe is None:
        raise NotRun("fio not on PATH (deploy/bootstrap.sh installs it)")
    return exe


def fio_engine(exe: str) -> str:
    out = subprocess.run([exe, "--enghelp"], capture_output=True, text=True, timeout=30)
    return "libaio" if "libaio" in out.stdout else "psync"


def fio_job(exe: str, args: list[str], timeout_s: float) -> tuple[dict[str, Any], str]:
    """Run one fio job; its JSON result and the command line."""
    cmd = [exe, "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise WorkloadFailed(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()[:500]}")
    job: dict[str, Any] = json_out(out.stdout)["jobs"][0]
    if job.get("error"):
        raise WorkloadFailed(f"{' '.join(cmd)}: fio error {job['error']}")
    return job, " ".join(cmd)
