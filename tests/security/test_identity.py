"""Who a caller is comes from its credential, never from what its request claims.

Against a live cluster with authentication: a user's uid/gid come from its
token; an impersonating token (a multi-user mount's) has root squashed; admin
RPCs refuse users who are not admins and leave an audit line; a node key acts
only for its own node; a removed user or rotated token stops working; and an
unprivileged local user (uid 65534, through setpriv) gets nowhere.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import chainfs
from chainfs.common.auth.secret import load_secret, node_credential
from chainfs.common.auth.tokens import new_token
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import MetaClient, UserInfo
from chainfs.common.rpc.mgmt_client import FramedMgmtClient, MgmtClient
from chainfs.local import LocalCluster
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp

REFRESH_MS = 300  # meta's user directory refresh in this cluster
RECHECK_MS = 300  # mgmtd's re-check of a framed connection's token in this cluster
REVOKE_WAIT_S = 20.0  # bound on waiting for a revocation to reach meta (many intervals)


def _fast_user_refresh(_i: int, c: Any) -> None:
    c.user_refresh_interval_ms = REFRESH_MS


def _fast_user_recheck(_i: int, c: Any) -> None:
    c.user_recheck_interval_ms = RECHECK_MS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("identity"))
    with LocalCluster(
        base,
        storage_nodes=1,
        targets_per_node=1,
        replicas=1,
        configure_meta=_fast_user_refresh,
        configure_mgmtd=_fast_user_recheck,
    ) as c:
        fs = c.client()
        fs.mkdir("/private", 0o700)
        fs.write_file("/private/secret.bin", b"root only")
        fs.chmod("/private/secret.bin", 0o600)
        fs.mkdir("/home1000", 0o700)
        fs.chown("/home1000", 1000, 1000)
        yield c


def _admin(cluster: LocalCluster) -> MgmtClient:
    return MgmtClient(cluster.address, 10.0, credential=cpb.Credential(token=cluster.admin_token))


def add_user(cluster: LocalCluster, name: str, **fields: Any) -> str:
    async def go() -> str:
        async with _admin(cluster) as m:
            return (await m.user_add(mp.User(name=name, **fields))).token

    return asyncio.run(go())


def meta_call(
    cluster: LocalCluster, token: str, user: UserInfo, fn: Callable[[MetaClient], Any]
) -> Any:
    assert cluster.meta is not None
    address = str(cluster.meta.info["rpc_address"])

    async def go() -> Any:
        m = MetaClient(address, user=user, timeout_s=10, credential=cpb.Credential(token=token))
        try:
            return await fn(m)
        finally:
            await m.aclose()

    return asyncio.run(go())


def test_uid_comes_from_the_token_not_the_request(cluster: LocalCluster) -> None:
    alice = add_user(cluster, "alice", uid=1000, gid=1000)
    # This test runs as root, so the client's requests claim uid 0: ignored.
    with chainfs.connect(cluster.address, token=alice) as fs:
        with pytest.raises(PermissionError):
            fs.read_file("/private/secret.bin")
        fs.write_file("/home1000/mine.bin", b"alice's")
        st = fs.stat("/home1000/mine.bin")
        assert (st.st_uid, st.st_gid) == (1000, 1000)
    with pytest.raises(ChainfsError) as e:
        meta_call(cluster, alice, UserInfo(0, 0), lambda m: m.open("/private/secret.bin"))
    assert e.value.code == Code.EACCES


def test_impersonating_token_acts_for_the_claimed_uid_with_root_squashed(
    cluster: LocalCluster,
) -> None:
    mount = add_user(cluster, "mount-nonadmin", uid=1, gid=1, impersonate=True)
    # The claimed uid is believed (a multi-user mount passes the kernel's):
    # uid 1000 may list its 0700 directory, uid 1001 may not...
    assert isinstance(
        meta_call(cluster, mount, UserInfo(1000, 1000), lambda m: m.listdir("/home1000")), list
    )
    with pytest.raises(ChainfsError) as e:
        meta_call(cluster, mount, UserInfo(1001, 1001), lambda m: m.listdir("/home1000"))
    assert e.value.code == Code.EACCES
    # ...but a claimed root is squashed to nobody: root's 0600 file stays closed.
    with pytest.raises(ChainfsError) as e:
        meta_call(cluster, mount, UserInfo(0, 0), lambda m: m.open("/private/secret.bin"))
    assert e.value.code == Code.EACCES


def mgmt_codes(
    cluster: LocalCluster, cred: cpb.Credential, calls: Callable[[MgmtClient], list[Awaitable[Any]]]
) -> list[int]:
    """The chainfs error code of each call (0: it succeeded), made with ``cred``."""

    async def go() -> list[int]:
        codes = []
        async with MgmtClient(cluster.address, 10.0, credential=cred) as m:
            for call in calls(m):
                try:
                    await call
                    codes.append(0)
                except ChainfsError as e:
                    codes.append(e.code)
        return codes

    return asyncio.run(go())


def test_admin_rpcs_refuse_users_and_are_audited(cluster: LocalCluster) -> None:
    bob = cpb.Credential(token=add_user(cluster, "bob-user", uid=1001, gid=1001))
    codes = mgmt_codes(
        cluster,
        bob,
        lambda m: [m.user_list(), m.create_chains(1), m.set_config("meta.gc_batch", "5")],
    )
    assert codes == [Code.EPERM] * 3
    assert cluster.mgmtd is not None
    log = cluster.mgmtd.log_path.read_text()
    assert "audit method=chainfs.mgmt.Mgmt/UserList identity='user bob-user (uid 1001)'" in log
    assert "outcome=refused" in log


def _node_ids(cluster: LocalCluster) -> tuple[int, int, str]:
    async def go() -> tuple[int, int, str]:
        async with _admin(cluster) as m:
            routing = await m.get_routing()
        assert routing is not None
        storage = routing.nodes_of_type(mp.STORAGE)[0]
        meta = routing.nodes_of_type(mp.META)[0]
        return storage.node_id, meta.node_id, meta.rpc_address

    return asyncio.run(go())


def test_a_node_key_acts_only_for_its_own_node(cluster: LocalCluster) -> None:
    secret = load_secret(cluster.secret_file)
    storage_id, meta_id, meta_address = _node_ids(cluster)
    hijack = mp.NodeInfo(node_id=meta_id, type=mp.META, rpc_address="127.0.0.1:9")

    def attempt(cred: cpb.Credential) -> list[int]:
        return mgmt_codes(
            cluster,
            cred,
            lambda m: [
                m.register_node(hijack, reregister=True),
                m.heartbeat(mp.HeartbeatReq(node_id=meta_id)),
            ],
        )

    assert attempt(cpb.Credential()) == [Code.UNAUTHENTICATED] * 2
    assert (
        attempt(cpb.Credential(node_id=meta_id, node_key=b"\1" * 32)) == [Code.UNAUTHENTICATED] * 2
    )
    assert attempt(node_credential(secret, storage_id)) == [Code.EPERM] * 2
    assert attempt(node_credential(secret, 0)) == [Code.EPERM] * 2  # joining: new nodes only
    # The meta node's own key heartbeats it (the check is per node, not a blanket refusal).
    own = node_credential(secret, meta_id)
    assert mgmt_codes(cluster, own, lambda m: [m.heartbeat(mp.HeartbeatReq(node_id=meta_id))]) == [
        0
    ]
    # Routing still sends clients to the real meta server.
    assert _node_ids(cluster)[2] == meta_address


def _wait_refused(what: Callable[[], Any]) -> None:
    deadline = time.monotonic() + REVOKE_WAIT_S
    while True:
        try:
            what()
        except PermissionError:
            return
        assert time.monotonic() < deadline, "a revoked token still works"
        time.sleep(REFRESH_MS / 1000)


def test_removed_user_and_rotated_token_stop_working(cluster: LocalCluster) -> None:
    carol = add_user(cluster, "carol", uid=1002, gid=1002)
    held = chainfs.connect(cluster.address, token=carol)
    try:
        assert held.isdir("/")

        async def rotate() -> str:
            async with _admin(cluster) as m:
                return await m.token_rotate("carol")

        fresh = asyncio.run(rotate())
        _wait_refused(lambda: chainfs.connect(cluster.address, token=carol).close())
        _wait_refused(lambda: held.listdir("/"))  # its connection was made with the old token
        with chainfs.connect(cluster.address, token=fresh) as fs:
            assert fs.isdir("/")

            async def remove() -> None:
                async with _admin(cluster) as m:
                    await m.user_remove("carol")

            asyncio.run(remove())
            _wait_refused(lambda: fs.listdir("/"))
        _wait_refused(lambda: chainfs.connect(cluster.address, token=fresh).close())
    finally:
        held.close()


def test_a_removed_users_open_framed_mgmtd_connection_stops(
    cluster: LocalCluster,
) -> None:
    """The framed transport authenticates a connection once (HELLO); mgmtd
    looks the token up again, so a removed user's open connection stops."""
    dave = add_user(cluster, "dave", uid=1003, gid=1003)

    async def go() -> int:
        m = FramedMgmtClient(cluster.address, 10.0, credential=cpb.Credential(token=dave))
        try:
            await m._call("GetStatus", mp.GetStatusReq())
            async with _admin(cluster) as admin:
                await admin.user_remove("dave")
            deadline = time.monotonic() + REVOKE_WAIT_S
            while True:
                try:
                    await m._call("GetStatus", mp.GetStatusReq())
                except ChainfsError as e:
                    return e.code
                assert time.monotonic() < deadline, "a removed user's connection still works"
                await asyncio.sleep(RECHECK_MS / 1000)
        finally:
            await m.close()

    assert asyncio.run(go()) == Code.UNAUTHENTICATED


