"""mgmtd's status page in a real headless browser (Debian's chromium and
chromedriver, driven by selenium) against a live LocalCluster: nodes and
targets appear, a killed storage node shows offline within the heartbeat
timeout, and the page logs no console errors."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chainfs.local import LocalCluster
from tests.conftest import require

pytestmark = pytest.mark.timeout(240)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HEARTBEAT_TIMEOUT_MS = 3000
# Offline shows once mgmtd's check notices (<= timeout + check interval) and the
# page refreshes (2 s); the rest is slack for two busy cores.
OFFLINE_WITHIN_S = HEARTBEAT_TIMEOUT_MS / 1000 + 15


def _browser() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        require("selenium", False, "pip install selenium (the dev extra)")
    require(
        "chromium",
        os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK),
        "apt-get install chromium chromium-driver (deploy/bootstrap.sh installs them)",
    )
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1500"):
        opts.add_argument(arg)
    opts.add_argument("--disable-dev-shm-usage")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()


def _wait(fn: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)


def _rows(driver: Any, table: str) -> list[dict[str, str]]:
    """The data-* attributes of a table's rows, read in one go (the page
    replaces its rows at every refresh, so element handles go stale)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(r => ({...r.dataset}))"
    rows: list[dict[str, str]] = driver.execute_script(script, f"#{table} tbody tr")
    return rows


def _node_status(driver: Any) -> dict[str, str]:
    return {r["nodeId"]: r["status"] for r in _rows(driver, "nodes")}


def _console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_status_page_live(tmp_path: Path, browser: Any) -> None:
    with LocalCluster(
        tmp_path / "cluster",
        storage_nodes=3,
        targets_per_node=2,
        heartbeat_interval_ms=300,
        heartbeat_timeout_ms=HEARTBEAT_TIMEOUT_MS,
    ) as c:
        assert c.status_url
        fs = c.client()
        with fs.open("/traffic.bin", "wb") as f:
            f.write(os.urandom(4 << 20))
        browser.get(c.status_url)
        _wait(lambda: browser.find_elements("css selector", "body[data-loaded]"), 30, "first load")
        routing = fs_routing(c)
        storage_ids = {str(n["node_id"]) for n in routing["nodes"] if n["type"] == "storage"}
        nodes = _wait(lambda: _node_status(browser), 30, "nodes listed")
        assert storage_ids <= set(nodes) and all(nodes[i] == "online" for i in storage_ids)
        targets = _rows(browser, "targets")
        assert len(targets) == 6 and {t["state"] for t in targets} == {"serving"}
        assert len(_rows(browser, "chains")) == len(routing["chains"])

        killed = str(c.storage[2].info["node_id"])
        c.kill_storage(2)
        killed_at = time.monotonic()
        _wait(lambda: _node_status(browser).get(killed) == "offline", OFFLINE_WITHIN_S, "offline")
        assert time.monotonic() - killed_at < OFFLINE_WITHIN_S
        states = [r["state"] for r in _rows(browser, "targets")]
        assert states.count("offline") == 2
        _save_screenshot(browser)
        assert _console_errors(browser) == []


def fs_routing(c: LocalCluster) -> dict[str, Any]:
    """What the page's own JSON endpoint answers now."""
    with urllib.request.urlopen(c.status_url + "api/status", timeout=10) as rsp:
        data: dict[str, Any] = json.loads(rsp.read())
    return data


def _save_screenshot(driver: Any) -> None:
    """CHAINFS_SCREENSHOT=path keeps a picture of the page (docs/status-page.png)."""
    path = os.environ.get("CHAINFS_SCREENSHOT")
    if path:
        driver.save_screenshot(path)


def test_page_has_no_external_resources() -> None:
    from chainfs.mgmt_service.status_page import page_html

    html = page_html().decode()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    assert shutil.which  # the page is one file: nothing else to fetch
