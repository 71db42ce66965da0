"""The base handler of both APIs: auth resource, JSON bodies, errors, engine calls off the loop."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from mlx_jupyter.engine.errors import MLXError
from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.server.metrics import REQUESTS

AUTH_RESOURCE = "mlx"

T = TypeVar("T")

# Engine error code -> HTTP status.
HTTP_STATUS = {
    "invalid_request": 400,
    "invalid_model": 400,
    "context_length_exceeded": 400,
    "memory_limit_exceeded": 400,
    "model_not_found": 404,
    "model_load_failed": 500,
    "all_models_busy": 503,
    "shutting_down": 503,
    "model_unloaded": 503,
    "worker_crashed": 502,
    "worker_timeout": 504,
}
RETRY_AFTER_S = 5


def error_type(status: int) -> str:
    """The OpenAI-style ``type`` of an error with this HTTP status."""
    if status in (401, 403):
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 503:
        return "overloaded_error"
    return "invalid_request_error" if status < 500 else "server_error"


class APIError(web.HTTPError):
    """An error answered as ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, log_message=message)
        self.message = message
        self.code = code

    @classmethod
    def from_engine(cls, exc: MLXError) -> APIError:
        return cls(HTTP_STATUS.get(exc.code, 500), str(exc), exc.code)


def error_body(error: APIError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error_type(error.status_code), "code": error.code}}


class MLXHandler(ExtensionHandlerMixin, APIHandler):
    """Handlers of ``/mlx/...``: thin, one call into the engine, JSON in and out."""

    auth_resource = AUTH_RESOURCE
    endpoint = ""  # the route's name in metrics

    @property
    def manager(self) -> WorkerManager:
        return self.settings["mlx_manager"]

    @property
    def limits(self) -> dict[str, int]:
        return self.settings["mlx_limits"]

    async def call(self, fn: Callable[..., T], *args: Any, status: bool = False, **kwargs: Any) -> T:
        """Run an engine call on a pool thread; engine errors become API errors."""
        executor: Executor = self.settings["mlx_status_executor" if status else "mlx_executor"]
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or a 4xx saying what is wrong with it."""
        body = self.request.body
        if len(body) > self.limits["max_body_bytes"]:
            limit = self.limits["max_body_bytes"]
            raise APIError(413, f"request body is {len(body)} bytes; the limit is {limit}", "body_too_large")
        try:
            data = json.loads(body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", "invalid_json")
        return data

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, APIError):
            reason = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else self._reason
            exc = APIError(status_code, reason, "forbidden" if status_code == 403 else f"http_{status_code}")
        if exc.code == "all_models_busy":
            self.set_header("Retry-After", str(RETRY_AFTER_S))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error_body(exc)))

    def on_finish(self) -> None:
        REQUESTS.labels(self.endpoint or self.request.path, str(self.get_status())).inc()
