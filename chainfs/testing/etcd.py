"""Where EtcdCluster lived before it moved to :mod:`chainfs.local.etcd` (`chainfs up --kv etcd`)."""

from chainfs.local.etcd import EtcdCluster, EtcdMember

__all__ = ["EtcdCluster", "EtcdMember"]
