"""chainfs.common.metrics: the /metrics HTTP server, request metrics, rates."""

from __future__ import annotations

import asyncio
import errno

import pytest
from prometheus_client.core import GaugeMetricFamily

from chainfs.common import metrics
from chainfs.common.errors import ChainfsError, Code


async def raw_request(address: str, data: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_serves_metrics_and_routes() -> None:
    page = metrics.HttpReply(b"<p>hi</p>", "text/html")
    server = await metrics.serve_metrics("127.0.0.1", 0, {"/page": lambda: page})
    assert server is not None
    try:
        body = await metrics.http_get(server.address, "/page?x=1", 5.0, 1024)
        assert body == b"<p>hi</p>"
        metrics.counter("chainfs_test_served", "test").inc()
        text = await metrics.http_get(server.address, "/metrics", 5.0, 1 << 20)
        assert b"chainfs_test_served_total 1.0" in text
        with pytest.raises(OSError, match="404"):
            await metrics.http_get(server.address, "/nothing", 5.0, 1024)
        with pytest.raises(OSError, match="larger than 4 bytes"):
            await metrics.http_get(server.address, "/page", 5.0, 4)
    finally:
        await server.stop()


async def test_refuses_what_it_does_not_serve() -> None:
    server = await metrics.serve_metrics("127.0.0.1", 0)
    assert server is not None
    try:
        post = await raw_request(server.address, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ")
        bad = await raw_request(server.address, b"GARBAGE\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ")
        head = await raw_request(server.address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        # A head longer than the bound is refused, and the server goes on.
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (2 * metrics.MAX_REQUEST_HEAD_BYTES)
        answer = await raw_request(server.address, huge + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        await metrics.http_get(server.address, "/metrics", 5.0, 1 << 20)
    finally:
        await server.stop()


async def test_port_minus_one_serves_nothing() -> None:
    assert await metrics.serve_metrics("127.0.0.1", -1) is None
    node = await metrics.NodeMetrics.start("127.0.0.1", -1)
    assert node.address == "" and node.tags() == {} and node.ready_info() == {}
    await node.stop()


def test_check_port() -> None:
    for good in (-1, 0, 9100, 65535):
        metrics.check_port("metrics_port", good)
    for bad in (-2, 65536):
        with pytest.raises(ValueError, match="metrics_port"):
            metrics.check_port("metrics_port", bad)


async def test_collector_reads_live_state_until_unregistered() -> None:
    state = {"depth": 3}

    def collect() -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("chainfs_test_queue_depth", "test", value=state["depth"])]

    node = await metrics.NodeMetrics.start("127.0.0.1", 0, collect)
    try:
        got = await metrics.scrape(node.address, 5.0)
        assert got[("chainfs_test_queue_depth", ())] == 3
        state["depth"] = 7
        got = await metrics.scrape(node.address, 5.0)
        assert got[("chainfs_test_queue_depth", ())] == 7
        assert node.tags() == {metrics.METRICS_ADDRESS: node.address}
    finally:
        address = node.address
        await node.stop()
    other = await metrics.NodeMetrics.start("127.0.0.1", 0)
    try:
        got = await metrics.scrape(other.address, 5.0)
        assert ("chainfs_test_queue_depth", ()) not in got
    finally:
        await other.stop()
    with pytest.raises(OSError):
        await metrics.scrape(address, 2.0)  # stopped: nothing listens there any more


async def test_request_metrics_count_latency_and_errors_by_code() -> None:
    rm = metrics.RequestMetrics("chainfs_test_request", "Test request")
    with rm.observe("get"):
        await asyncio.sleep(0)
    with pytest.raises(ChainfsError), rm.observe("get"):
        raise ChainfsError(Code.ENOENT, "gone")
    with pytest.raises(OSError), rm.observe("put"):
        raise OSError(errno.EACCES, "no")
    with pytest.raises(RuntimeError), rm.observe("put"):
        raise RuntimeError("bug")
    got = metrics.parse(metrics.metrics_reply().body.decode())
    assert metrics.total(got, "chainfs_test_request_seconds_count", op="get") == 2
    assert metrics.total(got, "chainfs_test_request_errors_total", op="get", code="ENOENT") == 1
    assert metrics.total(got, "chainfs_test_request_errors_total", op="put", code="EACCES") == 1
    assert metrics.total(got, "chainfs_test_request_errors_total", op="put", code="INTERNAL") == 1
    assert metrics.total(got, "chainfs_test_requests_in_flight") == 0


def test_rates_treat_a_restart_as_no_traffic() -> None:
    before = {"read_bytes": 1000.0, "write_bytes": 500.0}
    after = {"read_bytes": 3000.0, "write_bytes": 10.0}  # the writer restarted
    assert metrics.rates(before, after, 2.0) == {"read_bytes": 1000.0, "write_bytes": 0.0}
    samples = metrics.parse(
        'chainfs_storage_write_bytes_total{target="1",source="client"} 10\n'
        'chainfs_storage_write_bytes_total{target="2",source="chain"} 20\n'
        'chainfs_storage_write_bytes_total{target="3",source="client"} 5\n'
    )
    assert metrics.rate_totals(samples)["write_bytes"] == 15
