"""The browser tests' fixtures: a JupyterLab server process with our extension, and Debian's chromium."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.browser import launch_chromium, start_lab
from tests.live_server import LiveServer


@pytest.fixture
def jp_asyncio_loop():
    """pytest-jupyter's loop fixture would close Playwright's running loop: give it its own."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def jp_server_cleanup():
    """No in-process ServerApp here to clean up (the server is a subprocess)."""
    yield


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[LiveServer]:
    yield from start_lab(tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()
