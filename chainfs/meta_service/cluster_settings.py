"""Applies the cluster-wide settings kept by mgmtd (``chainfs admin config set``)
that meta reads: polled every ``cluster_config_poll_ms``; a key not set leaves
the value of this server's TOML file."""

from __future__ import annotations

import logging

from chainfs.common.background import Periodic
from chainfs.common.cluster_config import parse_setting
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.meta_service.config import MetaConfig

log = logging.getLogger(__name__)

PREFIX = "meta."  # keys meta applies: meta.<MetaConfig field>


class ClusterSettings(Periodic):
    name = "cluster-settings"

    def __init__(self, mgmt: MgmtClient, cfg: MetaConfig) -> None:
        super().__init__(cfg.cluster_config_poll_ms / 1000)
        self.mgmt = mgmt
        self.cfg = cfg
        self.version = 0  # config version last applied

    async def round(self) -> bool:
        rsp = await self.mgmt.get_config("")
        if rsp.version == self.version:
            return False
        for key, text in rsp.values.items():
            if not key.startswith(PREFIX):
                continue
            value = parse_setting(key, text)
            field = key[len(PREFIX) :]
            if getattr(self.cfg, field) != value:
                log.info("cluster config %s: %s -> %s", key, getattr(self.cfg, field), value)
                setattr(self.cfg, field, value)
        self.version = rsp.version
        return False
