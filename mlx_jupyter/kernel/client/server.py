"""The client of a Jupyter server's REST API (``<url>mlx/api/...``), over httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
from httpx_sse import SSEError

from mlx_jupyter import sse
from mlx_jupyter.discovery import ENV_TOKEN
from mlx_jupyter.kernel.client.base import MLXClient
from mlx_jupyter.kernel.client.errors import AuthError, ClientError, ServerUnreachableError, error_from_body

# Health never waits behind a generation, so a slower answer means trouble. Discovery
# probes with it too: a server that is not there refuses at once, so this bounds only one
# that accepts and stalls; shorter, and a busy machine silently gets a second, local engine.
HEALTH_TIMEOUT_S = 10.0


class ServerClient(MLXClient):
    """Talks to ``<url>mlx/api/...`` with the Jupyter token.

    One httpx client, safe to share between threads: a stream holds its connection until
    it ends, so a status call from another thread (a widget's poll) takes another one.
    Closing a stream early closes its connection (httpx never reuses one whose answer was
    not read to the end), which the server takes as the client leaving: it cancels the
    worker-side generation.

    Args:
        url: the server's URL with its ``base_url``.
        token: the Jupyter token ('' for a server without one).
        timeout: seconds a call, or a pause in a stream, may take.
    """

    def __init__(self, url: str, token: str = "", timeout: float = 600.0) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token
        self.timeout = timeout
        self.host = f"Jupyter server at {self.url}"
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"token {token}"
        # The server is on this machine or named explicitly: proxy settings in the
        # environment are for the outside world and must not reroute the kernel's calls.
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

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
        # A generator from the start: nothing is sent until the first next(), and a close()
        # at any point after that leaves the `with`, which closes the connection.
        body = {**request, "stream": True}
        try:
            with self._http.stream("POST", "mlx/api/generate", json=body, headers={"Accept": "text/event-stream"}) as r:
                self._check(r)
                yield from self._payloads(r)
        except SSEError as exc:  # a transport error in httpx's hierarchy, but the connection is fine
            raise ClientError(f"unreadable answer from the {self.host}: {exc}", "bad_response") from None
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None

    def close(self) -> None:
        self._http.close()

    def _payloads(self, response: httpx.Response) -> Iterator[dict[str, Any]]:
        """The ``data:`` objects of the stream; an ``error`` event raises."""
        for event in sse.events(response):
            try:
                payload = json.loads(event.data)
            except ValueError as exc:
                raise self._unreadable(exc) from None
            if not isinstance(payload, dict):
                raise self._unreadable(f"not a JSON object: {event.data[:80]!r}")
            if event.event == "error":
                raise error_from_body(payload, None)
            yield payload
            if payload.get("done") or payload.get("finish_reason"):
                return
        raise ServerUnreachableError(
            f"the {self.host} closed the stream before the answer ended; is it still running?", "connection_lost"
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body, timeout=timeout or self.timeout)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        self._check(response)
        try:
            return response.json()
        except ValueError as exc:
            raise ClientError(f"{method} {path}: unreadable answer from the {self.host}: {exc}") from None

    def _check(self, response: httpx.Response) -> None:
        """Raise the ClientError an error status stands for (reading the body of a stream first)."""
        if response.is_success:
            return
        status = response.status_code
        response.read()
        try:
            payload = response.json()
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if status in (401, 403):
            raise AuthError(
                f"the {self.host} refused this kernel's credential ({status}: {message or response.reason_phrase}); "
                f"set {ENV_TOKEN} or %config MLXMagics.token",
                "unauthorized",
                status,
            )
        if message is None:
            raise ClientError(f"the {self.host} answered {status} {response.reason_phrase}", f"http_{status}", status)
        raise error_from_body(payload, status)

    def _unreadable(self, reason: object) -> ClientError:
        return ClientError(f"unreadable event from the {self.host}: {reason}", "bad_response")

    def _transport_error(self, exc: httpx.TransportError) -> ServerUnreachableError:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return ServerUnreachableError(
                f"cannot reach the {self.host} ({exc}); is it running? Restart the kernel to look again",
                "unreachable",
            )
        return ServerUnreachableError(f"lost the connection to the {self.host}: {exc}", "connection_lost")
