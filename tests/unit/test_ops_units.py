"""Pure pieces of the operator commands: size cells, mountinfo parsing, dump file ends."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from chainfs.cli.admin.common import cell, human_bytes
from chainfs.cli.dump import read_ends
from chainfs.cli.umount import mount_type


def test_sizes_read_in_binary_units_and_only_in_byte_columns() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1024) == "1.0 KiB"
    assert human_bytes(20_342_374) == "19.4 MiB"
    assert human_bytes(3 * 1024**4) == "3.0 TiB"
    assert cell("used_bytes", 1536) == "1.5 KiB"
    assert cell("sync_rate_bytes_per_s", 2 * 1024**2) == "2.0 MiB/s"
    assert cell("target_id", 1536) == "1536"
    assert cell("used_bytes", None) == ""
    assert cell("held_offline", True) == "True"


def test_mount_type_reads_the_top_mount_and_unescapes_paths(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
        "40 22 0:35 / /mnt/my\\040dir rw,nosuid - tmpfs tmpfs rw\n"
        "41 40 0:36 / /mnt/my\\040dir rw,nosuid - fuse.chainfs chainfs rw,user_id=0\n"
        "42 22 0:37 / /srv rw shared:5 - fuse.other x rw\n"
    )
    assert mount_type("/mnt/my dir", str(info)) == "fuse.chainfs"
    assert mount_type("/srv", str(info)) == "fuse.other"
    assert mount_type("/nothing", str(info)) is None


def test_load_refuses_what_is_not_a_whole_dump(tmp_path: Path) -> None:
    header = '{"format":"chainfs-dump","version":1,"root":"/","contents":false}\n'
    whole = tmp_path / "whole.jsonl"
    whole.write_text(header + '{"path":".","type":"dir"}\n{"end":true,"entries":1}\n')
    assert read_ends(whole)[1]["entries"] == 1
    cut = tmp_path / "cut.jsonl"
    cut.write_text(header + '{"path":".","type":"dir"}\n')
    with pytest.raises(click.ClickException, match="incomplete"):
        read_ends(cut)
    other = tmp_path / "other.jsonl"
    other.write_text('{"some":"json"}\n{"end":true}\n')
    with pytest.raises(click.ClickException, match="not a chainfs dump"):
        read_ends(other)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\x01binary")
    with pytest.raises(click.ClickException, match="not JSON"):
        read_ends(garbage)
