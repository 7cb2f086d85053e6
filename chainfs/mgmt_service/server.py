"""The mgmtd process: `chainfs serve mgmtd --config F`.

Opens the KV store, serves the Mgmt RPCs (:mod:`.service`), and runs the
election and the heartbeat checker in the background (:mod:`.background`);
see :mod:`.election` for how one of several mgmtds becomes primary.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import grpc.aio

from chainfs import kv
from chainfs.common import config as config_mod
from chainfs.common import logging as chainfs_logging
from chainfs.common import tls
from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.secret import load_secret
from chainfs.common.background import start_all
from chainfs.common.dataplane.server import DataServer, Request, Response
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.process import run_service, write_ready_file
from chainfs.common.rpc import grpc_util, mgmt_wire
from chainfs.kv import KVStore, Transaction
from chainfs.mgmt_service.background import HeartbeatChecker, LeaseKeeper
from chainfs.mgmt_service.cluster_state import Counters
from chainfs.mgmt_service.config import MgmtdConfig, redact_url
from chainfs.mgmt_service.schema import KEY_COUNTERS
from chainfs.mgmt_service.service import Mgmtd, framed_handler
from chainfs.mgmt_service.status_page import MgmtdWeb, ThroughputSampler, start_web
from chainfs.mgmt_service.users import UserStore
from chainfs.proto import mgmt_pb2_grpc as mg

log = logging.getLogger(__name__)

_EPHEMERAL_BIND_ATTEMPTS = 20  # bound on retries of an ephemeral gRPC + framed port pair


async def _allocate_self_id(store: KVStore, wanted: int) -> int:
    async def fn(tx: Transaction) -> int:
        counters = Counters.decode(await tx.get(KEY_COUNTERS))
        if wanted:
            counters.next_node_id = max(counters.next_node_id, wanted + 1)
            nid = wanted
        else:
            nid = counters.next_node_id
            counters.next_node_id += 1
        tx.set(KEY_COUNTERS, counters.encode())
        return nid

    return await store.transact(fn)


async def serve(
    cfg: MgmtdConfig,
    stop: asyncio.Event,
    ready_file: str | None,
    shared_store: KVStore | None = None,
) -> None:
    """Run mgmtd until ``stop`` is set. ``shared_store`` (tests: several mgmtds
    in one process on one memory store) is used instead of opening the URL."""
    url = cfg.store_url()
    if shared_store is not None:
        store = shared_store
    else:
        if url.startswith("rocksdb://"):
            os.makedirs(url[len("rocksdb://") :], exist_ok=True)
        store = kv.open(url)
    stop_tasks: Callable[[], Awaitable[None]] | None = None
    srv: grpc.aio.Server | None = None
    framed: DataServer | None = None
    svc: Mgmtd | None = None
    web: MgmtdWeb | None = None
    try:
        users = UserStore(store, cfg.max_users)
        auth = await _authenticator(cfg, users)
        srv, port, framed = await _listen(cfg, auth)
        address = cfg.advertise_address or f"{cfg.listen_host}:{port}"
        self_id = await _allocate_self_id(store, cfg.node_id)
        exclusive = shared_store is None and url.split("://", 1)[0] in ("rocksdb", "memory")
        svc = Mgmtd(cfg, store, self_id, address, url, exclusive)
        mg.add_MgmtServicer_to_server(svc, srv)
        if framed is not None:
            handler = framed_handler(svc, authenticated=auth is not None)
            if auth is not None:
                handler = users.revocation_guard(
                    handler, cfg.user_recheck_interval_ms / 1000, cfg.user_recheck_entries
                )
            framed.handler = handler
        await srv.start()
        lease_keeper = LeaseKeeper(svc)
        sampler = ThroughputSampler(svc, cfg)
        stop_tasks = start_all([lease_keeper, HeartbeatChecker(svc), sampler])
        web = await start_web(cfg, svc, sampler)
        async with asyncio.timeout(max(10.0, cfg.lease_ms / 1000.0 * 3)):
            await lease_keeper.first_round.wait()
        write_ready_file(
            ready_file,
            {
                "rpc_address": address,
                "frame_address": framed.address if framed is not None else "",
                "node_id": self_id,
                "primary": svc.election.is_primary(),
                "kv_url": redact_url(url),
                **web.ready_info(),
            },
        )
        log.info(
            "mgmtd %d serving at %s (kv %s, %s)",
            self_id,
            address,
            redact_url(url),
            "primary" if svc.election.is_primary() else "standby",
        )
        await stop.wait()
        log.info("stopping")
    finally:
        if svc is not None:
            svc.stop_serving()
        if stop_tasks is not None:
            await stop_tasks()
        if web is not None:
            await web.stop()
        if svc is not None:
            try:
                await asyncio.wait_for(svc.election.release(), 2.0)
            except Exception as e:
                log.warning("could not release the primary lease: %s", e)
        if framed is not None:
            await framed.stop()
        if srv is not None:
            await srv.stop(grace=0.5)
        if shared_store is None:
            await store.close()


async def _authenticator(cfg: MgmtdConfig, users: UserStore) -> Authenticator | None:
    """With a cluster secret: the authenticator of both transports (users from
    this mgmtd's store), after creating user "admin" on a cluster's first start."""
    if not cfg.cluster_secret_file:
        log.warning("no cluster_secret_file: every caller is trusted (no authentication)")
        return None
    secret = load_secret(cfg.cluster_secret_file)
    await users.bootstrap_admin(cfg.admin_token_path())
    return Authenticator(secret, users)


async def _listen(
    cfg: MgmtdConfig, auth: Authenticator | None
) -> tuple[grpc.aio.Server, int, DataServer | None]:
    """Bind the gRPC port and the framed one at port + 1 (the rule clients use);
    an ephemeral pair whose second port is taken is tried again elsewhere."""
    attempts = _EPHEMERAL_BIND_ATTEMPTS if cfg.port == 0 else 1
    for attempt in range(1, attempts + 1):
        srv = grpc_util.server(cfg.grpc, auth)
        port = grpc_util.bind(srv, cfg.listen_host, cfg.port)
        if not cfg.frame_enabled:
            return srv, port, None
        framed = DataServer(
            _starting, cfg.listen_host, port + mgmt_wire.FRAME_PORT_OFFSET, authenticator=auth
        )
        try:
            await framed.start()
        except OSError as e:
            await srv.stop(None)
            if e.errno != errno.EADDRINUSE or attempt == attempts:
                raise
            continue
        return srv, port, framed
    raise AssertionError("unreachable: the last attempt returns or raises")


async def _starting(req: Request) -> Response:
    """Framed requests that arrive before the service exists (between bind and start)."""
    raise ChainfsError(Code.UNAVAILABLE, "mgmtd is starting")


def main(config_path: str | None, ready_file: str | None) -> int:
    cfg = config_mod.load(MgmtdConfig, config_path)
    tls.configure_process(cfg.tls)
    chainfs_logging.setup(f"mgmtd@{socket.gethostname()}", cfg.log_level)
    # Admin calls leave an audit line whatever the log level.
    logging.getLogger("chainfs.audit").setLevel(logging.INFO)

    async def run(stop: asyncio.Event) -> None:
        await serve(cfg, stop, ready_file)

    return run_service(run)


__all__ = ["Mgmtd", "MgmtdConfig", "main", "serve"]
