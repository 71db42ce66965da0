"""The base handler of both APIs: auth, JSON bodies, errors, engine calls off the loop, clients that leave."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from mlx_jupyter.engine.errors import ErrorDetails, MLXError, ModelNotFoundError
from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.server.metrics import REQUESTS

if TYPE_CHECKING:
    from mlx_jupyter.server.pool import RequestPool

AUTH_RESOURCE = "mlx"
# nginx's "client closed request": the client left before its answer was sent.
CLIENT_CLOSED = 499

T = TypeVar("T")

RETRY_AFTER_S = 5
# Errors after which the same request may succeed once the server has room again.
RETRY_LATER = {"all_models_busy", "server_busy"}
# What this API adds to a model_not_found error: where to look (the magics list the ids instead).
LOADED_HINT = "see GET mlx/api/models"
AVAILABLE_HINT = "list the loadable models with GET mlx/api/models/available"


def error_type(status: int) -> str:
    """The OpenAI-style ``type`` of an error with this HTTP status."""
    if status in (401, 403):
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 503:
        return "overloaded_error"
    return "invalid_request_error" if status < 500 else "server_error"


def route_hint(exc: MLXError) -> str | None:
    """Where this API's client finds what the error is about, from the error's data."""
    if isinstance(exc, ModelNotFoundError):
        return LOADED_HINT if exc.loaded is not None else AVAILABLE_HINT
    return None


class APIError(ErrorDetails, web.HTTPError):
    """An error answered as ``{"error": {"message", "type", "code", ...}}``.

    Args:
        status: the HTTP status.
        message: what is wrong; ``hint``, when given, is added to it and sent on its own too,
            so that a client with a hint of its own can leave this one out.
        code: the machine-readable cause.
        details: the error's data (``engine.errors.DETAILS``), sent as fields of the body.
    """

    def __init__(self, status: int, message: str, code: str, hint: str | None = None, **details: Any) -> None:
        message = f"{message}; {hint}" if hint else message
        # tornado logs log_message as a %-format: a '%' in a model id must stay text.
        super().__init__(status, log_message=message.replace("%", "%%"))
        self.message = message
        self.code = code
        self.hint = hint
        self._set_details(details)

    @classmethod
    def from_engine(cls, exc: MLXError) -> APIError:
        return cls(exc.status, str(exc), exc.code, route_hint(exc), **exc.details())


def error_body(error: APIError) -> dict[str, Any]:
    body = {"message": error.message, "type": error_type(error.status_code), "code": error.code}
    if error.hint:
        body["hint"] = error.hint
    return {"error": body | error.details()}


def _all_text_is_unicode(data: Any) -> bool:
    """No string in ``data`` holds a lone surrogate, which JSON's escapes allow and no tokenizer reads."""
    pending = [data]  # not recursive: bodies nest as deep as the parser allows
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending += [*item, *item.values()]
        elif isinstance(item, list):
            pending += item
    return True


