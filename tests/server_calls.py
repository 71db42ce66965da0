"""Calls to the in-process Jupyter server (pytest-jupyter's ``jp_fetch``) and checks of their answers."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mlx_jupyter import sse
from mlx_jupyter.engine.errors import DETAILS
from mlx_jupyter.engine.manager import WorkerManager
from tests.helpers import wait_for

VALID = {"prompt": "Beautiful is", "max_tokens": 4}
# An error body: message, type and code, then a hint and the error's data where they apply.
ERROR_FIELDS = {"message", "type", "code", "hint", *DETAILS}


async def post(jp_fetch, path: str, body: Any, **kwargs: Any):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await jp_fetch(path, method="POST", body=data, raise_error=False, **kwargs)


async def get(jp_fetch, path: str):
    return await jp_fetch(path, method="GET", raise_error=False)


def ok_json(response) -> Any:
    got = response.code
    assert got == 200, f"HTTP {got}: {response.body[:300]!r}"
    return json.loads(response.body)


def assert_error(response, status: int, code: str, *words: str) -> dict:
    """An error response: this status, the ``{"error": {message, type, code}}`` body, these words."""
    got = response.code
    assert got == status, f"HTTP {got}, expected {status}: {response.body[:300]!r}"
    assert response.headers["Content-Type"].startswith("application/json")
    error = json.loads(response.body)["error"]
    assert {"message", "type", "code"} <= set(error) <= ERROR_FIELDS, error
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], (word, error)
    return error


async def assert_still_serves(jp_fetch, manager: WorkerManager) -> None:
    """A valid generate answers, and no request is left holding a lease."""
    answer = ok_json(await post(jp_fetch, "mlx/api/generate", VALID))
    assert answer["text"] and answer["finish_reason"] in ("length", "stop")
    assert wait_for(lambda: manager.health()["active_requests"] == 0, timeout=5), manager.health()


async def check_bad_requests(jp_fetch, manager: WorkerManager, cases: list[tuple]) -> None:
    """Each case gets its error, and after each a valid generate is still answered.

    One server for all cases (a model load costs seconds); every case runs even when an
    earlier one fails, and the failure lists each failing case by name.
    """
    failures = []
    for case, path, body, status, code, words in cases:
        try:
            assert_error(await post(jp_fetch, path, body), status, code, *words)
            await assert_still_serves(jp_fetch, manager)
        except AssertionError as exc:
            failures.append(f"[{case}] POST {path}: {exc}")
    assert not failures, f"{len(failures)} of {len(cases)} bad requests:\n" + "\n".join(failures)


async def scrape(jp_fetch) -> dict[tuple[str, tuple], float]:
    """Jupyter's /metrics as {(sample name, sorted labels): value}."""
    text = (await jp_fetch("metrics", method="GET")).body.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sse_events(body: bytes) -> list[dict]:
    """The JSON payloads of a Server-Sent Events body made only of unnamed events."""
    parsed = sse.parse(body)
    assert all(e.event == "message" for e in parsed), parsed
    return [e.json() for e in parsed]
