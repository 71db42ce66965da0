"""Clients that wait and clients that leave: the request pool's bound, and disconnects as cancels."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jupyter_server.utils import url_path_join

from mlx_jupyter.server.app import MLXExtension
from tests.helpers import eventually
from tests.models import LONG, TINY, TINY_A, TINY_B
from tests.server_calls import VALID, assert_error, assert_still_serves, get, ok_json, post, scrape

# Greedy on "x" never meets the end token: a stream that lasts as long as a test holds it.
ENDLESS = {"prompt": "x", "max_tokens": LONG, "temperature": 0, "stream": True}
LONG_ANSWERS = {"max_tokens_limit": LONG}
TWO_THREADS = LONG_ANSWERS | {"request_threads": 2, "queue_timeout": 1}


class RawClient:
    """One HTTP/1.1 request on a socket of its own, so that a test decides when the client leaves."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def post(cls, port: int, url: str, body: dict[str, Any], headers: dict[str, str]) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = json.dumps(body).encode()
        lines = [f"POST {url} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(data)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        await writer.drain()
        return cls(reader, writer)

    async def first_event(self) -> bytes:
        """Read up to the end of the first Server-Sent Event: the stream is under way."""
        head = await asyncio.wait_for(self.reader.readuntil(b"data: "), 60)
        return head + await asyncio.wait_for(self.reader.readuntil(b"\n\n"), 60)

    async def leave(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
def raw(jp_http_port, jp_base_url, jp_auth_header):
    """Open a raw POST to one of our paths with the test server's token."""

    async def open_post(path: str, body: dict[str, Any]) -> RawClient:
        return await RawClient.post(jp_http_port, url_path_join(jp_base_url, path), body, dict(jp_auth_header))

    return open_post


@contextlib.asynccontextmanager
async def held_streams(raw, count: int, model: str = TINY) -> AsyncIterator[list[RawClient]]:
    """``count`` endless streams under way, each holding a request thread until the block ends."""
    clients = [await raw("mlx/api/generate", ENDLESS | {"model": model}) for _ in range(count)]
    try:
        for client in clients:
            assert b"data: " in await client.first_event()
        yield clients
    finally:
        for client in clients:
            await client.leave()


def request_count(metrics: dict, endpoint: str, status: str) -> float:
    return metrics.get(("mlx_requests_total", (("endpoint", endpoint), ("status", status))), 0)


# -- the request pool ------------------------------------------------------------


@pytest.mark.parametrize("mlx_config", [TWO_THREADS], indirect=True, ids=["two_threads"])
async def test_a_full_request_pool_answers_503_with_retry_after_within_queue_timeout(
    jp_fetch, raw, manager, extension: MLXExtension
):
    requests = [
        ("mlx/api/models/load", {"model": TINY_A}),
        ("mlx/api/models/unload", {"model": TINY}),
        ("mlx/api/generate", VALID),
        ("mlx/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("mlx/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ]
    async with held_streams(raw, 2):
        for path, body in requests:
            # Far longer than queue_timeout: without a bound it would wait for a held stream to end.
            response = await post(jp_fetch, path, body, request_timeout=30)
            error = assert_error(response, 503, "server_busy", "request_threads", "queue_timeout")
            assert error["type"] == "overloaded_error"
            assert int(response.headers["Retry-After"]) > 0, path
        # Status calls have threads of their own.
        assert ok_json(await get(jp_fetch, "mlx/api/health"))["active_requests"] == 2
        assert ok_json(await get(jp_fetch, "mlx/api/models"))["models"][0]["id"] == TINY
    assert [s.id for s in manager.status()] == [TINY], "no refused request may have loaded or unloaded a model"
    # The streams' threads come back once their pumps have closed the engine streams.
    assert await eventually(lambda: extension.pool.busy == 0, timeout=30), extension.pool.busy
    await assert_still_serves(jp_fetch, manager)


@pytest.mark.parametrize("mlx_config", [TWO_THREADS | {"queue_timeout": 60}], indirect=True, ids=["two_threads"])
async def test_a_request_whose_client_left_while_it_waited_for_a_thread_is_dropped_before_it_runs(
    jp_fetch, raw, manager, extension: MLXExtension
):
    async with held_streams(raw, 2):
        before = await scrape(jp_fetch)
        waiting = await raw("mlx/api/models/load", {"model": TINY_B})
        assert await eventually(lambda: extension.pool.waiting == 1, timeout=10), "the load never queued"
        await waiting.leave()
        # Dropped while both threads are still held: it can never run afterwards.
        assert await eventually(lambda: extension.pool.waiting == 0, timeout=10), "the load still waits"
        after = await scrape(jp_fetch)
        assert request_count(after, "api/models/load", "499") == request_count(before, "api/models/load", "499") + 1
    # The threads are free: a later request runs, and the dropped load did not.
    ok_json(await post(jp_fetch, "mlx/api/models/load", {"model": TINY_A}))
    assert sorted(s.id for s in manager.status()) == [TINY, TINY_A]
    assert manager.counters["loads"] == 2


# -- clients that leave ----------------------------------------------------------

LEAVES = {
    # The model still has to load: the client is gone long before the first token.
    "before_the_first_token": ("mlx/api/generate", ENDLESS | {"model": TINY_A}, False),
    "before_a_whole_answer": ("mlx/api/generate", ENDLESS | {"model": TINY_A, "stream": False}, False),
    "mid_stream": ("mlx/api/generate", ENDLESS, True),
    "mid_openai_stream": ("mlx/v1/chat/completions", ENDLESS | {"messages": [{"role": "user", "content": "x"}]}, True),
}


@pytest.mark.parametrize("mlx_config", [LONG_ANSWERS], indirect=True, ids=["long_answers"])
@pytest.mark.parametrize("case", list(LEAVES))
async def test_a_client_that_leaves_is_a_499_and_one_info_line_not_a_server_error(jp_fetch, raw, manager, caplog, case):
    path, body, read_first = LEAVES[case]
    if path.startswith("mlx/v1"):
        body = {k: v for k, v in body.items() if k != "prompt"}
    endpoint = path.removeprefix("mlx/")
    model = body.get("model", TINY)
    before = await scrape(jp_fetch)

    def finished(metrics: dict) -> float:
        return sum(v - before.get(k, 0) for k, v in metrics.items() if k[0] == "mlx_requests_total")

    caplog.set_level(logging.INFO)
    client = await raw(path, body)
    if read_first:
        await client.first_event()
    await client.leave()
    metrics: dict = {}

    async def counted() -> bool:
        metrics.update(await scrape(jp_fetch))
        return finished(metrics) > 0

    for _ in range(600):
        if await counted():
            break
        await asyncio.sleep(0.05)
    assert request_count(metrics, endpoint, "500") == request_count(before, endpoint, "500"), "counted as a 500"
    assert request_count(metrics, endpoint, "499") == request_count(before, endpoint, "499") + 1, [
        (k, v) for k, v in metrics.items() if k[0] == "mlx_requests_total"
    ]
    assert await eventually(lambda: manager.health()["active_requests"] == 0, timeout=30), "the lease was kept"
    records = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not [r for r in records if r.exc_info or "Uncaught" in r.getMessage()], [r.getMessage() for r in records]
    left = [r for r in caplog.records if r.getMessage().startswith("client left before its answer")]
    assert len(left) == 1, [r.getMessage() for r in left]
    assert left[0].levelno == logging.INFO
    assert model in left[0].getMessage() and endpoint in left[0].getMessage()


@pytest.mark.parametrize("mlx_config", [LONG_ANSWERS], indirect=True, ids=["long_answers"])
async def test_a_client_that_leaves_while_its_answer_has_no_text_yet_is_cancelled_at_once(jp_fetch, raw, manager):
    # builtin:tiny answers "é" with byte tokens that never complete a character: 30,000
    # tokens (half a minute here) without one chunk of text until the very end.
    body = {"prompt": "é", "max_tokens": LONG, "temperature": 0, "stream": True}
    client = await raw("mlx/api/generate", body)
    assert await eventually(lambda: manager.health()["active_requests"] == 1, timeout=60)
    await client.leave()
    assert await eventually(lambda: manager.health()["active_requests"] == 0, timeout=10), (
        "the request kept its model after its client left"
    )
