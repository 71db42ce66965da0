"""The kernel's model client: a Jupyter server's REST API, or a WorkerManager hosted in the kernel."""

from __future__ import annotations

import atexit
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_jupyter.discovery import ENV_TOKEN, ENV_URL
from mlx_jupyter.engine import EngineSettings, MLXError, WorkerManager

log = logging.getLogger(__name__)

# Health never waits behind a generation, so a slower answer means trouble. Discovery
# probes with it too: a server that is not there refuses at once, so this bounds only one
# that accepts and stalls; shorter, and a busy machine silently gets a second, local engine.
HEALTH_TIMEOUT_S = 10.0
# The server is on this machine (or named explicitly): proxy settings in the environment
# are for the outside world and must not reroute the kernel's calls.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClientError(Exception):
    """A request the kernel client could not complete; ``str(e)`` is one line for the user.

    Args:
        message: what was asked, what is wrong and what to do.
        code: the engine's or API's machine-readable code (``model_not_found``, ...).
        status: the HTTP status, when a server answered.
    """

    def __init__(self, message: str, code: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of a traceback: one red line."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class ServerUnreachableError(ClientError):
    """No connection to the Jupyter server (stopped, wrong URL, network)."""


class AuthError(ClientError):
    """The server refused the credential (401 or 403)."""


class UnknownModelError(ClientError):
    """No loadable model has the requested id."""


class MLXClient(ABC):
    """What the magics and widgets need from a model host; every method may raise ClientError.

    ``host`` says in words who serves this kernel. Methods return plain dicts shaped like
    the REST API's answers, whichever host is behind them.
    """

    host: str

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """As ``GET mlx/api/health``."""

    @abstractmethod
    def models(self) -> dict[str, Any]:
        """As ``GET mlx/api/models``: ``{"server_time", "models": [status dicts]}``."""

    @abstractmethod
    def available(self) -> list[dict[str, Any]]:
        """As ``GET mlx/api/models/available``."""

    @abstractmethod
    def load(self, model: str, keep_alive: str | float | None = None) -> dict[str, Any]:
        """Load ``model`` (or find it loaded); its status once ready."""

    @abstractmethod
    def unload(self, model: str) -> dict[str, Any]:
        """Unload ``model`` once its in-flight requests have drained; its last status."""

    @abstractmethod
    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream an answer as ``{"text"}`` dicts, the last with ``finish_reason``, ``usage``, ``timings``.

        ``request`` has the fields of ``POST mlx/api/generate`` (``stream`` is implied).
        Closing the iterator early cancels the generation at its source.
        """

    @abstractmethod
    def close(self) -> None:
        """Release what the client holds (a local engine stops its workers)."""

    @property
    def is_local(self) -> bool:
        return False


# -- a Jupyter server's REST API -------------------------------------------------


class ServerClient(MLXClient):
    """Talks to ``<url>mlx/api/...`` with the Jupyter token; standard library only.

    Every call opens its own connection, so a stream and a status call from another
    thread (a widget's poll) never share one. Closing a stream closes its socket, which
    the server takes as the client leaving and cancels the worker-side generation.
    """

    def __init__(self, url: str, token: str = "", timeout: float = 600.0) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token
        self.timeout = timeout
        self.host = f"Jupyter server at {self.url}"

    def health(self) -> dict[str, Any]:
        return self._call("GET", "mlx/api/health", timeout=HEALTH_TIMEOUT_S)

    def models(self) -> dict[str, Any]:
        return self._call("GET", "mlx/api/models")

    def available(self) -> list[dict[str, Any]]:
        return self._call("GET", "mlx/api/models/available")

    def load(self, model: str, keep_alive: str | float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        return self._call("POST", "mlx/api/models/load", body)

    def unload(self, model: str) -> dict[str, Any]:
        return self._call("POST", "mlx/api/models/unload", {"model": model})

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        # A generator from the start: nothing is opened until the first next(), and a
        # close() at any point after that closes the connection.
        response = self._open("POST", "mlx/api/generate", {**request, "stream": True}, self.timeout)
        yield from self._events(response)

    def close(self) -> None:
        """Nothing is held between calls."""

    def _events(self, response: Any) -> Iterator[dict[str, Any]]:
        """The ``data:`` objects of a Server-Sent Events response; an ``error`` event raises."""
        try:
            event, data = "message", []
            while True:
                line = response.readline()
                if not line:
                    raise ServerUnreachableError(
                        f"the {self.host} closed the stream before the answer ended; is it still running?",
                        "connection_lost",
                    )
                line = line.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    data.append(line[len("data:") :].lstrip(" "))
                elif not line:  # an event ends; one without data is skipped (SSE spec)
                    if data:
                        payload = json.loads("\n".join(data))
                        if event == "error":
                            raise _error_from_body(payload, None)
                        yield payload
                        if payload.get("done") or payload.get("finish_reason"):
                            return
                    event, data = "message", []
        except (OSError, http.client.HTTPException) as exc:
            raise ServerUnreachableError(f"lost the connection to the {self.host}: {exc}", "connection_lost") from None
        except (ValueError, AttributeError) as exc:  # not UTF-8, not JSON, or not an object
            raise ClientError(f"unreadable event from the {self.host}: {exc}", "bad_response") from None
        finally:
            response.close()  # an early close drops the connection: the server cancels the generation

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        with self._open(method, path, body, timeout or self.timeout) as response:
            try:
                return json.loads(response.read())
            except (OSError, ValueError) as exc:
                raise ClientError(f"{method} {path}: unreadable answer from the {self.host}: {exc}") from None

    def _open(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return _OPENER.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                raise _error_from_response(exc, self.host) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnreachableError(
                f"cannot reach the {self.host} ({reason}); is it running? Restart the kernel to look again",
                "unreachable",
            ) from None


def _error_from_response(exc: urllib.error.HTTPError, host: str) -> ClientError:
    try:
        payload = json.loads(exc.read() or b"null")
    except (OSError, ValueError):
        payload = None
    if exc.code in (401, 403):
        detail = _message(payload) or exc.reason
        return AuthError(
            f"the {host} refused this kernel's credential ({exc.code}: {detail}); "
            f"set {ENV_TOKEN} or %config MLXMagics.token",
            "unauthorized",
            exc.code,
        )
    if _message(payload) is None:
        return ClientError(f"the {host} answered {exc.code} {exc.reason}", f"http_{exc.code}", exc.code)
    return _error_from_body(payload, exc.code)


def _message(payload: Any) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload["error"].get("message")
    return None


def _error_from_body(payload: Any, status: int | None) -> ClientError:
    """``{"error": {"message", "type", "code"}}`` as the fitting ClientError."""
    error = payload.get("error", {}) if isinstance(payload, dict) else {}
    message = error.get("message") or "the server reported an error"
    code = error.get("code") or "error"
    cls = UnknownModelError if code == "model_not_found" else ClientError
    return cls(message, code, status)


# -- an engine hosted in the kernel ------------------------------------------------

# What an empty MLXMagics.default_model gives a kernel-hosted engine: the engine's own default.
ENGINE_DEFAULT_MODEL: str = EngineSettings.default_model.default_value


class LocalClient(MLXClient):
    """Hosts a WorkerManager (and so its idle reaper) in this kernel; it stops at kernel exit.

    The engine is created on first use, so loading the magics starts nothing; worker
    processes start only when a model is asked for. ``reconfigure`` applies changed settings
    to a running engine, which reads them at its next decision.
    """

    host = "this kernel (local engine)"

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})
        self._manager: WorkerManager | None = None
        self._lock = threading.Lock()  # guards the lazy start only; never held across engine calls
        atexit.register(self.close)

    @property
    def is_local(self) -> bool:
        return True

    @property
    def manager(self) -> WorkerManager:
        with self._lock:
            if self._manager is None:
                self._manager = WorkerManager(**self.settings)
            return self._manager

    def reconfigure(self, **settings: Any) -> None:
        """Apply new settings; a running engine takes them for its next decision."""
        self.settings.update(settings)
        manager = self._manager
        if manager is not None:
            for name, value in settings.items():
                setattr(manager.settings, name, value)  # the manager observes what needs more than a read

    def health(self) -> dict[str, Any]:
        return self._engine(self.manager.health)

    def models(self) -> dict[str, Any]:
        statuses = self._engine(self.manager.status)
        return {"server_time": time.time(), "models": [s.to_dict() for s in statuses]}

    def available(self) -> list[dict[str, Any]]:
        specs = self._engine(self.manager.resolver.available)
        return [s.to_dict() for s in specs]

    def load(self, model: str, keep_alive: str | float | None = None) -> dict[str, Any]:
        return self._engine(self.manager.load, model, keep_alive).to_dict()

    def unload(self, model: str) -> dict[str, Any]:
        return self._engine(self.manager.unload, model).to_dict()

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        request = {k: v for k, v in request.items() if k != "stream"}
        manager = self.manager
        chunks = self._engine(manager.stream_generate, **request)
        return self._chunks(chunks, request.get("model") or manager.default_model)

    def close(self) -> None:
        atexit.unregister(self.close)
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.shutdown()

    def _chunks(self, chunks: Iterator[Any], model: str) -> Iterator[dict[str, Any]]:
        try:
            for chunk in chunks:
                if chunk.finish_reason is None:
                    yield {"text": chunk.text}
                else:
                    yield chunk.final_event(model)
        except MLXError as exc:
            raise _from_engine(exc) from None
        finally:
            chunks.close()  # cancels the worker-side generation when we leave early

    @staticmethod
    def _engine(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MLXError as exc:
            raise _from_engine(exc) from None


def _from_engine(exc: Exception) -> ClientError:
    code = getattr(exc, "code", "error")
    cls = UnknownModelError if code == "model_not_found" else ClientError
    return cls(str(exc), code)


# -- discovery ----------------------------------------------------------------------


@dataclass
class Discovery:
    """How ``get_client`` finds its host; the magics set it from their traits.

    Args:
        server: ``"auto"`` (the environment, then the runtime file, else local),
            ``"local"`` (always a kernel-hosted engine) or a server URL.
        token: the Jupyter token for an explicit URL (default: ``MLX_JUPYTER_TOKEN``).
        timeout: seconds a server request (a whole stream's gaps included) may take.
        local: settings of a kernel-hosted engine.
    """

    server: str = "auto"
    token: str = field(default="", repr=False)  # a repr may end up in a shared notebook's output
    timeout: float = 600.0
    local: dict[str, Any] = field(default_factory=dict)


discovery = Discovery()
_client: MLXClient | None = None
_client_lock = threading.Lock()


def get_client() -> MLXClient:
    """The kernel's shared client, found once (see ``Discovery``) and cached."""
    global _client
    client = _client
    if client is not None:
        return client
    found: MLXClient | None = _discover(discovery)  # network probes: outside the lock
    with _client_lock:
        if _client is None:
            _client, found = found, None
            log.info("mlx_jupyter: models served by %s", _client.host)
        client = _client
    if found is not None:  # another thread was quicker
        found.close()
    return client


def reset_client() -> None:
    """Forget the cached client (closing it), so the next ``get_client`` looks again."""
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.close()


def current_client() -> MLXClient | None:
    """The cached client, without discovering one."""
    return _client


def server_candidates(config: Discovery) -> list[tuple[str, str]]:
    """``(url, token)`` pairs to probe, in order."""
    if config.server == "local":
        return []
    if config.server not in ("", "auto"):
        return [(config.server, config.token or os.environ.get(ENV_TOKEN, ""))]
    found = []
    if os.environ.get(ENV_URL):
        found.append((os.environ[ENV_URL], os.environ.get(ENV_TOKEN, "")))
    info = runtime_file_server()
    if info is not None:
        found.append(info)
    return found


def runtime_file_server() -> tuple[str, str] | None:
    """The URL and token in ``jpserver-<JPY_PARENT_PID>.json``, if the parent is a Jupyter server."""
    pid = os.environ.get("JPY_PARENT_PID", "")
    if not pid.isdigit():
        return None
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        info = json.loads((Path(jupyter_runtime_dir()) / f"jpserver-{pid}.json").read_text())
    except (OSError, ValueError, ImportError):
        return None
    url = info.get("url") or ""
    if not url:
        return None
    base = info.get("base_url") or "/"
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, base, "", "")), info.get("token") or ""


def _discover(config: Discovery) -> MLXClient:
    for url, token in server_candidates(config):
        client = ServerClient(url, token, config.timeout)
        try:
            client.health()
        except AuthError:
            return client  # the extension is there; its errors say what to fix
        except ClientError as exc:
            if config.server not in ("", "auto"):
                raise  # an explicit URL is never replaced by a local engine
            log.info("mlx_jupyter: %s is not usable (%s)", client.host, exc)
            continue
        return client
    return LocalClient(config.local)


def _server_client() -> ServerClient:
    client = get_client()
    if not isinstance(client, ServerClient):
        raise ClientError(
            "the OpenAI-compatible API needs a Jupyter server with mlx_jupyter; this kernel runs a local engine",
            "no_server",
        )
    return client


def openai_base_url() -> str:
    """``<server>/mlx/v1`` of the server serving this kernel (needs a server, not a local engine)."""
    return _server_client().url + "mlx/v1"


def openai_api_key() -> str:
    """The credential for ``openai_base_url()``: the Jupyter token (the client insists on a non-empty key)."""
    return _server_client().token or "unused"
