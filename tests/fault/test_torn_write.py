"""Writes that fail half-way (ENOSPC on a small target) leave honest files.

One target sits on a 64 MiB tmpfs; once it is full, a file whose chunks span
both chains is stored only in part. Afterwards, through the client and through
the FUSE mount, every file's length equals the bytes that read back, and those
bytes are a prefix of what was written: never zeros standing in for a chunk
that storage did not keep.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.fault.test_enospc import _mount_tmpfs, small_target_cluster
from tests.integration.fuse_fixtures import force_unmount, require_fuse

MiB = 1024 * 1024
SIZES = (8 * MiB, 10_000)  # two chunks on two chains; a small one-chunk file
MAX_FILL_FILES = 40  # 64 MiB of target / 4 MiB chunks: full long before


def _write_client(fs: Any, path: str, data: bytes) -> bool:
    try:
        with fs.open(path, "wb") as f:
            f.write(data)
    except OSError:
        return False
    return True


def _write_client_flush_twice(fs: Any, path: str, data: bytes) -> bool:
    """The error comes out of the first flush; the second reports a length, honest or not."""
    f = fs.open(path, "wb")
    try:
        f.write(data)
        f.flush()
    except OSError:
        f.flush()
        f.close()
        return False
    f.close()
    return True


def _write_mount(mnt: Path, path: str, data: bytes) -> bool:
    try:
        with open(mnt / path.lstrip("/"), "wb") as f:
            f.write(data)
    except OSError:
        return False
    return True


def _fsync_keeps_failing(path: Path, data: bytes) -> None:
    """Through the mount: once a flush failed, every later fsync of the file is EIO."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with contextlib.suppress(OSError):  # the kernel may pass the failure on here already
            os.write(fd, data)
        with pytest.raises(OSError):
            os.fsync(fd)
        for _ in range(2):
            with pytest.raises(OSError) as ei:
                os.fsync(fd)
            assert ei.value.errno == errno.EIO
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check(written: dict[str, tuple[bytes, bool]], stat_read: Any) -> list[str]:
    """Files whose length is not what reads back, or whose bytes were never written."""
    bad = []
    for path, (data, ok) in sorted(written.items()):
        size, got = stat_read(path)
        if size != len(got):
            bad.append(f"{path}: stat says {size} bytes, {len(got)} read back")
        elif got != data[: len(got)]:
            first = next(i for i, (a, b) in enumerate(zip(got, data, strict=False)) if a != b)
            bad.append(f"{path}: {len(got)} bytes read, wrong from offset {first}")
        elif ok and len(got) != len(data):
            bad.append(f"{path}: acknowledged {len(data)} bytes, {len(got)} read back")
    return bad


@pytest.mark.timeout(240)
def test_failed_writes_leave_only_what_storage_holds(tmp_path: Path) -> None:
    require_fuse()
    small = tmp_path / "small"
    require("tmpfs mount", _mount_tmpfs(small, "64m"), "needs root and mount(2)")
    mnt = tmp_path / "mnt"
    try:
        with small_target_cluster(tmp_path / "c", small, mount=mnt) as c:
            _fill_then_check(c.client(), mnt)
    finally:
        force_unmount(mnt)
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=30)


def _fill_then_check(fs: Any, mnt: Path) -> None:
    rng = random.Random(2024)
    written: dict[str, tuple[bytes, bool]] = {}  # path -> (bytes written, acknowledged)
    for i in range(MAX_FILL_FILES):  # client writes until the small target is full
        path, data = f"/fill{i:02d}", rng.randbytes(SIZES[0])
        written[path] = (data, _write_client(fs, path, data))
        if not written[path][1]:
            break
    assert not all(ok for _, ok in written.values()), "the small target never filled up"
    # Now both through the client and the mount, both sizes: some fail.
    for i in range(8):
        for size in SIZES:
            data = rng.randbytes(size)
            path = f"/c{i}-{size}"
            written[path] = (data, _write_client(fs, path, data))
            path = f"/m{i}-{size}"
            written[path] = (data, _write_mount(mnt, path, data))
    for i in range(4):
        path, data = f"/cflush{i}", rng.randbytes(SIZES[0])
        written[path] = (data, _write_client_flush_twice(fs, path, data))
    written["/mfsync"] = (rng.randbytes(SIZES[0]), False)
    _fsync_keeps_failing(mnt / "mfsync", written["/mfsync"][0])
    failed = sorted(p for p, (_, ok) in written.items() if not ok)
    assert any(p.startswith("/c") and p.endswith("-10000") for p in failed), failed
    assert any(p.startswith("/m") for p in failed), failed
    assert any(p.startswith("/cflush") for p in failed), failed

    def via_client(path: str) -> tuple[int, bytes]:
        with fs.open(path, "rb") as f:
            return fs.stat(path).st_size, bytes(f.read())

    def via_mount(path: str) -> tuple[int, bytes]:
        p = mnt / path.lstrip("/")
        with open(p, "rb") as f:
            return p.stat().st_size, f.read()

    assert _check(written, via_client) == []
    assert _check(written, via_mount) == []
