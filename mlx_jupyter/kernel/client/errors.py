"""The kernel client's errors: one line for the user, with the code, status and data of the host's error."""

from __future__ import annotations

from typing import Any

from mlx_jupyter.engine.errors import DETAILS, ERRORS, ErrorDetails, MLXError, ModelNotFoundError, error_class


class ClientError(ErrorDetails, Exception):
    """A request the kernel client could not complete; ``str(e)`` is one line for the user.

    Args:
        message: what was asked, what is wrong and what to do.
        code: the engine's or API's machine-readable code (``model_not_found``, ...).
        status: the HTTP status: the server's answer, or for an engine in the kernel the one
            the REST API would give.
        details: the error's data, as the engine gave it (``model``, ``loaded``, ``param``,
            ``limit``, ``value``).
    """

    def __init__(self, message: str, code: str = "error", status: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self._set_details(details)

    def with_hint(self, hint: str) -> ClientError:
        """The same error, with ``hint`` added to its message."""
        return type(self)(f"{self}; {hint}", self.code, self.status, **self.details())

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of a traceback: one red line."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class ServerUnreachableError(ClientError):
    """No connection to the Jupyter server (stopped, wrong URL, network)."""


class AuthError(ClientError):
    """The server refused the credential (401 or 403)."""


class UnknownModelError(ClientError):
    """No loadable model has the requested id, or (with ``loaded``) no resident one."""


def client_error_class(code: str) -> type[ClientError]:
    """The ClientError subclass for an engine error code (the engine's code -> class table decides)."""
    return UnknownModelError if issubclass(error_class(code), ModelNotFoundError) else ClientError


def error_from_engine(exc: MLXError) -> ClientError:
    """The error an engine hosted in the kernel raised."""
    return client_error_class(exc.code)(str(exc), exc.code, exc.status, **exc.details())


def error_from_body(payload: Any, status: int | None) -> ClientError:
    """``{"error": {"message", "code", "hint"?, <data>...}}``, without the hint meant for REST clients.

    ``status`` is None for an error event in a stream: an engine error then gets the status
    the REST API gives it, as from an engine in the kernel.
    """
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code") or "error"
    if status is None and code in ERRORS:
        status = ERRORS[code].status
    message = error.get("message") or "the server reported an error"
    if error.get("hint"):  # the kernel's front end, the magics, gives its own
        message = message.removesuffix(f"; {error['hint']}")
    details = {name: error[name] for name in DETAILS if error.get(name) is not None}
    return client_error_class(code)(message, code, status, **details)
