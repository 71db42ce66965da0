"""The engine's errors: each with a stable code, its HTTP status and its data, and the code -> class table."""

from __future__ import annotations

from typing import Any

# The data an error may carry besides its message; every front end renders its own hint from it.
DETAILS = ("model", "loaded", "param", "limit", "value")


class ErrorDetails:
    """The data of an error, shared by the engine's errors and the kernel client's.

    Args:
        model: the model id the error is about.
        loaded: the ids of the resident models, when the error is that ``model`` is not one of them.
        param: the request field at fault.
        limit: the bound that was passed.
        value: the value that passed it.
    """

    model: str | None = None
    loaded: list[str] | None = None
    param: str | None = None
    limit: float | None = None
    value: Any = None

    def _set_details(self, details: dict[str, Any]) -> None:
        unknown = set(details) - set(DETAILS)
        if unknown:
            raise TypeError(f"unknown error details {sorted(unknown)}; an error carries {', '.join(DETAILS)}")
        for name, value in details.items():
            setattr(self, name, value)

    def details(self) -> dict[str, Any]:
        """The data that is set, by name (JSON values)."""
        return {name: getattr(self, name) for name in DETAILS if getattr(self, name) is not None}


class MLXError(ErrorDetails, Exception):
    """Base class of every engine error.

    ``code`` is stable and machine readable (REST error bodies use it) and ``status`` is
    the HTTP status the REST API answers with. The message says what was asked, what is
    wrong and what to do, and names no REST route: each front end adds its own hint
    from the data (see ``ErrorDetails``).
    """

    code = "internal_error"
    status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self._set_details(details)


class InvalidRequestError(MLXError, ValueError):
    """A request whose parameters can never succeed (bad types, absurd values)."""

    code = "invalid_request"
    status = 400


class InvalidModelError(InvalidRequestError):
    """A model reference that is not allowed, such as a path or ``../``."""

    code = "invalid_model"


class PromptTooLongError(InvalidRequestError):
    """The prompt has more tokens than the model's context window."""

    code = "context_length_exceeded"


class PromptTooLargeError(InvalidRequestError):
    """The prompt has more characters than ``max_prompt_chars`` allows."""

    code = "prompt_too_long"


class ModelNotFoundError(MLXError, LookupError):
    """No loadable model has this id, or (with ``loaded``) no resident one."""

    code = "model_not_found"
    status = 404


class ModelLoadError(MLXError):
    """The model exists but could not be loaded; the message has the loader's reason."""

    code = "model_load_failed"


class MemoryLimitError(MLXError):
    """The model alone needs more memory than ``memory_limit`` allows."""

    code = "memory_limit_exceeded"
    status = 400


class AllModelsBusyError(MLXError):
    """No slot freed up in time: every resident model was busy."""

    code = "all_models_busy"
    status = 503


class WorkerCrashedError(MLXError):
    """The worker process serving the request exited."""

    code = "worker_crashed"
    status = 502


class WorkerTimeoutError(MLXError):
    """The worker produced no token within the deadline and was killed."""

    code = "worker_timeout"
    status = 504


class ManagerClosedError(MLXError):
    """The manager is shutting down or shut down."""

    code = "shutting_down"
    status = 503


class ModelUnloadedError(MLXError):
    """The model was unloaded (or its worker stopped) while the request was running."""

    code = "model_unloaded"
    status = 503


class RequestCancelledError(MLXError):
    """The request was cancelled (its client left) before it could start."""

    code = "cancelled"
    status = 499  # nginx's "client closed request"


class UnloadPendingError(MLXError):
    """``unload()`` gave up waiting for in-flight requests; the model unloads when they end."""

    code = "unload_pending"
    status = 409


# The one code -> class table: worker frames, the REST API's statuses and the kernel client's errors.
ERRORS: dict[str, type[MLXError]] = {
    cls.code: cls
    for cls in (
        MLXError,
        InvalidRequestError,
        InvalidModelError,
        PromptTooLongError,
        PromptTooLargeError,
        ModelNotFoundError,
        ModelLoadError,
        MemoryLimitError,
        AllModelsBusyError,
        WorkerCrashedError,
        WorkerTimeoutError,
        ManagerClosedError,
        ModelUnloadedError,
        RequestCancelledError,
        UnloadPendingError,
    )
}


def error_class(code: str) -> type[MLXError]:
    """The class of an error code; ``MLXError`` for a code the engine does not know."""
    return ERRORS.get(code, MLXError)


def error_from_frame(frame: dict[str, Any]) -> MLXError:
    """The exception a worker's (or reader's) error frame stands for, with the data the frame carries."""
    code = frame.get("code", MLXError.code)
    details = {name: frame[name] for name in DETAILS if frame.get(name) is not None}
    return error_class(code)(frame.get("message", code), **details)
