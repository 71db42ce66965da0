"""The OpenAPI document describes exactly the routes the extension serves and the bodies they send."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec

import mlx_jupyter
from mlx_jupyter import sse
from mlx_jupyter.engine.request import field_default, field_specs
from mlx_jupyter.server import handlers, openai
from mlx_jupyter.server.base import MLXHandler
from mlx_jupyter.server.openapi import openapi_document
from tests.helpers import eventually
from tests.models import TINY

SPEC: dict[str, Any] = json.loads(openapi_document())
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ROUTES = handlers.routes() + openai.routes()


def _strict(node: Any) -> Any:
    """A copy of a schema tree where objects with ``properties`` admit no other field."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if isinstance(node.get("properties"), dict):
        out.setdefault("additionalProperties", False)
    return out


# Real bodies are checked against a strict copy of the schemas: a field the spec does
# not document fails the test as surely as a missing or mistyped one.
STRICT_COMPONENTS = {**SPEC["components"], "schemas": _strict(SPEC["components"]["schemas"])}


def validate(schema: dict[str, Any], instance: Any) -> None:
    OAS30Validator({**schema, "components": STRICT_COMPONENTS}).validate(instance)


def check(name: str, instance: Any) -> None:
    """``instance`` is a valid ``components/schemas/<name>``."""
    validate({"$ref": f"#/components/schemas/{name}"}, instance)


