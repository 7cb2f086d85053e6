"""fio with CRC32C verification and stress-ng file-system stressors through the mount.

Op counts are small and bounded: these check that the mount answers every
request correctly under a real tool's access pattern, not how fast it is.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.integration.fuse_fixtures import mounted_cluster, run

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = Path(tmp_path_factory.mktemp("fuse_stress"))
    # Negative lookups cached (off by default): stress-ng's link and symlink
    # stressors unlink 8192 mostly absent names per round.
    for cluster in mounted_cluster(base, options=["negative_timeout_ms=1000"]):
        assert cluster.mountpoint is not None
        yield cluster.mountpoint


@pytest.fixture
def cluster_dir(mnt: Path, request: pytest.FixtureRequest) -> Path:
    p = mnt / request.node.name.replace("[", "_").replace("]", "")
    p.mkdir()
    return p


def fio(directory: Path, *args: str) -> str:
    require_binary("fio")
    return run(
        [
            "fio",
            "--name=job",
            f"--directory={directory}",
            "--ioengine=psync",
            "--fallocate=none",  # fallocate(2) is not supported: EOPNOTSUPP
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",  # else fio drops *-verify.state files in the cwd
            "--output-format=terse",
            *args,
        ],
        timeout=200,
    )


def terse_errors(out: str) -> list[int]:
    # terse v3: field 5 is the job's error code
    return [int(line.split(";")[4]) for line in out.splitlines() if line.count(";") > 10]


@pytest.mark.parametrize(
    "pattern",
    [
        ("--rw=write", "--bs=1M", "--size=48M", "--end_fsync=1"),
        ("--rw=write", "--bs=4k", "--size=6M"),
        ("--rw=randwrite", "--bs=64k", "--size=12M", "--fsync=16"),
        ("--rw=randwrite", "--bs=4k", "--size=1M", "--numjobs=2"),
    ],
    ids=["seq-1M", "seq-4k", "rand-64k", "rand-4k-2jobs"],
)
def test_fio_verify(cluster_dir: Path, pattern: tuple[str, ...]) -> None:
    out = fio(cluster_dir, *pattern)
    errors = terse_errors(out)
    assert errors and all(e == 0 for e in errors), out


# stressor -> arguments: bounded by bogo ops, each finishing in seconds. link and
# symlink count a whole round of 8192 links as one op, so a short --timeout
# ends their round (they still unlink all 8192 names, mostly absent ones).
STRESSORS: dict[str, list[str]] = {
    "dir": ["--dir-ops", "50"],
    "dentry": ["--dentry-ops", "200", "--dentries", "200"],
    "rename": ["--rename-ops", "50"],
    "link": ["--link-ops", "1", "--timeout", "3"],
    "symlink": ["--symlink-ops", "1", "--timeout", "3"],
    "chmod": ["--chmod-ops", "2"],
    "chown": ["--chown-ops", "50"],
    "utime": ["--utime-ops", "100"],
    "xattr": ["--xattr-ops", "1"],
    "seek": ["--seek-ops", "200", "--seek-size", "16M"],
    "hdd": ["--hdd-ops", "100", "--hdd-bytes", "2M", "--hdd-write-size", "64K"],
    "hdd-rnd": [
        "--hdd-ops",
        "100",
        "--hdd-bytes",
        "1M",
        "--hdd-write-size",
        "4K",
        "--hdd-opts",
        "wr-rnd,rd-rnd",
    ],
}


@pytest.mark.parametrize("name", sorted(STRESSORS))
def test_stress_ng(cluster_dir: Path, name: str) -> None:
    require_binary("stress-ng")
    stressor = name.split("-")[0]
    args = STRESSORS[name]
    if "--timeout" not in args:
        args = [*args, "--timeout", "120"]  # a bound only: the op counts end it first
    cmd = ["stress-ng", f"--{stressor}", "1", "--temp-path", str(cluster_dir), "--verify", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=200, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{text[-4000:]}"
    assert "fail" not in text.lower(), text[-4000:]
    assert "successful run completed" in text, text[-4000:]
    assert not list(cluster_dir.iterdir()), "stress-ng left files behind (a remove failed?)"


def test_mount_survived(mnt: Path) -> None:
    """After everything above the mount still answers."""
    (mnt / "alive").write_bytes(b"yes")
    assert (mnt / "alive").read_bytes() == b"yes"
