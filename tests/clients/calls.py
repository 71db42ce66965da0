"""Run named client calls and write what each returned, or raised, as JSON: shared by the client drivers.

The drivers run in .venv-clients (scripts/setup_clients.sh), never in the project's venv:
``python tests/clients/<driver>.py CONFIG_JSON OUT_PATH``. CONFIG_JSON holds the server's
``base_url`` (ending in ``mlx/v1``), ``api_key``, ``model`` and what a driver's requests need;
tests/test_clients.py reads OUT_PATH and asserts on it. A call that raises is recorded, not
fatal, so that one broken call leaves the others' results to judge.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

Call = Callable[[], Any]


def config() -> dict[str, Any]:
    return json.loads(sys.argv[1])


def jsonable(value: Any) -> Any:
    """Responses (pydantic models, LangChain messages, lists of stream chunks) as plain JSON values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def failure(exc: BaseException) -> dict[str, Any]:
    """An exception as the test sees it: its class, its HTTP status and error code if any, and where it came from."""
    return {
        "error": type(exc).__name__,
        "status": getattr(exc, "status_code", None),
        "code": getattr(exc, "code", None),
        "message": str(exc),
        "trace": traceback.format_exc(),
    }


def record(calls: dict[str, Call]) -> dict[str, Any]:
    results = {}
    for name, call in calls.items():
        try:
            results[name] = {"result": jsonable(call())}
        except Exception as exc:  # recorded for the test to report; the next call still runs
            results[name] = failure(exc)
    return results


async def record_async(calls: dict[str, Callable[[], Awaitable[Any]]]) -> dict[str, Any]:
    results = {}
    for name, call in calls.items():
        try:
            results[name] = {"result": jsonable(await call())}
        except Exception as exc:  # as in record()
            results[name] = failure(exc)
    return results


def write(results: dict[str, Any]) -> None:
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)