class MLXHandler(ExtensionHandlerMixin, APIHandler):
    """Handlers of ``/mlx/...``: thin, one call into the engine, JSON in and out.

    Everything here runs on the event loop; engine calls go to a pool thread.
    """

    auth_resource = AUTH_RESOURCE
    endpoint = ""  # the route's name in metrics
    endless = False  # a stream that ends when its client leaves, as it should
    model: str | None = None  # the model a request is for, once known (for the log)

    @property
    def manager(self) -> WorkerManager:
        return self.settings["mlx_manager"]

    @property
    def limits(self) -> dict[str, int]:
        return self.settings["mlx_limits"]

    @functools.cached_property
    def client_left(self) -> asyncio.Event:
        """Set when the client closes its connection before the answer is finished."""
        return asyncio.Event()

    def client_has_left(self) -> bool:
        # The stream knows at once; the close callback that sets client_left runs a moment later.
        stream = getattr(self.request.connection, "stream", None)
        return self.client_left.is_set() or (stream is not None and stream.closed())

    async def admit(self) -> Executor:
        """A request thread for one engine call: 503 when none frees up, ClientLeft when the client went."""
        pool: RequestPool = self.settings["mlx_pool"]
        return await pool.admit(self.client_left)

    async def call(self, fn: Callable[..., T], *args: Any, status: bool = False, **kwargs: Any) -> T:
        """Run an engine call on a request thread (status calls: threads of their own); engine errors
        become API errors."""
        executor: Executor = self.settings["mlx_status_executor"] if status else await self.admit()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))
        except MLXError as exc:
            raise APIError.from_engine(exc) from exc

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or a 4xx saying what is wrong with it."""
        body = self.request.body
        if len(body) > self.limits["max_body_bytes"]:
            limit = self.limits["max_body_bytes"]
            message = f"request body is {len(body)} bytes; the limit is {limit}"
            raise APIError(413, message, "body_too_large", limit=limit, value=len(body))
        try:
            data = json.loads(body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
        except RecursionError:
            message = f"request body nests arrays or objects deeper than the parser allows ({sys.getrecursionlimit()})"
            raise APIError(400, message, "invalid_json") from None
        except ValueError:  # Python's bound on reading long integers
            digits = sys.get_int_max_str_digits()
            raise APIError(400, f"request body has an integer longer than {digits} digits", "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", "invalid_json")
        if not _all_text_is_unicode(data):
            message = "request body has a string that is not valid Unicode: a lone surrogate escape such as \\ud800"
            raise APIError(400, message, "invalid_json")
        return data

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, APIError):
            reason = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else self._reason
            exc = APIError(status_code, reason, "forbidden" if status_code == 403 else f"http_{status_code}")
        if exc.code in RETRY_LATER:
            self.set_header("Retry-After", str(RETRY_AFTER_S))
        if exc.status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="jupyter"')
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error_body(exc)))

    # -- authentication ----------------------------------------------------------

    def check_xsrf_cookie(self) -> None:
        """No valid credentials is a 401 before any XSRF check: XSRF only guards a logged-in browser."""
        # Jupyter calls this once more from prepare(), after it has looked the user up.
        if hasattr(self, "_jupyter_current_user") and self.current_user is None:
            self.refuse_credentials()
        super().check_xsrf_cookie()

    def get_login_url(self) -> str:
        """``@web.authenticated`` asks for a login page when no one is logged in: an API answers 401."""
        self.refuse_credentials()

    def refuse_credentials(self) -> NoReturn:
        authorization = self.request.headers.get("Authorization")
        if authorization or self.get_query_argument("token", None) is not None:
            where = "Authorization header" if authorization else "token argument"
            message = f"the token in the {where} is not this server's token"
        else:
            message = "the request has no credentials"
        raise APIError(
            401,
            f"{message}: send the Jupyter server's token as 'Authorization: token <token>' or "
            "'Authorization: Bearer <token>' (the api_key of an OpenAI client), or log in to Jupyter",
            "invalid_api_key",
        )

    # -- clients that leave --------------------------------------------------------

    def on_connection_close(self) -> None:
        self.client_left.set()
        super().on_connection_close()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if self.client_has_left():
            # Whatever broke once the client had gone broke because it had: not a server error.
            self.log.debug("%s ended after its client left", self.endpoint, exc_info=(typ, value, tb))
            return
        super().log_exception(typ, value, tb)

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        if self.client_has_left():
            self.finish()  # no one to tell
            return
        super().send_error(status_code, **kwargs)

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        if not self.endless and self.client_has_left():
            self.set_status(CLIENT_CLOSED, "Client Closed Request")
            # The extension's log, which Jupyter prints: module loggers have no handler there.
            self.log.info("client left before its answer: %s, model %s", self.endpoint, self.model or "none named")
        return super().finish(*args, **kwargs)

    def on_finish(self) -> None:
        REQUESTS.labels(self.endpoint or self.request.path, str(self.get_status())).inc()


class NotFoundHandler(MLXHandler):
    """Any other path under ``mlx/``: a JSON 404 in the API's error shape, after authentication."""

    endpoint = "unknown"  # one label for every unknown path, however many a client makes up
    _track_activity = False

    def not_found(self, *args: Any) -> None:
        path = self.request.path.removeprefix(self.base_url.rstrip("/"))
        raise APIError(
            404, f"no such path: {self.request.method} {path}; GET mlx/api/openapi.json lists them", "not_found"
        )

    get = post = put = patch = delete = web.authenticated(authorized(not_found))


# After every route of both APIs: the rest of mlx/ answers in JSON, not with Jupyter's HTML page.
NOT_FOUND_ROUTE = (r"/mlx(?:/.*)?", NotFoundHandler)