def deref(node: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``$ref``s to the object they name."""
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def parse_sse(body: bytes) -> list[tuple[str, Any]]:
    """(event name, data) of each Server-Sent Event; data is JSON, or the raw text (``[DONE]``)."""
    return [(e.event, e.data if e.data == sse.DONE else e.json()) for e in sse.parse(body)]


async def request(jp_fetch, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """Call ``method path`` (a spec path) and check the answer against what the spec declares
    for that operation and status: the media type, and the body (each event's ``data`` for a stream).
    Returns the response and its JSON body, or its list of events."""
    if body is not None and not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    response = await jp_fetch(
        *path.strip("/").split("/"), method=method.upper(), body=body, raise_error=False, **kwargs
    )
    responses = SPEC["paths"][path][method]["responses"]
    status = str(response.code)
    assert status in responses, f"{method.upper()} {path} answered {status}, which the spec does not declare"
    content = deref(responses[status])["content"]
    media_type = response.headers["Content-Type"].split(";")[0].strip()
    assert media_type in content, f"{method.upper()} {path} {status} answered {media_type}, not one of {list(content)}"
    schema = content[media_type]["schema"]
    if media_type == "text/event-stream":
        parsed: Any = parse_sse(response.body)
        for _, data in parsed:
            validate(schema, data)
    else:
        parsed = json.loads(response.body)
        validate(schema, parsed)
    return response, parsed


# -- the document itself -------------------------------------------------------------------


def test_the_spec_is_a_valid_openapi_3_document():
    validate_spec(SPEC)
    assert SPEC["openapi"].startswith("3.0.")
    assert SPEC["info"]["version"] == mlx_jupyter.__version__
    assert [server["url"] for server in SPEC["servers"]] == ["/"], "paths are relative to the base_url"


def test_every_route_and_method_is_described_and_nothing_else():
    served: dict[str, set[str]] = {}
    for pattern, handler in ROUTES:
        path = pattern.replace("(.+)", "{id}")  # the one kind of path parameter a route may have
        assert path.replace(".", "").replace("/", "").replace("_", "").replace("{id}", "").isalnum(), f"{pattern}"
        served[path] = {m for m in HTTP_METHODS if getattr(handler, m, None) is not getattr(MLXHandler, m, None)}
    described = {path: {m for m in item if m in HTTP_METHODS} for path, item in SPEC["paths"].items()}
    assert described == served


def test_every_operation_requires_the_jupyter_token_and_declares_its_errors():
    schemes = SPEC["components"]["securitySchemes"]
    token, bearer = schemes["JupyterToken"], schemes["BearerToken"]
    assert (token["type"], token["in"], token["name"]) == ("apiKey", "header", "Authorization")
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert {"JupyterToken"} in [set(req) for req in SPEC["security"]]
    assert {"BearerToken"} in [set(req) for req in SPEC["security"]]
    assert all(set(req) <= set(schemes) for req in SPEC["security"])
    retry_after = deref(SPEC["components"]["responses"]["ServiceUnavailable"]["headers"]["Retry-After"])
    assert retry_after["schema"]["type"] == "integer"
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            assert "security" not in operation, f"{method} {path} overrides the token requirement"
            responses = operation["responses"]
            assert {"200", "401", "403"} <= set(responses), f"{method} {path}"
            if "requestBody" in operation:
                assert {"400", "413"} <= set(responses), f"{method} {path} takes a body"
            for status, response in responses.items():
                if status != "200":
                    assert deref(response)["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }


def test_every_schema_is_used_and_every_example_is_valid():
    used: set[str] = set()
    found = [SPEC["paths"]]
    while found:  # follow $refs from the paths until no new one turns up
        refs = {r.split('"')[0] for r in json.dumps(found).split('"$ref": "')[1:]} - used
        used |= refs
        found = [deref({"$ref": r}) for r in refs]
    defined = {f"#/components/schemas/{name}" for name in SPEC["components"]["schemas"]}
    assert defined <= used, f"schemas no operation refers to: {sorted(defined - used)}"
    for name, schema in SPEC["components"]["schemas"].items():
        if "example" in schema:
            check(name, schema["example"])
    for response in SPEC["components"]["responses"].values():
        check("Error", response["content"]["application/json"]["example"])


# -- real answers ----------------------------------------------------------------------------


def test_every_request_field_is_in_the_document_as_generation_request_declares_it():
    native = SPEC["components"]["schemas"]["GenerateRequest"]["properties"]
    chat = SPEC["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name, spec in field_specs().items():
        schema = native[name]
        assert schema["description"] == spec.help
        for bound in ("minimum", "maximum", "type"):
            assert schema.get(bound) == spec.schema.get(bound), (name, bound)
        default = field_default(name)
        assert schema.get("default", default if default in (None, []) else "missing") == default, name
        for key in spec.openai:
            assert chat[key]["description"] == spec.help and chat[key]["nullable"], key


async def test_the_served_document_is_this_one(jp_fetch):
    response, body = await request(jp_fetch, "get", "/mlx/api/openapi.json")
    assert response.headers["Content-Type"].startswith("application/json")
    assert body == SPEC


async def test_health(jp_fetch):
    _, body = await request(jp_fetch, "get", "/mlx/api/health")
    check("Health", body)
    assert body["status"] == "ok" and body["degraded_reason"] is None


async def test_available_models_native_and_openai(jp_fetch):
    _, native = await request(jp_fetch, "get", "/mlx/api/models/available")
    check("AvailableModels", native)
    _, listed = await request(jp_fetch, "get", "/mlx/v1/models")
    check("OpenAIModelList", listed)
    assert TINY in {m["id"] for m in native} == {m["id"] for m in listed["data"]}


async def test_models_load_and_unload(jp_fetch):
    _, empty = await request(jp_fetch, "get", "/mlx/api/models")
    assert empty["models"] == []
    _, loaded = await request(jp_fetch, "post", "/mlx/api/models/load", {"model": TINY, "keep_alive": "10m"})
    check("ModelStatus", loaded)
    assert loaded["state"] == "ready" and loaded["keep_alive_s"] == 600 and loaded["expires_at"] is not None
    _, listing = await request(jp_fetch, "get", "/mlx/api/models")
    check("ModelList", listing)
    assert [m["id"] for m in listing["models"]] == [TINY]
    _, kept = await request(jp_fetch, "post", "/mlx/api/models/load", {"model": TINY, "keep_alive": -1})
    assert kept["keep_alive_s"] == -1 and kept["expires_at"] is None, "kept forever: no idle deadline"
    _, unloaded = await request(jp_fetch, "post", "/mlx/api/models/unload", {"model": TINY})
    check("ModelStatus", unloaded)
    assert unloaded["state"] in ("draining", "stopping")
    _, after = await request(jp_fetch, "get", "/mlx/api/models")
    assert after["models"] == []


async def test_generate_json_from_a_prompt_and_from_messages(jp_fetch):
    _, answer = await request(jp_fetch, "post", "/mlx/api/generate", {"model": TINY, "prompt": "Hi", "max_tokens": 4})
    check("GenerateResponse", answer)
    assert answer["usage"]["completion_tokens"] <= 4
    assert answer["timings"]["load_s"] is not None, "this request loaded the model"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": False}
    _, answer = await request(jp_fetch, "post", "/mlx/api/generate", chat)
    check("GenerateResponse", answer)
    assert answer["model"] == TINY, "the default model"
    assert answer["timings"]["load_s"] is None, "the model was loaded already"


async def test_generate_stream_events(jp_fetch):
    body = {"model": TINY, "prompt": "Hi", "max_tokens": 4, "stream": True}
    response, events = await request(jp_fetch, "post", "/mlx/api/generate", body)
    assert response.headers["Content-Type"] == "text/event-stream"
    assert len(events) >= 2 and all(name == "message" for name, _ in events)  # unnamed: the default type
    for _, chunk in events[:-1]:
        check("GenerateChunk", chunk)
    check("GenerateFinal", events[-1][1])


async def test_openai_chat_completion(jp_fetch):
    body = {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    _, answer = await request(jp_fetch, "post", "/mlx/v1/chat/completions", body)
    check("ChatCompletionResponse", answer)


async def test_openai_chat_completion_stream(jp_fetch):
    body = {
        "model": TINY,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, events = await request(jp_fetch, "post", "/mlx/v1/chat/completions", body)
    data = [d for _, d in events]
    assert data[-1] == "[DONE]"
    for chunk in data[:-1]:
        check("ChatCompletionChunk", chunk)
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    assert data[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    assert data[-2]["choices"] == [] and "usage" in data[-2]


async def test_openai_completion_whole_and_streamed(jp_fetch):
    body = {"model": TINY, "prompt": "Hi", "max_tokens": 4}
    _, answer = await request(jp_fetch, "post", "/mlx/v1/completions", body)
    check("CompletionResponse", answer)
    _, events = await request(jp_fetch, "post", "/mlx/v1/completions", body | {"prompt": ["Hi"], "stream": True})
    data = [d for _, d in events]
    assert data[-1] == "[DONE]"
    for chunk in data[:-1]:
        check("CompletionChunk", chunk)
    assert data[-2]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_model_events_stream(jp_fetch, jp_serverapp):
    received: list[bytes] = []

    def sent(name: str) -> bool:
        return name in [e.event for e in sse.parse(b"".join(received))]

    stream = jp_fetch("mlx", "api", "events", streaming_callback=received.append)
    assert await eventually(lambda: sent("snapshot"), timeout=10), b"".join(received)
    await request(jp_fetch, "post", "/mlx/api/models/load", {"model": TINY})
    assert await eventually(lambda: sent("ready"), timeout=10), b"".join(received)
    jp_serverapp.web_app.settings["mlx_events"].close()  # ends every event stream
    response = await stream
    assert response.headers["Content-Type"] == "text/event-stream"
    events = parse_sse(b"".join(received))
    schema = SPEC["paths"]["/mlx/api/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert events[0][0] == "snapshot"
    check("ModelList", events[0][1])
    for name, data in events[1:]:
        validate(schema, data)
        check("ModelEvent", data)
        assert name == data["type"]
    assert "ready" in [name for name, _ in events[1:]]


ERRORS = [
    ("get", "/mlx/api/health", None, {"Authorization": "token wrong"}, 401, "invalid_api_key"),
    ("post", "/mlx/api/models/load", '{"model": ', {}, 400, "invalid_json"),
    ("post", "/mlx/api/models/load", "[]", {}, 400, "invalid_json"),
    ("post", "/mlx/api/models/load", {"model": TINY, "keep_alive": "soon"}, {}, 400, "invalid_request"),
    ("post", "/mlx/api/models/load", {"model": "no-such-model"}, {}, 404, "model_not_found"),
    ("post", "/mlx/api/models/unload", {"model": TINY}, {}, 404, "model_not_found"),
    ("post", "/mlx/api/generate", {"prompt": "Hi", "bogus": 1}, {}, 400, "invalid_request"),
    ("post", "/mlx/api/generate", {"model": "no-such-model", "prompt": "Hi"}, {}, 404, "model_not_found"),
    ("post", "/mlx/api/generate", {"prompt": "x" * 600_000}, {}, 413, "body_too_large"),
    (
        "post",
        "/mlx/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "tools": []},
        {},
        400,
        "unsupported_parameter",
    ),
    ("post", "/mlx/v1/completions", {"prompt": "Hi", "n": 2}, {}, 400, "unsupported_parameter"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"), ERRORS, ids=[f"{e[4]}-{e[5]}-{e[1]}" for e in ERRORS]
)
async def test_error_bodies(jp_fetch, method, path, body, headers, status, code):
    response, error = await request(jp_fetch, method, path, body, headers=headers)
    assert response.code == status
    check("Error", error)
    assert error["error"]["code"] == code
