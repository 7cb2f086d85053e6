"""The auth primitives: node keys, tokens, capabilities, the policy, the framed
HELLO and the gRPC interceptor, over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from chainfs.common.auth import capability, policy
from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.identity import Identity, Kind, Need, current_identity, require
from chainfs.common.auth.secret import (
    capability_key,
    create_secret_file,
    load_secret,
    node_key,
)
from chainfs.common.auth.tokens import new_token, token_hash
from chainfs.common.dataplane.client import DataClient
from chainfs.common.dataplane.server import DataServer, Request, Response
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc import grpc_util
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import mgmt_pb2_grpc

SECRET = b"s" * 32
ALICE = Identity(Kind.USER, name="alice", uid=1000, gid=1000, groups=frozenset({1000}))
ROOT_ADMIN = Identity(Kind.USER, name="admin", uid=0, gid=0, admin=True)


class Users:
    def __init__(self, **tokens: Identity) -> None:
        self.by_hash = {token_hash(t): who for t, who in tokens.items()}

    async def user_of(self, h: str) -> Identity | None:
        return self.by_hash.get(h)


def test_secret_file_is_private_and_stable(tmp_path: Path) -> None:
    p = tmp_path / "d" / "cluster.secret"
    s = create_secret_file(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert create_secret_file(p) == s == load_secret(p)
    os.chmod(p, 0o644)
    with pytest.raises(ChainfsError) as e:
        load_secret(p)
    assert e.value.code == Code.CONFIG_ERROR


async def test_authenticator_nodes_and_tokens() -> None:
    tok = new_token()
    auth = Authenticator(SECRET, Users(**{tok: ALICE}))
    who = await auth.authenticate(cpb.Credential(node_id=7, node_key=node_key(SECRET, 7)))
    assert who.is_node and who.node_id == 7
    assert await auth.authenticate(cpb.Credential(token=tok)) == ALICE
    for bad in (
        cpb.Credential(node_id=7, node_key=node_key(SECRET, 8)),
        cpb.Credential(node_id=7, node_key=node_key(b"x" * 32, 7)),
        cpb.Credential(token=new_token()),
    ):
        with pytest.raises(ChainfsError) as e:
            await auth.authenticate(bad)
        assert e.value.code == Code.UNAUTHENTICATED
    assert (await auth.authenticate(cpb.Credential())).kind is Kind.ANONYMOUS


def test_require_and_policy() -> None:
    require(Need.USER, ALICE, "x")
    with pytest.raises(ChainfsError) as e:
        require(Need.ADMIN, ALICE, "x")
    assert e.value.code == Code.EPERM
    with pytest.raises(ChainfsError) as e:
        policy.authorize("chainfs.meta.Meta/Stat", Identity(Kind.ANONYMOUS))
    assert e.value.code == Code.UNAUTHENTICATED
    with pytest.raises(ChainfsError) as e:
        policy.authorize("chainfs.meta.Meta/NoSuchCall", ROOT_ADMIN)
    assert e.value.code == Code.EPERM


def test_capability_checks() -> None:
    key = capability_key(SECRET)
    keys = {1: key}
    cid = b"c" * 16
    cap = capability.sign(key, 1, inode=42, rights=capability.READ, client_id=cid, ttl_ms=60_000)
    capability.check(keys, cap, 42, capability.READ, cid)
    cases = [
        (dict(inode=43, rights=capability.READ), "inode"),
        (dict(inode=42, rights=capability.WRITE), "grant"),
    ]
    for kw, _ in cases:
        with pytest.raises(ChainfsError) as e:
            capability.check(keys, cap, kw["inode"], kw["rights"], cid)
        assert e.value.code == Code.BAD_CAPABILITY
    forged = cpb.Capability()
    forged.CopyFrom(cap)
    forged.rights = capability.READ | capability.WRITE
    with pytest.raises(ChainfsError):
        capability.check(keys, forged, 42, capability.WRITE, cid)
    with pytest.raises(ChainfsError):
        capability.check(keys, cap, 42, capability.READ, b"d" * 16)
    late = int(time.time() * 1000) + 60_000 + capability.CLOCK_SKEW_MS + 1
    with pytest.raises(ChainfsError):
        capability.check(keys, cap, 42, capability.READ, cid, now_ms=late)


async def _whoami(req: Request) -> Response:
    return Response(req.msg_type, req.identity.describe().encode())


async def test_framed_hello_binds_identity() -> None:
    tok = new_token()
    server = DataServer(_whoami, authenticator=Authenticator(SECRET, Users(**{tok: ALICE})))
    await server.start()
    clients = []
    try:
        anon = DataClient()
        user = DataClient(credential=cpb.Credential(token=tok))
        node = DataClient(credential=cpb.Credential(node_id=3, node_key=node_key(SECRET, 3)))
        wrong = DataClient(credential=cpb.Credential(token=new_token()))
        clients = [anon, user, node, wrong]
        assert (await anon.request(server.address, 1, b"")).header == b"anonymous"
        assert b"user alice" in (await user.request(server.address, 1, b"")).header
        assert (await node.request(server.address, 1, b"")).header == b"node 3"
        with pytest.raises(ChainfsError) as e:
            await wrong.request(server.address, 1, b"")
        assert e.value.code == Code.UNAUTHENTICATED
    finally:
        for c in clients:
            await c.close()
        await server.stop()


class _Mgmt(mgmt_pb2_grpc.MgmtServicer):
    @grpc_util.rpc_handler
    async def GetStatus(self, request: mp.GetStatusReq, context: object) -> mp.GetStatusRsp:
        assert current_identity().node_id == 5
        return mp.GetStatusRsp()

    @grpc_util.rpc_handler
    async def SetConfig(self, request: mp.SetConfigReq, context: object) -> mp.SetConfigRsp:
        return mp.SetConfigRsp()


async def test_grpc_interceptor_enforces_policy(caplog: pytest.LogCaptureFixture) -> None:
    tok = new_token()
    srv = grpc_util.server(auth=Authenticator(SECRET, Users(**{tok: ALICE})))
    mgmt_pb2_grpc.add_MgmtServicer_to_server(_Mgmt(), srv)
    port = grpc_util.bind(srv, "127.0.0.1", 0)
    await srv.start()
    addr = f"127.0.0.1:{port}"
    try:
        node = cpb.Credential(node_id=5, node_key=node_key(SECRET, 5))
        async with grpc_util.channel(addr, node) as ch:
            await grpc_util.call(mgmt_pb2_grpc.MgmtStub(ch).GetStatus, mp.GetStatusReq(), 5)
        async with grpc_util.channel(addr) as ch:
            with pytest.raises(ChainfsError) as e:
                await grpc_util.call(mgmt_pb2_grpc.MgmtStub(ch).GetStatus, mp.GetStatusReq(), 5)
            assert e.value.code == Code.UNAUTHENTICATED
        caplog.set_level("INFO", logger="chainfs.audit")
        async with grpc_util.channel(addr, cpb.Credential(token=tok)) as ch:
            with pytest.raises(ChainfsError) as e:
                await grpc_util.call(mgmt_pb2_grpc.MgmtStub(ch).SetConfig, mp.SetConfigReq(), 5)
            assert e.value.code == Code.EPERM
        assert any("SetConfig" in r.message and "alice" in r.message for r in caplog.records)
    finally:
        await srv.stop(None)
