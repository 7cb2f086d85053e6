"""Data-plane tests run on uvloop (production) and, where cheap, plain asyncio (fallback)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    del config, item
    factories: dict[str, Any] = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return factories
