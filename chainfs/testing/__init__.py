"""Test helpers: network namespaces (netns); the seeded metadata load is chainfs.bench.metaload.

The local cluster runner is product code in :mod:`chainfs.local`; it is
re-exported here so that ``from chainfs.testing import LocalCluster`` works.
"""

from chainfs.local import LocalCluster

__all__ = ["LocalCluster"]
