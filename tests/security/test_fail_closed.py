"""Every RPC and framed message fails closed.

The access policy must classify every method of every service in the protos
(a new RPC is refused until someone decides who may call it), and a live
cluster must refuse each meta and mgmtd method, over gRPC and over the framed
transport, to a caller with no credential, an unknown token or a forged node
key. Storage's frames and StorageControl are checked where storage enforces
them (see STORAGE_SERVICES below).
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import grpc.aio
import pytest
from google.protobuf.descriptor import MethodDescriptor

import chainfs.proto
from chainfs.common.auth.grpc_auth import client_interceptors
from chainfs.common.auth.policy import POLICY
from chainfs.common.auth.tokens import new_token
from chainfs.common.dataplane.client import DataClient
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc import grpc_util, meta_wire, mgmt_wire
from chainfs.local import LocalCluster
from chainfs.meta_service.service import POLICY_KEYS as META_FRAME_KEYS
from chainfs.mgmt_service.service import POLICY_KEYS as MGMT_FRAME_KEYS
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import mgmt_pb2_grpc as mg

# Services whose gRPC methods are checked live here: meta and mgmtd. Storage's
# (StorageControl, and its frames) are checked once storage enforces the
# policy: add them here then.
LIVE_SERVICES = ("chainfs.meta.Meta", "chainfs.meta.MetaAdmin", "chainfs.mgmt.Mgmt")

BAD_CREDENTIALS = {
    "none": None,
    "unknown token": cpb.Credential(token=new_token()),
    "forged node key": cpb.Credential(node_id=1, node_key=b"\0" * 32),
}


def all_methods() -> Iterator[tuple[str, ModuleType, MethodDescriptor]]:
    """("<package>.<Service>/<Method>", its _pb2 module, descriptor) of every service."""
    for info in pkgutil.iter_modules(chainfs.proto.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"chainfs.proto.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                yield f"{service.full_name}/{m.name}", module, m


def test_every_rpc_and_framed_message_is_classified() -> None:
    keys = [key for key, _, _ in all_methods()]
    assert any(k.startswith("chainfs.storage.") for k in keys)  # all protos were found
    missing = [k for k in keys if k not in POLICY]
    assert not missing, f"not in chainfs/common/auth/policy.py (so refused): {missing}"
    # The framed transports authorize by the same keys, one per msg_type.
    assert set(META_FRAME_KEYS) == set(meta_wire.WIRE_BY_MSG_TYPE)
    assert set(MGMT_FRAME_KEYS) == set(mgmt_wire.WIRE_BY_MSG_TYPE)
    for key in [*META_FRAME_KEYS.values(), *MGMT_FRAME_KEYS.values()]:
        assert key in POLICY


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path(tmp_path_factory.mktemp("fail-closed"))
    with LocalCluster(base, storage_nodes=1, targets_per_node=1, replicas=1) as c:
        yield c


def _service_address(cluster: LocalCluster, key: str) -> str:
    if key.startswith("chainfs.mgmt."):
        return cluster.mgmtd_addresses[0]
    assert cluster.meta is not None
    return str(cluster.meta.info["rpc_address"])


async def _grpc_status(
    address: str, key: str, module: ModuleType, m: MethodDescriptor, cred: cpb.Credential | None
) -> grpc.StatusCode:
    request = getattr(module, m.input_type.name)()
    response = getattr(module, m.output_type.name)
    async with grpc.aio.insecure_channel(address, interceptors=client_interceptors(cred)) as ch:
        try:
            if m.server_streaming:
                stream = ch.unary_stream(f"/{key}", request.SerializeToString, response.FromString)
                async for _ in stream(request, timeout=10):
                    pass
            else:
                call = ch.unary_unary(f"/{key}", request.SerializeToString, response.FromString)
                await call(request, timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("cred_name", list(BAD_CREDENTIALS))
def test_grpc_methods_refuse_bad_credentials(cluster: LocalCluster, cred_name: str) -> None:
    cred = BAD_CREDENTIALS[cred_name]
    methods = [(k, mod, m) for k, mod, m in all_methods() if k.split("/")[0] in LIVE_SERVICES]
    assert len(methods) > 40

    async def go() -> dict[str, grpc.StatusCode]:
        return {
            k: await _grpc_status(_service_address(cluster, k), k, mod, m, cred)
            for k, mod, m in methods
        }

    codes = asyncio.run(go())
    wrong = {k: c for k, c in codes.items() if c != grpc.StatusCode.UNAUTHENTICATED}
    assert not wrong, f"answered without an accepted credential ({cred_name}): {wrong}"


@pytest.mark.parametrize("cred_name", list(BAD_CREDENTIALS))
def test_framed_messages_refuse_bad_credentials(cluster: LocalCluster, cred_name: str) -> None:
    cred = BAD_CREDENTIALS[cred_name]
    assert cluster.meta is not None
    targets = [
        (str(cluster.meta.info["data_address"]), meta_wire.WIRE_BY_MSG_TYPE),
        (mgmt_wire.frame_address_of(cluster.mgmtd_addresses[0]), mgmt_wire.WIRE_BY_MSG_TYPE),
    ]

    async def go() -> dict[str, int]:
        codes: dict[str, int] = {}
        for address, wire in targets:
            for msg_type, w in wire.items():
                dp = DataClient(credential=cred)  # a connection (and HELLO) per message
                try:
                    header = w.request().SerializeToString()
                    await dp.request(address, msg_type, header, timeout_s=10)
                    codes[w.name] = 0
                except ChainfsError as e:
                    codes[w.name] = e.code
                finally:
                    await dp.close()
        return codes

    codes = asyncio.run(go())
    assert len(codes) > 25
    wrong = {k: c for k, c in codes.items() if c != Code.UNAUTHENTICATED}
    assert not wrong, f"answered without an accepted credential ({cred_name}): {wrong}"


def test_a_stream_carries_the_channels_credential(cluster: LocalCluster) -> None:
    """A server-streaming call (the routing watch every node and client keeps)
    presents the channel's credential as a unary call does: grpc.aio files an
    interceptor under one call kind only, and a watch sent anonymously is
    refused, leaving nodes on stale routing until the next poll."""
    streaming = [k for k, _, m in all_methods() if m.server_streaming]
    assert streaming == ["chainfs.mgmt.Mgmt/WatchRoutingInfo"]  # a new one: test it here
    cred = cpb.Credential(token=cluster.admin_token)

    async def first_version() -> int:
        ch = grpc_util.channel(cluster.mgmtd_addresses[0], cred)
        try:
            stream = mg.MgmtStub(ch).WatchRoutingInfo(
                mp.WatchRoutingInfoReq(known_version=0), timeout=10
            )
            async for info in stream:
                return int(info.version)
            raise AssertionError("the watch ended without routing info")
        finally:
            await ch.close()

    assert asyncio.run(first_version()) > 0
