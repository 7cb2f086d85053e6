"""The node's cache of open chunk files: bounded across targets, never stale."""

from __future__ import annotations

import os
import random
import resource
from pathlib import Path

import pytest

from chainfs.storage_service import chunk_files, crc
from chainfs.storage_service.chunk_engine import ChunkEngine, EngineOptions
from chainfs.storage_service.chunk_files import FdCache, open_files_bound
from chainfs.storage_service.config import StorageConfig

MiB = 1024 * 1024


def _put(eng: ChunkEngine, inode: int, data: bytes, version: int) -> None:
    """Write ``data`` as the whole chunk (inode, 0), version ``version``, committed."""
    eng.prepare_write(inode, 0, 0, memoryview(data), crc.value(data), 4 * MiB, version)
    assert eng.commit(inode, 0, version, 1) is not None


def _read(eng: ChunkEngine, inode: int, n: int) -> bytes:
    _, got = eng.read(inode, 0, 0, n, verify=True)
    return bytes(got)


def _chunk_fds(root: Path) -> int:
    """Descriptors this process holds on chunk content files under ``root``
    (only those: other threads of the test process open and close their own)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if target.startswith(f"{root}/") and "/data/" in target:
            n += 1
    return n


def test_targets_share_one_bound_and_reads_stay_correct(tmp_path: Path) -> None:
    cache = FdCache(3)
    engines = [ChunkEngine(tmp_path / f"t{i}", EngineOptions(), cache) for i in range(2)]
    data = {(t, ino): os.urandom(5000 + ino) for t in range(2) for ino in range(1, 7)}
    for (t, ino), value in data.items():
        _put(engines[t], ino, value, 1)
    rnd = random.Random(7)
    keys = list(data)
    for _ in range(200):  # far more files than the bound, in random order: evictions
        t, ino = rnd.choice(keys)
        assert _read(engines[t], ino, 10_000) == data[t, ino]
        assert len(cache) <= 3
    assert 1 <= _chunk_fds(tmp_path) <= 3  # the cache holds some, never more than its bound
    assert cache.opens > 3  # it did evict and reopen

    # Closing one target drops its descriptors only; the other keeps reading.
    for ino in (1, 2):
        _read(engines[1], ino, 10_000)
    engines[0].close()
    assert len(cache) >= 1
    for ino in range(1, 7):
        assert _read(engines[1], ino, 10_000) == data[1, ino]
    engines[1].close()
    assert len(cache) == 0
    assert _chunk_fds(tmp_path) == 0


def test_a_file_evicted_under_a_reader_stays_open_until_released(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t", EngineOptions(open_files=1))
    _put(eng, 1, b"a" * 100, 1)
    _put(eng, 2, b"b" * 100, 1)
    key = (str(eng.path), 1, 0, eng.get(1, 0).file_gen)  # type: ignore[union-attr]
    held = eng.files.cache.acquire(key)
    assert _read(eng, 2, 100) == b"b" * 100  # evicts file 1 while held
    assert os.pread(held.fd, 100, 0) == b"a" * 100  # still open: its number is not reused
    eng.files.cache.release(held)
    with pytest.raises(OSError):
        os.fstat(held.fd)  # closed with its last user
    assert _read(eng, 1, 100) == b"a" * 100
    eng.close()


@pytest.mark.parametrize("shared", [False, True])
def test_a_chunk_changed_while_its_file_is_cached_is_never_read_stale(
    tmp_path: Path, shared: bool
) -> None:
    cache = FdCache(8) if shared else None
    eng = ChunkEngine(tmp_path / "t", EngineOptions(open_files=8), cache)
    v1 = os.urandom(200_000)
    _put(eng, 5, v1, 1)
    assert _read(eng, 5, 300_000) == v1

    # A small overwrite: journaled, written in place into the cached file at commit.
    patch = b"Z" * 1000
    eng.prepare_write(5, 0, 4096, memoryview(patch), crc.value(patch), 4 * MiB, 2)
    assert eng.commit(5, 0, 2, 1) is not None
    v2 = v1[:4096] + patch + v1[4096 + len(patch) :]
    assert _read(eng, 5, 300_000) == v2

    # A rewrite past the end: a new version in a new file (copy-on-write).
    v3 = os.urandom(250_000)
    _put(eng, 5, v3, 3)
    assert _read(eng, 5, 300_000) == v3

    # Removed, then created again: the first file name comes back with new bytes.
    rec = eng.prepare_remove(5, 0)
    assert rec is not None and eng.commit(5, 0, rec.pending_version, 1) is None
    assert eng.read(5, 0, 0, 100, verify=True)[0] is None  # gone, not the old bytes
    v4 = os.urandom(120_000)
    _put(eng, 5, v4, 1)
    assert _read(eng, 5, 300_000) == v4

    # Repaired: the content file is replaced by a good copy (rename over it).
    rec = eng.get(5, 0)
    assert rec is not None
    with open(eng.file_path(5, 0, rec.file_gen), "r+b") as f:  # damage it in place
        f.seek(10)
        f.write(b"\xff" * 8)
    eng.files.replace(5, 0, rec.file_gen, memoryview(v4))
    assert _read(eng, 5, 300_000) == v4
    eng.close()


def test_open_files_bound_from_rlimit(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = chunk_files.OPEN_FILES_AUTO
    assert open_files_bound(0) == 0 and open_files_bound(300) == 300  # as configured
    for soft, want in (
        (1024, 256),
        (20_000, 5_000),
        (10_000_000, 65_536),
        (resource.RLIM_INFINITY, 65_536),
    ):
        monkeypatch.setattr(resource, "getrlimit", lambda _which, s=soft: (s, s))
        assert open_files_bound(auto) == want
    assert StorageConfig().open_chunk_files == auto
    StorageConfig().validate()
    with pytest.raises(ValueError):
        StorageConfig(open_chunk_files=-2).validate()
    with pytest.raises(ValueError):
        EngineOptions(open_files=-2)
