"""One error model: the code -> class table serves worker frames, the REST API's statuses and the kernel client."""

from __future__ import annotations

import inspect

import pytest

from mlx_jupyter.engine import errors
from mlx_jupyter.engine.errors import (
    ERRORS,
    InvalidRequestError,
    MLXError,
    ModelNotFoundError,
    PromptTooLargeError,
    WorkerCrashedError,
    error_from_frame,
)
from mlx_jupyter.kernel.client import ClientError, UnknownModelError, error_from_body, error_from_engine
from mlx_jupyter.server.base import AVAILABLE_HINT, LOADED_HINT, APIError, error_body

# The statuses the REST API has always answered: the table must keep them.
STATUSES = {
    "internal_error": 500,
    "invalid_request": 400,
    "invalid_model": 400,
    "context_length_exceeded": 400,
    "prompt_too_long": 400,
    "memory_limit_exceeded": 400,
    "model_not_found": 404,
    "model_load_failed": 500,
    "all_models_busy": 503,
    "shutting_down": 503,
    "model_unloaded": 503,
    "worker_crashed": 502,
    "worker_timeout": 504,
    "unload_pending": 409,
    "cancelled": 499,
}


def test_every_engine_error_is_in_the_table_under_its_own_code_with_its_status():
    defined = {cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, MLXError)}
    assert set(ERRORS.values()) == defined, "an error class is missing from the table"
    assert all(ERRORS[cls.code] is cls for cls in defined), "two classes share a code"
    assert {code: cls.status for code, cls in ERRORS.items()} == STATUSES


def test_a_frame_becomes_its_class_with_its_message_and_data():
    error = error_from_frame({"code": "prompt_too_long", "message": "too long", "limit": 10, "value": 12})
    assert type(error) is PromptTooLargeError and str(error) == "too long"
    assert error.details() == {"limit": 10, "value": 12}
    unknown = error_from_frame({"code": "no_such_code", "message": "odd"})
    assert type(unknown) is MLXError and unknown.code == "internal_error" and str(unknown) == "odd"


def test_an_error_refuses_data_it_does_not_know():
    with pytest.raises(TypeError, match="unknown error details"):
        MLXError("x", colour="red")


def test_the_rest_api_adds_where_to_look_to_a_model_error_and_sends_the_data():
    unknown = error_body(APIError.from_engine(ModelNotFoundError("unknown model 'x'", model="x")))["error"]
    assert unknown == {
        "message": f"unknown model 'x'; {AVAILABLE_HINT}",
        "type": "not_found_error",
        "code": "model_not_found",
        "hint": AVAILABLE_HINT,
        "model": "x",
    }
    not_loaded = APIError.from_engine(ModelNotFoundError("model 'x' is not loaded", model="x", loaded=["y"]))
    assert not_loaded.status_code == 404 and not_loaded.message == f"model 'x' is not loaded; {LOADED_HINT}"
    assert error_body(not_loaded)["error"]["loaded"] == ["y"]
    plain = error_body(APIError.from_engine(WorkerCrashedError("the worker died")))["error"]
    assert plain == {"message": "the worker died", "type": "server_error", "code": "worker_crashed"}
    bound = APIError.from_engine(
        PromptTooLargeError("the prompt is 12 characters; the limit is 10", limit=10, value=12)
    )
    assert (bound.status_code, error_body(bound)["error"]["limit"]) == (400, 10)


def test_the_kernel_client_gets_the_same_error_from_a_server_body_as_from_its_own_engine():
    for engine_error in (
        ModelNotFoundError("model 'x' is not loaded", model="x", loaded=[]),
        ModelNotFoundError("unknown model 'x'", model="x"),
        InvalidRequestError("max_tokens must be between 1 and 8192, not 0", param="max_tokens", limit=8192, value=0),
    ):
        api = APIError.from_engine(engine_error)
        from_server = error_from_body(error_body(api), api.status_code)
        local = error_from_engine(engine_error)
        for got in (from_server, local):
            assert type(got) is (UnknownModelError if isinstance(engine_error, ModelNotFoundError) else ClientError)
            assert str(got) == str(engine_error), "the REST API's hint is for REST clients only"
            assert (got.code, got.status, got.details()) == (engine_error.code, api.status_code, engine_error.details())


def test_an_error_event_mid_stream_gets_the_status_its_code_has():
    crashed = error_body(APIError.from_engine(WorkerCrashedError("the worker died")))
    assert error_from_body(crashed, None).status == 502
    assert error_from_body({"error": {"message": "full", "code": "server_busy"}}, None).status is None


def test_a_body_that_is_not_an_error_body_is_still_one_error():
    error = error_from_body(["not", "an", "object"], 502)
    assert type(error) is ClientError and (error.code, error.status) == ("error", 502)
    assert str(error) == "the server reported an error"
