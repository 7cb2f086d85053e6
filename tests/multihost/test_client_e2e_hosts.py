"""tests/integration/test_client_e2e.py's checks, against the cluster spread over hosts.

The client runs on this machine, one more host on the bridge: every byte
crosses the bridge to storage nodes on three other hosts. The checks are
imported, not copied; only their ``cluster`` fixture is this package's.
"""

from __future__ import annotations

import pytest

from chainfs.testing.hosts import MultiHostCluster
from tests.integration import test_client_e2e as e2e

pytestmark = pytest.mark.timeout(240)

fs = e2e.fs
files = e2e.files
globals().update({name: fn for name, fn in vars(e2e).items() if name.startswith("test_")})


@pytest.fixture(scope="module")
def cluster(hosts: MultiHostCluster) -> MultiHostCluster:
    return hosts
