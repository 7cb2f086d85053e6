"""`chainfs dump` / `chainfs load` between two real clusters: every kind of entry,
its attributes, xattrs, layout and contents come back identical."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster

pytestmark = pytest.mark.timeout(400)

KiB = 1024


def _chainfs(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "chainfs", *args]
    env = dict(os.environ, CHAINFS_ADDRESS=address)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _cluster(base: Path) -> LocalCluster:
    return LocalCluster(base, storage_nodes=2, targets_per_node=1, replicas=1)


def build_tree(fs: FileSystem, address: str) -> None:
    """Directories, files (empty, multi-chunk, odd modes), symlinks, a hard link,
    xattrs, set times and owners, and a file whose layout differs from its directory's."""
    fs.mkdir("/d1")
    _ok(_chainfs("admin", "set-layout", "/d1", "--chunk-size", "64K", "--stripe", "1",
                 address=address))  # fmt: skip
    fs.write_file("/d1/multi.bin", os.urandom(5 * 64 * KiB + 123))  # 6 chunks of 64 KiB
    fs.write_file("/d1/empty", b"")
    _ok(_chainfs("admin", "set-layout", "/d1", "--chunk-size", "128K", address=address))
    fs.write_file("/d1/after.bin", os.urandom(200 * KiB))  # 128 KiB chunks; multi.bin 64 KiB
    fs.mkdir("/d1/sub dir ü")
    fs.write_file("/d1/sub dir ü/inner", b"inside a read-only directory")
    fs.chmod("/d1/sub dir ü", 0o555)
    fs.write_file("/big.bin", os.urandom(5 * 1024 * KiB + 7))  # two 4 MiB chunks
    fs.write_file("/suid", b"#!/bin/sh\n")
    fs.chown("/suid", 1000, 1000)
    fs.chmod("/suid", 0o4755)
    fs.write_file("/noperm", b"secret")
    fs.chmod("/noperm", 0o000)
    fs.mkdir("/sticky")
    fs.chmod("/sticky", 0o1777)
    fs.chown("/sticky", 65534, 100)
    fs.link("/d1/after.bin", "/sticky/hardlink")
    fs.symlink("../d1/multi.bin", "/sticky/to-file")
    fs.symlink("/nowhere/at/all", "/dangling")
    fs.setxattr("/d1/multi.bin", "user.bin", bytes(range(256)))
    fs.setxattr("/d1/multi.bin", "user.empty", b"")
    fs.setxattr("/sticky", "user.dir", b"on a directory")
    fs.utime("/big.bin", ns=(1_000_000_123, 2_000_000_456))
    fs.utime("/d1/empty", ns=(1_600_000_000_000_000_001, 1_500_000_000_000_000_002))
    fs.utime("/d1", ns=(1_234_567_890_123_456_789, 1_111_111_111_111_111_111))


def checksum_walk(fs: FileSystem, address: str) -> dict[str, Any]:
    """path -> every attribute a user sees, the content hash, the layout, the link group."""
    out: dict[str, Any] = {}
    first_of_inode: dict[int, str] = {}

    def visit(path: str) -> None:
        st = fs.lstat(path)
        rec: dict[str, Any] = {
            "mode": oct(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "nlink": st.st_nlink,
            "size": st.st_size,
            "atime_ns": st.st_atime_ns,
            "mtime_ns": st.st_mtime_ns,
        }
        if stat.S_ISLNK(st.st_mode):
            rec["target"] = fs.readlink(path)
        else:
            rec["xattrs"] = {n: fs.getxattr(path, n).hex() for n in sorted(fs.listxattr(path))}
            lay = json.loads(_ok(_chainfs("admin", "get-layout", path, "--json", address=address)))
            rec["layout"] = (lay["chunk_size"], lay["stripe"])
        if stat.S_ISREG(st.st_mode):
            rec["sha256"] = hashlib.sha256(fs.read_file(path)).hexdigest()
            rec["same_file_as"] = first_of_inode.setdefault(st.st_ino, path)
        out[path] = rec
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(fs.listdir(path)):
                visit(f"{path.rstrip('/')}/{name}")

    visit("/")
    return out


def test_dump_then_load_into_a_fresh_cluster_is_identical(tmp_path: Path) -> None:
    dump_file = tmp_path / "backup.jsonl"
    with _cluster(tmp_path / "a") as a:
        fs = a.client()
        build_tree(fs, a.address)
        want = checksum_walk(fs, a.address)
        out = _chainfs("dump", str(dump_file), address=a.address)
        _ok(out)
        assert "dump" in out.stderr and "/s" in out.stderr  # the progress line, with a rate
        again = _chainfs("dump", str(dump_file), address=a.address)
        assert again.returncode == 1 and "exists" in again.stderr  # never overwritten silently
        assert checksum_walk(fs, a.address) == want  # dumping changed nothing (atime!)
    assert (tmp_path / "backup.jsonl.data").is_dir()
    lines = dump_file.read_text().splitlines()
    files = [r for p, r in want.items() if "sha256" in r and r["same_file_as"] == p]
    assert len(want) == 14 and len(files) == 7
    end = {"end": True, "entries": 14, "files": 7, "bytes": sum(r["size"] for r in files)}
    assert json.loads(lines[-1]) == end
    assert sum('"type":"link"' in line for line in lines) == 1
    with _cluster(tmp_path / "b") as b:
        fs = b.client()
        _ok(_chainfs("load", str(dump_file), address=b.address))
        got = checksum_walk(fs, b.address)
        assert got == want
        refused = _chainfs("load", str(dump_file), address=b.address)
        assert refused.returncode == 1 and "not empty" in refused.stderr
        assert checksum_walk(fs, b.address) == want  # a refused load changes nothing


def test_metadata_only_dump_and_a_damaged_dump(tmp_path: Path) -> None:
    dump_file = tmp_path / "names.jsonl"
    with _cluster(tmp_path / "a") as a:
        fs = a.client()
        fs.mkdir("/x")
        fs.write_file("/x/f", b"contents stay behind")
        fs.symlink("f", "/x/s")
        _ok(_chainfs("dump", str(dump_file), "--metadata-only", address=a.address))
        assert not (tmp_path / "names.jsonl.data").exists()
        _ok(_chainfs("load", str(dump_file), "--target", "/copy", address=a.address))
        assert fs.listdir("/copy/x") == ["f", "s"]
        assert fs.read_file("/copy/x/f") == b"" and fs.readlink("/copy/x/s") == "f"
        cut = tmp_path / "cut.jsonl"
        cut.write_text("".join(dump_file.read_text().splitlines(keepends=True)[:-1]))
        bad = _chainfs("load", str(cut), "--target", "/cut", address=a.address)
        assert bad.returncode == 1 and "incomplete" in bad.stderr
        assert not fs.exists("/cut")
