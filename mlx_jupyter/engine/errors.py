"""Exceptions raised by the engine, each with a stable machine-readable code."""

from __future__ import annotations


class MLXError(Exception):
    """Base class of every engine error.

    ``code`` is stable and machine readable (REST error bodies use it); the message
    says what was asked, what is wrong and what to do.
    """

    code = "internal_error"


class InvalidRequestError(MLXError, ValueError):
    """A request whose parameters can never succeed (bad types, absurd values)."""

    code = "invalid_request"


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
    """No loadable model has this id."""

    code = "model_not_found"


class ModelLoadError(MLXError):
    """The model exists but could not be loaded; the message has the loader's reason."""

    code = "model_load_failed"


class MemoryLimitError(MLXError):
    """The model alone needs more memory than ``memory_limit`` allows."""

    code = "memory_limit_exceeded"


class AllModelsBusyError(MLXError):
    """No slot freed up in time: every resident model was busy."""

    code = "all_models_busy"


class WorkerCrashedError(MLXError):
    """The worker process serving the request exited."""

    code = "worker_crashed"


class WorkerTimeoutError(MLXError):
    """The worker produced no token within the deadline and was killed."""

    code = "worker_timeout"


class ManagerClosedError(MLXError):
    """The manager is shutting down or shut down."""

    code = "shutting_down"


class ModelUnloadedError(MLXError):
    """The model was unloaded (or its worker stopped) while the request was running."""

    code = "model_unloaded"


class RequestCancelledError(MLXError):
    """The request was cancelled (its client left) before it could start."""

    code = "cancelled"


class UnloadPendingError(MLXError):
    """``unload()`` gave up waiting for in-flight requests; the model unloads when they end."""

    code = "unload_pending"


def _subclasses(cls: type[MLXError]) -> list[type[MLXError]]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


def error_from_frame(frame: dict) -> MLXError:
    """The exception a worker's (or reader's) error frame stands for."""
    code = frame.get("code", MLXError.code)
    for cls in _subclasses(MLXError):
        if cls.code == code:
            return cls(frame.get("message", code))
    return MLXError(frame.get("message", code))
