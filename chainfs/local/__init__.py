"""A chainfs cluster on this machine as real processes: `chainfs up`, tests and benches.

    from chainfs.local import LocalCluster
    with LocalCluster(base_dir) as cluster:
        fs = cluster.client()

``chainfs.local.process`` starts and stops single service processes,
``chainfs.local.etcd`` runs etcd members for ``kv="etcd"``.
"""

from chainfs.local.cluster import LocalCluster
from chainfs.local.process import MountProcess, ServiceProcess

__all__ = ["LocalCluster", "MountProcess", "ServiceProcess"]
