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
from chainfs.meta_service.caps import REUSE_STEPS, CapabilitySigner
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import mgmt_pb2_grpc
from chainfs.proto import storage_pb2 as sp
from chainfs.storage_service.access import Access

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


def test_grants_within_one_step_are_the_very_same_capability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Meta rounds expiries up to a step (1/16 of the lifetime): grants of one
    step to one client are identical bit for bit, and each lives at least the
    whole lifetime and less than lifetime + step."""
    signer = CapabilitySigner(SECRET, ttl_ms=600_000)
    step = signer.step_ms
    assert step == 600_000 // REUSE_STEPS
    base_ms = 1_000 * step + 1 - 600_000  # now + ttl just past a step's start
    now = [base_ms]
    monkeypatch.setattr(capability.time, "time", lambda: now[0] / 1000)
    cid = b"c" * 16
    first = signer.sign(42, capability.READ, cid)
    now[0] = base_ms + step - 2  # the last ms of the same step
    again = signer.sign(42, capability.READ, cid)
    assert again.SerializeToString() == first.SerializeToString()
    assert first.expires_ms == 1_001 * step
    for at, cap in ((base_ms, first), (now[0], again)):
        assert at + 600_000 <= cap.expires_ms < at + 600_000 + step
    # Another client, other rights or another inode: another capability.
    assert signer.sign(42, capability.READ, b"d" * 16).mac != first.mac
    assert signer.sign(42, capability.READ | capability.WRITE, cid).mac != first.mac
    assert signer.sign(43, capability.READ, cid).mac != first.mac
    now[0] = base_ms + step  # the next step
    later = signer.sign(42, capability.READ, cid)
    assert later.expires_ms == first.expires_ms + step and later.mac != first.mac
    capability.check({1: capability_key(SECRET)}, later, 42, capability.READ, cid)


def test_storage_checks_a_capability_once_until_it_drops_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storage remembers the checks passed (bounded, oldest out first): the same
    capability sent again, even as a new message, costs no second HMAC."""
    checked: list[int] = []
    plain = capability.check

    def counted(keys: dict[int, bytes], cap: cpb.Capability, *args: object, **kw: object) -> None:
        checked.append(cap.inode)
        plain(keys, cap, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(capability, "check", counted)
    access = Access(SECRET, max_caps_per_batch=8, passed_cache_entries=2)
    signer = CapabilitySigner(SECRET, ttl_ms=600_000)
    cid = b"c" * 16
    wire = {ino: signer.sign(ino, capability.READ, cid).SerializeToString() for ino in (1, 2, 3)}

    def read(ino: int) -> None:
        req = sp.BatchReadReq(
            ios=[sp.ReadIO(chain_id=1, target_id=1, chunk=sp.ChunkId(inode=ino), length=1)],
            capabilities=[cpb.Capability.FromString(wire[ino])],
        )
        access.admit(sp.BATCH_READ, ALICE, req)

    for ino in (1, 1, 2, 1, 2):
        read(ino)
    assert checked == [1, 2]
    read(3)  # the bound is 2: the oldest (inode 1) drops out
    read(3)
    read(2)
    read(1)
    assert checked == [1, 2, 3, 1]
    forged = cpb.Capability.FromString(wire[2])
    forged.mac = bytes(32)
    with pytest.raises(ChainfsError) as e:
        access.admit(
            sp.BATCH_READ,
            ALICE,
            sp.BatchReadReq(
                ios=[sp.ReadIO(chain_id=1, target_id=1, chunk=sp.ChunkId(inode=2), length=1)],
                capabilities=[forged],
            ),
        )
    assert e.value.code == Code.BAD_CAPABILITY


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
