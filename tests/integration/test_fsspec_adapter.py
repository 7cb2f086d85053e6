"""fsspec `chainfs` protocol: fsspec's own abstract suite, plus the adapter's specifics."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import fsspec
import pytest
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from chainfs.client.fsspec_adapter import ChainFileSystem
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import CHUNK, module_cluster, pattern

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "client-fsspec")


@pytest.fixture(scope="module")
def cfs(cluster: LocalCluster) -> ChainFileSystem:
    fs = fsspec.filesystem("chainfs", address=cluster.address)
    assert isinstance(fs, ChainFileSystem)
    return fs


class ChainfsFixtures(AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture
    def fs(self, cfs: ChainFileSystem) -> ChainFileSystem:
        return cfs

    @pytest.fixture
    def fs_path(self, cfs: ChainFileSystem) -> str:
        cfs.makedirs("/abstract", exist_ok=True)
        return "/abstract"


class TestChainfsCopy(AbstractCopyTests, ChainfsFixtures):  # type: ignore[misc]
    pass


class TestChainfsGet(AbstractGetTests, ChainfsFixtures):  # type: ignore[misc]
    pass


class TestChainfsPut(AbstractPutTests, ChainfsFixtures):  # type: ignore[misc]
    pass


class TestChainfsPipe(AbstractPipeTests, ChainfsFixtures):  # type: ignore[misc]
    pass


class TestChainfsOpen(AbstractOpenTests, ChainfsFixtures):  # type: ignore[misc]
    pass


# -- the adapter's own behaviour ----------------------------------------------------


def test_entry_point_and_url_forms(cluster: LocalCluster) -> None:
    assert fsspec.get_filesystem_class("chainfs") is ChainFileSystem
    fs, path = fsspec.core.url_to_fs(f"chainfs://{cluster.address}/some/dir/f.bin")
    assert isinstance(fs, ChainFileSystem) and path == "/some/dir/f.bin"
    assert fs.address == cluster.address
    assert ChainFileSystem._strip_protocol("chainfs:///a/b/") == "/a/b"
    assert ChainFileSystem._strip_protocol("chainfs://a/b") == "/a/b"  # no port: a path
    assert fs.unstrip_protocol("/x") == f"chainfs://{cluster.address}/x"


def test_address_and_token_from_the_environment_or_options(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAINFS_ADDRESS", cluster.address)
    fs = ChainFileSystem(skip_instance_cache=True)
    assert fs.address == cluster.address and fs.isdir("/")
    fs.close()
    monkeypatch.delenv("CHAINFS_ADDRESS")
    with pytest.raises(ValueError, match="CHAINFS_ADDRESS"):
        ChainFileSystem(skip_instance_cache=True)
    # The token option is used (not kept and ignored): a wrong one is refused,
    # the admin's works, and a pickled instance keeps it.
    bad = ChainFileSystem(
        address=cluster.address, token="cfs_" + "x" * 43, skip_instance_cache=True
    )
    with pytest.raises(PermissionError):
        bad.isdir("/")
    good = ChainFileSystem(
        address=cluster.address, token=cluster.admin_token, skip_instance_cache=True
    )
    assert pickle.loads(pickle.dumps(good))._token == cluster.admin_token
    assert good.isdir("/")
    good.close()


def test_info_ls_and_types(cfs: ChainFileSystem) -> None:
    cfs.makedirs("/adapter/dir", exist_ok=True)
    cfs.pipe_file("/adapter/f.bin", b"12345")
    cfs.symlink("/adapter/f.bin", "/adapter/ln")
    info = cfs.info("/adapter/f.bin")
    assert info["type"] == "file" and info["size"] == 5 and info["name"] == "/adapter/f.bin"
    assert cfs.info("/adapter/dir")["type"] == "directory"
    link = cfs.info("/adapter/ln")
    assert link["islink"] and link["destination"] == "/adapter/f.bin" and link["size"] == 5
    assert cfs.ls("/adapter", detail=False) == ["/adapter/dir", "/adapter/f.bin", "/adapter/ln"]
    assert cfs.ls("/adapter/f.bin", detail=False) == ["/adapter/f.bin"]
    with pytest.raises(FileNotFoundError):
        cfs.info("/adapter/missing")
    assert cfs.exists("/adapter/f.bin") and not cfs.exists("/adapter/missing")
    assert cfs.isdir("/adapter/dir") and cfs.isfile("/adapter/f.bin")
    assert cfs.modified("/adapter/f.bin").timestamp() > 0
    assert cfs.find("/adapter") == ["/adapter/f.bin", "/adapter/ln"]


def test_mv_is_one_atomic_rename(cfs: ChainFileSystem) -> None:
    data = pattern(CHUNK + 17, "mv")
    cfs.makedirs("/mv/src", exist_ok=True)
    cfs.pipe_file("/mv/src/big.bin", data)
    ino = cfs.info("/mv/src/big.bin")["ino"]
    cfs.mv("/mv/src/big.bin", "/mv/moved.bin")
    assert cfs.info("/mv/moved.bin")["ino"] == ino  # same inode: renamed, not copied
    assert not cfs.exists("/mv/src/big.bin")
    cfs.makedirs("/mv/into", exist_ok=True)
    cfs.mv("/mv/moved.bin", "/mv/into")  # onto a directory: moves inside it
    assert cfs.cat_file("/mv/into/moved.bin") == data
    cfs.mv("/mv/into", "/mv/renamed-dir")  # a whole directory
    assert cfs.ls("/mv/renamed-dir", detail=False) == ["/mv/renamed-dir/moved.bin"]


def test_cat_file_ranges_and_cat_ranges(cfs: ChainFileSystem) -> None:
    data = pattern(3 * CHUNK + 5, "cat")
    cfs.pipe_file("/cat.bin", data)
    assert cfs.cat_file("/cat.bin", CHUNK - 3, CHUNK + 3) == data[CHUNK - 3 : CHUNK + 3]
    assert cfs.cat_file("/cat.bin", start=-4) == data[-4:]
    assert cfs.cat_file("/cat.bin", end=-3) == data[:-3]
    assert cfs.cat_file("/cat.bin", 10, 5) == b""
    assert cfs.cat_file("/cat.bin", len(data) - 2, len(data) + 100) == data[-2:]
    starts = [0, CHUNK - 1, 2 * CHUNK, -10]
    ends = [10, CHUNK + 1, 3 * CHUNK, None]
    got = cfs.cat_ranges([*["/cat.bin"] * 4, "/missing.bin"], [*starts, 0], [*ends, 1])
    assert got[:4] == [
        data[0:10],
        data[CHUNK - 1 : CHUNK + 1],
        data[2 * CHUNK : 3 * CHUNK],
        data[-10:],
    ]
    assert isinstance(got[4], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        cfs.cat_ranges(["/missing.bin"], [0], [1], on_error="raise")


def test_open_modes_and_buffered_files(cfs: ChainFileSystem) -> None:
    with cfs.open("/open.txt", "w") as f:
        f.write("hello\nworld\n")
    with cfs.open("/open.txt", "r") as f:
        assert f.readlines() == ["hello\n", "world\n"]
    with cfs.open("/open.txt", "ab") as f:
        f.write(b"more")
    with cfs.open("/open.txt", "rb") as f:
        f.seek(6)
        assert f.read(5) == b"world"
        assert f.tell() == 11
    assert cfs.cat_file("/open.txt") == b"hello\nworld\nmore"
    cfs.touch("/open.txt", truncate=False)
    assert cfs.size("/open.txt") == 16
    cfs.touch("/open.txt")
    assert cfs.size("/open.txt") == 0


def test_transaction_commits_on_exit(cfs: ChainFileSystem) -> None:
    with cfs.transaction:
        with cfs.open("/tx.bin", "wb") as f:
            f.write(b"committed")
        assert not cfs.exists("/tx.bin")  # invisible until the transaction ends
    assert cfs.cat_file("/tx.bin") == b"committed"


def test_rm_recursive_and_errors(cfs: ChainFileSystem) -> None:
    cfs.pipe({"/rm/a/1": b"1", "/rm/a/b/2": b"2", "/rm/c": b"3"})
    cfs.rm("/rm", recursive=True)
    assert not cfs.exists("/rm")
    with pytest.raises(FileNotFoundError):
        cfs.rm("/rm/none")
    with pytest.raises(FileExistsError):
        cfs.pipe_file("/cat.bin", b"x", mode="create")


def test_pickles_as_its_address(cfs: ChainFileSystem) -> None:
    clone = pickle.loads(pickle.dumps(cfs))
    assert clone.address == cfs.address
    cfs.pipe_file("/pickle.bin", b"p")
    assert clone.cat_file("/pickle.bin") == b"p"
