"""Storage node process: ``main(config_path, ready_file)`` is what `chainfs serve
storage` runs. The node's state is :mod:`node`; the request handlers of both
planes are in :mod:`service`; the chunk state in :mod:`chunk_engine` (one per
target) and :mod:`craq`; settings in :mod:`config`.
"""

from __future__ import annotations

import asyncio
import gc
import logging

from chainfs.common import config as config_mod
from chainfs.common import tls
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.process import run_service, write_ready_file
from chainfs.storage_service.config import StorageConfig
from chainfs.storage_service.node import StorageNode
from chainfs.storage_service.service import StorageControlServicer, framed_handler

log = logging.getLogger(__name__)


def main(config_path: str | None, ready_file: str | None) -> int:
    config = config_mod.load(StorageConfig, config_path)
    tls.configure_process(config.tls)
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s storage %(levelname)s %(name)s: %(message)s",
    )
    if not config.targets:
        raise ChainfsError(Code.CONFIG_ERROR, f"{config_path}: no targets configured")
    if not config.mgmtd_addresses:
        raise ChainfsError(Code.CONFIG_ERROR, f"{config_path}: no mgmtd_addresses configured")

    async def serve(stop: asyncio.Event) -> None:
        node = StorageNode(config)
        try:
            await node.start(StorageControlServicer(node), framed_handler(node))
            # Startup objects (modules, protobuf descriptors, gRPC) never die:
            # keep the cyclic GC from rescanning them; the hot path makes few cycles.
            gc.freeze()
            write_ready_file(ready_file, node.ready_info())
            log.info(
                "storage node %d serving targets %s; rpc %s, data %s",
                node.node_id,
                sorted(node.targets),
                node.rpc_address,
                node.data_address,
            )
            await stop.wait()
        finally:
            await node.stop()

    return run_service(serve)
