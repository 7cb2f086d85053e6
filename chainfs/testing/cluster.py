"""Where LocalCluster lived before it moved to :mod:`chainfs.local`; imports keep working."""

from chainfs.local.cluster import DEFAULT_START_TIMEOUT_S, LocalCluster
from chainfs.local.process import MountProcess, ServiceProcess

__all__ = ["DEFAULT_START_TIMEOUT_S", "LocalCluster", "MountProcess", "ServiceProcess"]
