"""Errors a real client can act on: 401 for bad credentials, JSON 404s, null as absent, 400 not 500."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from jupyter_server.utils import url_path_join

from mlx_jupyter.engine.errors import InvalidRequestError, MLXError
from mlx_jupyter.server.base import APIError, error_body
from tests.models import TINY
from tests.server_calls import VALID, assert_error, assert_still_serves, check_bad_requests, ok_json, post

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# (method, path, body) across both APIs, reads and writes.
CALLS = [
    ("GET", "mlx/api/health", None),
    ("GET", "mlx/v1/models", None),
    ("POST", "mlx/api/generate", VALID),
    ("POST", "mlx/v1/chat/completions", CHAT),
]


@pytest.fixture
def fetch(http_server_client, jp_base_url):
    """A request with exactly the headers given: no token unless the test adds one."""

    async def fetch(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, **kwargs: Any):
        return await http_server_client.fetch(
            url_path_join(jp_base_url, path),
            method=method,
            headers=headers or {},
            body=None if method in ("GET", "DELETE") else json.dumps(body or {}),
            raise_error=False,
            request_timeout=30,
            **kwargs,
        )

    return fetch


# -- credentials -------------------------------------------------------------------

WRONG_CREDENTIALS = {
    "token_header": ({"Authorization": "token wrong"}, ""),
    "bearer_header": ({"Authorization": "Bearer wrong"}, ""),
    "token_argument": ({}, "?token=wrong"),
    # A browser's XSRF pair without a login cookie is no credential: 401, not an XSRF 403.
    "xsrf_without_login": ({"Cookie": "_xsrf=abc", "X-XSRFToken": "abc"}, ""),
    "none": ({}, ""),
}


@pytest.mark.parametrize("credentials", list(WRONG_CREDENTIALS))
async def test_wrong_or_missing_credentials_are_401_invalid_api_key_not_an_xsrf_403(fetch, credentials):
    headers, query = WRONG_CREDENTIALS[credentials]
    for method, path, body in CALLS:
        response = await fetch(method, path + query, body, headers)
        error = assert_error(response, 401, "invalid_api_key", "token")
        assert error["type"] == "authentication_error"
        assert "_xsrf" not in error["message"], error
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
        assert "wrong" not in error["message"], "the message must not echo the token"


async def test_the_openai_client_raises_authentication_error_for_a_wrong_api_key(openai_call):
    def chat(client: openai.OpenAI) -> Any:
        return client.chat.completions.create(model=TINY, messages=CHAT["messages"], max_tokens=2)

    with pytest.raises(openai.AuthenticationError) as raised:
        await openai_call(chat, api_key="wrong")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await openai_call(lambda client: client.models.list(), api_key="wrong")
    # The right key works, from the same client library.
    assert (await openai_call(chat)).choices[0].finish_reason in ("length", "stop")


async def test_a_browser_with_a_login_cookie_still_needs_xsrf_and_gets_a_403_without_it(fetch, jp_auth_header):
    # A token-authenticated request hands out Jupyter's login cookie, as the browser's login does.
    logged_in = await fetch("GET", "mlx/api/health", headers=dict(jp_auth_header))
    assert logged_in.code == 200
    login = "; ".join(c.split(";")[0] for c in logged_in.headers.get_list("Set-Cookie") if c.startswith("username-"))
    assert login, logged_in.headers

    answer = await fetch("POST", "mlx/api/generate", VALID, {"Cookie": f"{login}; _xsrf=abc", "X-XSRFToken": "abc"})
    assert ok_json(answer)["finish_reason"] in ("length", "stop")
    refused = await fetch("POST", "mlx/api/generate", VALID, {"Cookie": login})
    error = assert_error(refused, 403, "forbidden", "_xsrf")
    assert error["type"] == "authentication_error"


# -- unknown paths -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
async def test_unknown_paths_under_mlx_are_json_404s_behind_authentication(fetch, jp_auth_header, method):
    for path in ("mlx/nope", "mlx/api/nope", "mlx/v1/nope", "mlx/api/models/nope/deeper", "mlx", "mlx/"):
        response = await fetch(method, path, {}, dict(jp_auth_header))
        error = assert_error(response, 404, "not_found", "no such path", "openapi.json")
        assert error["type"] == "not_found_error"
        assert_error(await fetch(method, path, {}), 401, "invalid_api_key")


async def test_the_openai_client_reads_a_404_for_an_endpoint_we_lack_as_json(openai_call):
    with pytest.raises(openai.NotFoundError) as raised:
        await openai_call(lambda client: client.embeddings.create(model=TINY, input="hi"))
    assert raised.value.code == "not_found"
    assert "embeddings" in raised.value.message and "<html" not in raised.value.message.lower()


# -- null means absent ---------------------------------------------------------------

NATIVE_OPTIONAL = ("model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "keep_alive", "stream")
OPENAI_OPTIONAL = (
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
    "stream_options", "keep_alive", "user", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
    "function_call", "response_format", "logit_bias", "frequency_penalty", "presence_penalty", "parallel_tool_calls",
)  # fmt: skip
COMPLETIONS_OPTIONAL = ("logprobs", "echo", "best_of", "suffix", "n", "stream", "stream_options", "stop", "seed")


async def test_null_means_absent_for_every_optional_field_of_both_apis(jp_fetch, manager):
    cases = [
        ("mlx/api/generate", {"prompt": "hi"}, NATIVE_OPTIONAL),
        ("mlx/api/generate", {"messages": [{"role": "user", "content": "hi"}]}, ("prompt",)),
        ("mlx/v1/chat/completions", {"messages": CHAT["messages"]}, OPENAI_OPTIONAL),
        ("mlx/v1/completions", {"prompt": "hi"}, COMPLETIONS_OPTIONAL),
    ]
    for path, required, optional in cases:
        body = required | dict.fromkeys(optional)
        answer = ok_json(await post(jp_fetch, path, body))
        assert answer["usage"]["completion_tokens"] > 0, (path, answer)
    await assert_still_serves(jp_fetch, manager)


async def test_the_openai_client_may_send_none_as_langchain_does(openai_call):
    # Explicit None is sent as null: LangChain's OpenAI class sends "logprobs": null on every call.
    completion = await openai_call(
        lambda client: client.completions.create(
            model=TINY, prompt="hi", max_tokens=2, logprobs=None, n=None, seed=None, stop=None, temperature=None
        )
    )
    assert completion.choices[0].finish_reason in ("length", "stop")


# Non-null values of fields we do not support keep their 400 that names the field.
UNSUPPORTED_VALUES = [
    ("chat_tools", "mlx/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, 400, "unsupported_parameter",
     ["tools"]),
    ("completions_echo", "mlx/v1/completions", {"prompt": "hi", "echo": True}, 400, "unsupported_parameter",
     ["echo"]),
    ("completions_n_2", "mlx/v1/completions", {"prompt": "hi", "n": 2}, 400, "unsupported_parameter", ["n=1"]),
    ("native_unknown_field", "mlx/api/generate", {"prompt": "hi", "best_of": 2}, 400, "invalid_request",
     ["best_of"]),
]  # fmt: skip


async def test_non_null_values_of_unsupported_fields_are_still_refused_by_name(jp_fetch, manager):
    await check_bad_requests(jp_fetch, manager, UNSUPPORTED_VALUES)


# -- bodies that used to be 500s -----------------------------------------------------------

DEEP = b"[" * 10_000 + b"]" * 10_000
LONG_INT = b"9" * 5_000
HOSTILE_BODIES = [
    ("deep_nesting", "mlx/api/generate", b'{"prompt": "hi", "stop": ' + DEEP + b"}", 400, "invalid_json",
     ["nests", "deeper"]),
    ("deep_nesting_openai", "mlx/v1/chat/completions", b'{"messages": ' + DEEP + b"}", 400, "invalid_json",
     ["nests"]),
    ("integer_of_5000_digits", "mlx/api/generate", b'{"prompt": "hi", "max_tokens": ' + LONG_INT + b"}", 400,
     "invalid_json", ["integer", "4300 digits"]),
    ("integer_of_5000_digits_openai", "mlx/v1/completions", b'{"prompt": "hi", "seed": ' + LONG_INT + b"}", 400,
     "invalid_json", ["4300 digits"]),
    ("model_id_of_300_characters", "mlx/api/generate", {"prompt": "hi", "model": "m" * 300}, 400, "invalid_model",
     ["300", "255"]),
    ("load_model_id_of_300_characters", "mlx/api/models/load", {"model": "m" * 300}, 400, "invalid_model",
     ["300", "255"]),
    ("openai_model_id_of_300_characters", "mlx/v1/chat/completions", CHAT | {"model": "m" * 300}, 400,
     "invalid_model", ["255"]),
    ("repo_id_of_300_characters", "mlx/api/generate", {"prompt": "hi", "model": "org/" + "m" * 300}, 400,
     "invalid_model", ["96"]),
    # Valid JSON, but no text: the worker's tokenizer failed on it.
    ("lone_surrogate_prompt", "mlx/api/generate", b'{"prompt": "\\ud800"}', 400, "invalid_json", ["Unicode"]),
    ("lone_surrogate_message", "mlx/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\udfff"}]}', 400, "invalid_json", ["Unicode"]),
]  # fmt: skip


async def test_hostile_bodies_that_were_500s_are_400s_that_name_the_problem(jp_fetch, manager):
    await check_bad_requests(jp_fetch, manager, HOSTILE_BODIES)


def test_any_invalid_request_error_of_the_engine_is_a_400_whatever_its_code():
    # The engine adds bounds with codes of their own (prompt_too_long, ...): each is still a client error.
    class NewBoundError(InvalidRequestError):
        code = "some_new_bound"

    error = APIError.from_engine(NewBoundError("stop list has 17 strings; the limit is 16"))
    assert (error.status_code, error.code) == (400, "some_new_bound")
    assert error_body(error)["error"]["type"] == "invalid_request_error"
    assert APIError.from_engine(MLXError("something broke")).status_code == 500


@pytest.mark.parametrize(
    ("body", "param", "limit", "value"),
    [
        ({"prompt": "hi", "max_tokens": 5000}, "max_tokens", 1000, 5000),
        ({"prompt": "hi", "stop": ["s"] * 17}, "stop", 16, 17),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", None, None),
    ],
)
async def test_a_bound_error_names_the_field_the_bound_and_the_value_in_its_data(jp_fetch, body, param, limit, value):
    response = await post(jp_fetch, "mlx/api/generate", body)
    error = json.loads(response.body)["error"]
    assert response.code == 400 and error["param"] == param
    assert error.get("limit") == limit and error.get("value") == value
