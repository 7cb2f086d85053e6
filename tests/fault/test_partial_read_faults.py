"""Bit flips in the middle of a chunk, found by small partial reads (per-block CRCs).

A partial read verifies only the CRC blocks it touches, so damage is found by
the reads that touch it: those answer CHECKSUM_MISMATCH at the damaged replica,
the client goes to another one, and the repair puts the right bytes back.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.fault import faultlib as fl
from tests.fault.test_storage_faults import _cluster, _file_crc_ok, _flip_one_replica


@pytest.mark.timeout(120)
def test_partial_reads_around_a_flipped_bit(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        fs = c.client()
        data = random.Random(5).randbytes(3_000_000)  # one chunk (4 MiB default)
        fs.write_file("/victim", data)
        chunk_file, want_crc = _flip_one_replica(c, fs, "/victim")  # bit at byte 1.5 MB
        assert not _file_crc_ok(chunk_file, want_crc)
        middle = len(data) // 2
        # Small reads touching the damaged block and reads far from it: every one
        # returns the right bytes, whichever replica serves it.
        spans = [(middle, 1), (middle - 5000, 4096), (middle - 70_000, 256 * 1024), (0, 4096)]
        with fs.open("/victim", "rb", buffering=0) as f:
            for _ in range(30):
                for off, n in spans:
                    f.seek(off)
                    assert f.read(n) == data[off : off + n]
                if _file_crc_ok(chunk_file, want_crc):
                    break
        fl.poll(lambda: _file_crc_ok(chunk_file, want_crc), 30, "the corrupt replica repaired")
        got = fs.read_ranges([("/victim", off, n) for off, n in spans])
        assert [bytes(g) for g in got] == [data[off : off + n] for off, n in spans]
        assert fl.replica_differences(c.address) == []