UNPRIVILEGED_SCRIPT = r"""
import asyncio, json, sys
import chainfs
from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.mgmt_client import FramedMgmtClient, MgmtClient
from chainfs.proto import common_pb2 as cpb, mgmt_pb2 as mp

address, secret_file, token_file, meta_id, forged_token = sys.argv[1:6]
out = {}
for name, path in (("secret", secret_file), ("admin_token", token_file)):
    try:
        open(path).read()
        out[name] = "read"
    except OSError as e:
        out[name] = e.errno
for name, token in (("no_token", None), ("made_up_token", forged_token)):
    try:
        chainfs.connect(address, token=token).close()
        out[name] = "connected"
    except OSError as e:
        out[name] = e.errno

async def hijack():
    node = mp.NodeInfo(node_id=int(meta_id), type=mp.META, rpc_address="127.0.0.1:9")
    guess = cpb.Credential(node_id=int(meta_id), node_key=bytes(32))
    async with MgmtClient(address, 5.0, credential=guess) as m:
        try:
            await m.register_node(node, reregister=True)
            return "registered"
        except ChainfsError as e:
            return e.code
out["reregister"] = asyncio.run(hijack())
print(json.dumps(out))
"""


def test_an_unprivileged_local_user_gets_nowhere(cluster: LocalCluster) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to drop to uid 65534")
    _, meta_id, meta_address = _node_ids(cluster)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(Path(chainfs.__file__).resolve().parents[1]),
        "HOME": "/nonexistent",
    }
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    args = [cluster.address, str(cluster.secret_file), str(cluster.admin_token_file)]
    args += [str(meta_id), new_token()]
    out = subprocess.run(
        [*cmd, "-c", UNPRIVILEGED_SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {
        "secret": errno.EACCES,
        "admin_token": errno.EACCES,
        "no_token": errno.EACCES,
        "made_up_token": errno.EACCES,
        "reregister": Code.UNAUTHENTICATED,
    }
    assert _node_ids(cluster)[2] == meta_address


def admin_cli(cluster: LocalCluster, *args: str, token_file: Path | None) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAINFS_TOKEN")}
    extra = ["--token-file", str(token_file)] if token_file is not None else []
    cmd = [sys.executable, "-m", "chainfs", "admin", *args, "--address", cluster.address]
    return subprocess.run(
        [*cmd, *extra, "--json"], env=env, capture_output=True, text=True, timeout=60
    )


def test_admin_user_commands(cluster: LocalCluster) -> None:
    admin = cluster.admin_token_file
    added = admin_cli(
        cluster, "user-add", "dave", "--uid", "1003", "--gid", "1003", "--groups", "5,6",
        token_file=admin,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    token = json.loads(added.stdout)["token"]
    listed = admin_cli(cluster, "user-list", token_file=admin)
    assert listed.returncode == 0, listed.stderr
    dave = next(u for u in json.loads(listed.stdout) if u["name"] == "dave")
    assert dave == {
        "name": "dave", "uid": 1003, "gid": 1003, "groups": [5, 6],
        "admin": False, "impersonate": False,
    }  # fmt: skip
    assert "cfs_" not in listed.stdout  # never a token (nor a hash field)
    with chainfs.connect(cluster.address, token=token) as fs:
        assert fs.isdir("/")
    rotated = admin_cli(cluster, "token-rotate", "dave", token_file=admin)
    assert rotated.returncode == 0 and json.loads(rotated.stdout)["token"] != token
    assert admin_cli(cluster, "user-remove", "dave", token_file=admin).returncode == 0
    refused = admin_cli(cluster, "user-list", token_file=None)
    assert refused.returncode == 1 and "admin.token" in refused.stderr
