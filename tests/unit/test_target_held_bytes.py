"""The bytes a target reports as used are the chunk bytes it holds (a running
count), not the used space of the disk it shares with everything else."""

from __future__ import annotations

import os
from pathlib import Path

from chainfs.storage_service import crc
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.record_store import held_bytes_of

CHUNK = 1 << 16


def _write(eng: ChunkEngine, ino: int, index: int, offset: int, data: bytes, version: int) -> None:
    eng.prepare_write(ino, index, offset, memoryview(data), crc.value(data), CHUNK, version)


def _scanned(eng: ChunkEngine) -> int:
    return sum(held_bytes_of(rec) for _, rec in eng.iter_records())


def test_used_bytes_follow_writes_pending_versions_and_removals(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")
    assert eng.usage()[0] == 0
    _write(eng, 1, 0, 0, os.urandom(1000), 1)
    assert eng.usage()[0] == 1000 == _scanned(eng)  # a pending first version is held too
    eng.commit(1, 0, 1, 1)
    _write(eng, 1, 1, 0, os.urandom(CHUNK), 1)
    eng.commit(1, 1, 1, 1)
    _write(eng, 1, 0, 1000, os.urandom(500), 2)  # pending: the committed 1000 stay readable
    assert eng.usage()[0] == _scanned(eng) >= 1000 + CHUNK + 500
    eng.commit(1, 0, 2, 1)
    assert eng.usage()[0] == 1500 + CHUNK == _scanned(eng)
    rec = eng.prepare_remove(1, 1)
    assert rec is not None
    assert eng.commit(1, 1, rec.pending_version, 1) is None
    assert eng.usage()[0] == 1500
    eng.close()
    again = ChunkEngine(tmp_path / "t")  # counted afresh from the records at open
    assert again.usage()[0] == 1500
    used_on_disk, capacity = again.disk_usage()
    assert again.usage()[1] == capacity and used_on_disk > 1500  # the disk holds more
    again.close()
