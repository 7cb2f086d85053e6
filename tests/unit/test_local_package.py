"""`chainfs up` runs on product code only (chainfs.local), and the test helpers
still hand out the same LocalCluster."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from chainfs.local.process import spawn, stop_process

REPO = Path(__file__).resolve().parents[2]


def test_chainfs_up_loads_nothing_from_chainfs_testing(tmp_path: Path) -> None:
    # Run `up` far enough to build its LocalCluster (refused: 2 replicas on 1 node,
    # so no process starts), then list what it imported.
    code = textwrap.dedent(
        f"""
        import sys
        from click.testing import CliRunner
        from chainfs.cli.up import up
        import chainfs.local.etcd  # what `chainfs up --kv etcd` loads
        res = CliRunner().invoke(
            up, ["--data", {str(tmp_path / "up")!r}, "--storage-nodes", "1", "--replicas", "2"]
        )
        assert res.exit_code == 1 and "replicas" in res.output, res.output
        assert "chainfs.local.cluster" in sys.modules
        print(sorted(m for m in sys.modules if m.split(".")[:2] == ["chainfs", "testing"]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_local_cluster_is_importable_from_chainfs_testing() -> None:
    from chainfs.local import LocalCluster
    from chainfs.testing import LocalCluster as FromTesting
    from chainfs.testing.cluster import LocalCluster as FromOldModule

    assert FromTesting is LocalCluster and FromOldModule is LocalCluster


def test_stop_process_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(120)"
    )
    proc = spawn([sys.executable, "-c", code, str(ready)], tmp_path / "child.log")
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        stop_process(proc, timeout_s=0.2)
        assert proc.returncode == -9  # SIGKILL after the grace period
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
