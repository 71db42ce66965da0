"""The Jupyter server extension over HTTP: auth, shapes, errors, busy, activity, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from jupyter_server.utils import url_path_join
from tornado import web

from mlx_jupyter import __version__
from mlx_jupyter.engine.manager import WorkerManager
from mlx_jupyter.server import handlers, openai
from mlx_jupyter.server.app import MLXExtension
from tests.helpers import eventually, pid_alive, wait_for, worker_pids
from tests.models import BROKEN, LONG, TINY, TINY_A, TINY_B
from tests.server_calls import (
    VALID,
    assert_error,
    assert_still_serves,
    check_bad_requests,
    get,
    ok_json,
    post,
    scrape,
    sse_events,
)

METHODS = ("get", "post", "put", "patch", "delete")
ONE_SLOT = {"max_loaded_models": 1, "queue_timeout": 1}


# -- fixtures and helpers ---------------------------------------------------


@pytest.fixture
def jp_server_config(jp_server_config, request):
    """conftest's server config; an indirect param sets ``allow_unauthenticated_access``."""
    if hasattr(request, "param"):
        jp_server_config.ServerApp.allow_unauthenticated_access = request.param
    return jp_server_config


@contextlib.asynccontextmanager
async def busy(manager: WorkerManager, model: str) -> AsyncIterator[None]:
    """Hold a lease on ``model`` through an engine stream suspended after its first chunk."""
    holding, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def hold() -> None:
        chunks = None
        try:
            chunks = manager.stream_generate("Beautiful is", model=model, max_tokens=1000)
            first = next(chunks)
            assert first.finish_reason is None, "the stream ended before it could hold the model"
            holding.set()
            release.wait(60)
        except BaseException as exc:
            failures.append(exc)
        finally:
            holding.set()
            if chunks is not None:
                chunks.close()

    thread = threading.Thread(target=hold, name=f"hold-{model}", daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, holding.wait, 60)
    try:
        assert not failures, failures
        yield
    finally:
        release.set()
        await loop.run_in_executor(None, thread.join, 30)


# -- security ------------------------------------------------------------------


def routed_requests() -> list[tuple[str, str]]:
    """(method, route) for every HTTP method each of our handlers implements."""
    found = []
    for route, handler in handlers.routes() + openai.routes():
        methods = [m for m in METHODS if getattr(handler, m) is not getattr(web.RequestHandler, m)]
        assert methods, f"{handler.__name__} implements no HTTP method"
        found += [(m.upper(), route) for m in methods]
    return found


@pytest.mark.parametrize("jp_server_config", [True, False], indirect=True, ids=["jupyter_default", "no_unauth"])
async def test_every_route_refuses_requests_without_credentials_or_with_a_wrong_token(
    http_server_client, jp_base_url, jp_serverapp
):
    requests = routed_requests()
    assert len(requests) >= len(handlers.routes()) + len(openai.routes())
    # A matching XSRF cookie and header, so that POSTs are refused for lacking auth, not XSRF.
    xsrf = {"Cookie": "_xsrf=abc", "X-XSRFToken": "abc"}
    for headers in ({}, xsrf, xsrf | {"Authorization": "token wrong"}, {"Authorization": "Bearer wrong"}):
        for method, route in requests:
            response = await http_server_client.fetch(
                url_path_join(jp_base_url, route.lstrip("/")),
                method=method,
                headers=headers,
                body=b"{}" if method != "GET" else None,
                raise_error=False,
                request_timeout=10,
            )
            assert response.code in (401, 403), (method, route, headers, response.code, response.body)
            # Our JSON error shape proves the request reached (and was refused by) our handler.
            error = json.loads(response.body)["error"]
            assert error["type"] == "authentication_error", (method, route, error)
            assert set(error) == {"message", "type", "code"}


async def test_extension_is_enabled_linked_and_serves_under_the_base_url(jp_serverapp, jp_fetch, extension):
    package = jp_serverapp.extension_manager.extensions["mlx_jupyter"]
    assert package.enabled
    assert all(point.linked for point in package.extension_points.values())
    assert isinstance(extension, MLXExtension)
    assert jp_serverapp.web_app.settings["mlx_manager"] is extension.manager
    # The packaged config file is what enables it in a real install.
    config = Path(__file__).parents[1] / "jupyter-config" / "jupyter_server_config.d" / "mlx_jupyter.json"
    assert json.loads(config.read_text())["ServerApp"]["jpserver_extensions"]["mlx_jupyter"] is True
    assert ok_json(await get(jp_fetch, "mlx/api/health"))["status"] == "ok"


# -- models --------------------------------------------------------------------


async def test_health_models_and_available_have_their_documented_shapes(jp_fetch):
    health = ok_json(await get(jp_fetch, "mlx/api/health"))
    assert health["status"] == "ok"
    assert health["version"] == __version__
    assert health["models_loaded"] == 0
    assert health["active_requests"] == 0

    models = ok_json(await get(jp_fetch, "mlx/api/models"))
    assert set(models) == {"server_time", "models"}
    assert isinstance(models["server_time"], float)
    assert models["models"] == []

    available = ok_json(await get(jp_fetch, "mlx/api/models/available"))
    assert isinstance(available, list), "a bare list of loadable models"
    assert all(set(m) == {"id", "source", "path", "size_bytes", "chat"} for m in available), available
    by_id = {m["id"]: m for m in available}
    assert by_id[TINY]["source"] == "builtin"
    assert by_id[TINY]["chat"] is True and by_id["builtin:pydoc"]["chat"] is False
    assert by_id[TINY_A]["source"] == by_id[TINY_B]["source"] == "dir"
    assert by_id[TINY_A]["size_bytes"] > 0
    assert Path(by_id[TINY_A]["path"], "config.json").is_file()
    assert {m["source"] for m in available} <= {"builtin", "dir", "hf-cache"}

    openai_models = ok_json(await get(jp_fetch, "mlx/v1/models"))
    assert openai_models["object"] == "list"
    assert {m["id"] for m in openai_models["data"]} == set(by_id)


async def test_load_answers_ready_with_a_pid_and_unload_ends_the_worker_process(jp_fetch):
    loaded = ok_json(await post(jp_fetch, "mlx/api/models/load", {"model": TINY_A, "keep_alive": "10m"}))
    assert loaded["id"] == TINY_A
    assert loaded["state"] == "ready"
    assert loaded["active_requests"] == 0
    assert loaded["keep_alive_s"] == 600
    pid = loaded["pid"]
    assert isinstance(pid, int) and pid_alive(pid)
    assert pid in worker_pids()

    listed = ok_json(await get(jp_fetch, "mlx/api/models"))
    (model,) = listed["models"]
    assert model["id"] == TINY_A and model["pid"] == pid and model["state"] == "ready"
    assert model["loaded_at"] <= listed["server_time"]
    assert model["expires_at"] == pytest.approx(model["last_used_at"] + 600)
    assert ok_json(await get(jp_fetch, "mlx/api/health"))["models_loaded"] == 1

    unloaded = ok_json(await post(jp_fetch, "mlx/api/models/unload", {"model": TINY_A}))
    assert unloaded["id"] == TINY_A
    assert wait_for(lambda: not pid_alive(pid), timeout=5), f"worker {pid} still runs after unload"
    assert ok_json(await get(jp_fetch, "mlx/api/models"))["models"] == []

    again = await post(jp_fetch, "mlx/api/models/unload", {"model": TINY_A})
    error = assert_error(again, 404, "model_not_found", "'tiny-a'", "not loaded; see GET mlx/api/models")
    # The data behind the message, for clients that say it their own way (the magics list the ids).
    assert (error["model"], error["loaded"], error["hint"]) == (TINY_A, [], "see GET mlx/api/models")


# -- generate ------------------------------------------------------------------


async def test_generate_answers_text_finish_reason_usage_and_timings_and_streams_the_same_as_sse(jp_fetch):
    request = {"prompt": "Beautiful is better", "max_tokens": 8}
    answer = ok_json(await post(jp_fetch, "mlx/api/generate", request))
    assert answer["model"] == TINY
    assert isinstance(answer["text"], str) and answer["text"]
    assert answer["finish_reason"] in ("length", "stop")
    usage = answer["usage"]
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    timings = answer["timings"]
    assert set(timings) >= {"load_s", "ttft_s", "generation_tps", "prompt_tps"}
    assert timings["load_s"] > 0, "the request that loaded the model reports the load time"
    assert timings["ttft_s"] > 0 and timings["generation_tps"] > 0 and timings["prompt_tps"] > 0

    response = await post(jp_fetch, "mlx/api/generate", request | {"stream": True})
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    *chunks, final = sse_events(response.body)
    assert chunks, "a streamed answer sends its text before the final event"
    assert all(set(c) == {"text"} for c in chunks), chunks
    assert final["done"] is True
    assert final["finish_reason"] == answer["finish_reason"]
    assert final["usage"] == usage, "greedy decoding: the same tokens as the JSON answer"
    assert set(final["timings"]) >= {"load_s", "ttft_s", "generation_tps", "prompt_tps"}
    assert final["timings"]["load_s"] is None, "the model was already loaded"
    assert "".join(c["text"] for c in chunks) + final["text"] == answer["text"]


# Bad requests: (case, path, body, status, code, words the message must contain).
BAD_REQUESTS = [
    ("malformed_json", "mlx/api/generate", b'{"prompt": "hi",', 400, "invalid_json", ["not valid JSON"]),
    ("json_array_body", "mlx/api/generate", b'["hi"]', 400, "invalid_json", ["JSON object"]),
    ("empty_body", "mlx/api/generate", b"", 400, "invalid_json", ["JSON object"]),
    ("non_utf8_body", "mlx/api/generate", b'{"prompt": "\xff"}', 400, "invalid_json", ["not valid JSON"]),
    ("max_tokens_string", "mlx/api/generate", {"prompt": "hi", "max_tokens": "ten"}, 400, "invalid_request",
     ["max_tokens", "integer", "'ten'"]),
    ("temperature_string", "mlx/api/generate", {"prompt": "hi", "temperature": "hot"}, 400, "invalid_request",
     ["temperature", "number", "'hot'"]),
    ("stream_not_a_bool", "mlx/api/generate", {"prompt": "hi", "stream": "yes"}, 400, "invalid_request",
     ["stream"]),
    ("no_prompt_or_messages", "mlx/api/generate", {"max_tokens": 4}, 400, "invalid_request",
     ["prompt", "messages"]),
    ("prompt_and_messages", "mlx/api/generate", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
     400, "invalid_request", ["exactly one of prompt or messages"]),
    ("empty_messages", "mlx/api/generate", {"messages": []}, 400, "invalid_request", ["messages", "non-empty"]),
    ("unsupported_role", "mlx/api/generate", {"messages": [{"role": "tool", "content": "hi"}]}, 400,
     "invalid_request", ["role", "'tool'", "not supported"]),
    ("max_tokens_zero", "mlx/api/generate", {"prompt": "hi", "max_tokens": 0}, 400, "invalid_request",
     ["max_tokens", "between 1 and 1000"]),
    ("max_tokens_negative", "mlx/api/generate", {"prompt": "hi", "max_tokens": -5}, 400, "invalid_request",
     ["max_tokens", "-5"]),
    ("max_tokens_over_limit", "mlx/api/generate", {"prompt": "hi", "max_tokens": 1001}, 400, "invalid_request",
     ["max_tokens", "1000", "1001"]),
    ("temperature_negative", "mlx/api/generate", {"prompt": "hi", "temperature": -0.5}, 400, "invalid_request",
     ["temperature", "-0.5"]),
    ("top_p_over_one", "mlx/api/generate", {"prompt": "hi", "top_p": 2}, 400, "invalid_request", ["top_p"]),
    ("seed_negative", "mlx/api/generate", {"prompt": "hi", "seed": -1}, 400, "invalid_request", ["seed"]),
    ("empty_stop_string", "mlx/api/generate", {"prompt": "hi", "stop": [""]}, 400, "invalid_request", ["stop"]),
    ("keep_alive_not_a_duration", "mlx/api/generate", {"prompt": "hi", "keep_alive": "forever"}, 400,
     "invalid_request", ["keep_alive", "'forever'"]),
    ("message_without_content", "mlx/api/generate", {"messages": [{"role": "user"}]}, 400, "invalid_request",
     ["messages[0]", "content"]),
    ("prompt_longer_than_context", "mlx/api/generate", {"prompt": "word " * 40_000}, 400,
     "context_length_exceeded", ["32768 tokens"]),
    ("unknown_model", "mlx/api/generate", {"prompt": "hi", "model": "no-such-model"}, 404, "model_not_found",
     ["'no-such-model'", "models/available"]),
    ("stream_unknown_model", "mlx/api/generate", {"prompt": "hi", "model": "no-such-model", "stream": True}, 404,
     "model_not_found", ["models/available"]),
    ("dotdot_model_id", "mlx/api/generate", {"prompt": "hi", "model": "../etc"}, 400, "invalid_model",
     ["'../etc'"]),
    ("absolute_path_model_id", "mlx/api/generate", {"prompt": "hi", "model": "/etc/passwd"}, 400,
     "invalid_model", ["'/etc/passwd'", "path"]),
    ("body_over_max_body_bytes", "mlx/api/generate", {"prompt": "x" * 600_000}, 413, "body_too_large",
     ["524288"]),
    ("unknown_field", "mlx/api/generate", {"prompt": "hi", "max_length": 4}, 400, "invalid_request",
     ["max_length"]),
    ("load_without_model", "mlx/api/models/load", {}, 400, "invalid_request", ["'model'", "models/available"]),
    ("load_path_model_id", "mlx/api/models/load", {"model": "../etc"}, 400, "invalid_model", ["'../etc'"]),
    ("load_bad_keep_alive", "mlx/api/models/load", {"model": TINY_A, "keep_alive": "soon"}, 400,
     "invalid_request", ["keep_alive", "'soon'"]),
    ("unload_without_model", "mlx/api/models/unload", {"model": 5}, 400, "invalid_request", ["'model'"]),
    ("chat_n_2", "mlx/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400,
     "unsupported_parameter", ["n=1"]),
    ("chat_messages_not_a_list", "mlx/v1/chat/completions", {"messages": "hi"}, 400, "invalid_request",
     ["'messages'", "list"]),
    ("chat_image_content", "mlx/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     400, "invalid_request", ["messages[0].content", "text"]),
    ("chat_tool_role", "mlx/v1/chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, 400,
     "invalid_request", ["'tool'", "not supported"]),
    ("chat_unsupported_field", "mlx/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter", ["tools"]),
    ("chat_stream_options_not_an_object", "mlx/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": "usage"}, 400,
     "invalid_request", ["stream_options"]),
    ("chat_unknown_model", "mlx/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, 404, "model_not_found",
     ["models/available"]),
    ("completions_without_prompt", "mlx/v1/completions", {"max_tokens": 4}, 400, "invalid_request",
     ["'prompt'"]),
]  # fmt: skip


# Wrongly typed prompt text: a client error, like every other type error.
WRONG_PROMPT_TYPES = [
    ("prompt_not_a_string", "mlx/api/generate", {"prompt": 42}, 400, "invalid_request", ["prompt"]),
    ("content_not_a_string", "mlx/api/generate", {"messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_request", ["messages[0]", "content"]),
]  # fmt: skip

# OpenAI's max_tokens must be at least 1, as in the native API; 0 is not "use the default".
OPENAI_ZERO_MAX_TOKENS = [
    ("chat_max_tokens_zero", "mlx/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "invalid_request", ["max_tokens"]),
    ("chat_max_completion_tokens_zero", "mlx/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400, "invalid_request",
     ["max_tokens"]),
    ("completions_max_tokens_zero", "mlx/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400,
     "invalid_request", ["max_tokens"]),
]  # fmt: skip


async def test_bad_requests_get_a_precise_error_and_the_server_keeps_serving(jp_fetch, manager):
    await check_bad_requests(jp_fetch, manager, BAD_REQUESTS)


async def test_a_prompt_or_message_content_of_the_wrong_type_is_a_400_not_a_500(jp_fetch, manager):
    await check_bad_requests(jp_fetch, manager, WRONG_PROMPT_TYPES)


async def test_openai_max_tokens_zero_is_refused_not_replaced_by_the_default(jp_fetch, manager):
    await check_bad_requests(jp_fetch, manager, OPENAI_ZERO_MAX_TOKENS)


# No warm spare, so that any worker process left is the failed one.
@pytest.mark.parametrize("mlx_config", [{"warm_spare": False}], indirect=True)
async def test_a_model_that_fails_to_load_is_a_500_with_the_loaders_reason(jp_fetch, manager):
    # Both requests wait on one failing load, or each fails its own: either way, the reason.
    load, generate = await asyncio.gather(
        post(jp_fetch, "mlx/api/models/load", {"model": BROKEN}),
        post(jp_fetch, "mlx/api/generate", {"model": BROKEN, "prompt": "hi"}),
    )
    for response in (load, generate):
        error = assert_error(response, 500, "model_load_failed")
        assert error["type"] == "server_error"
        # The worker's loader names its reason, e.g. "[load_safetensors] Invalid json header length".
        assert "safetensors" in error["message"].lower(), error
    assert ok_json(await get(jp_fetch, "mlx/api/models"))["models"] == []
    assert wait_for(lambda: not worker_pids(), timeout=5), "the failed worker was left running"
    await assert_still_serves(jp_fetch, manager)


@pytest.mark.parametrize("mlx_config", [ONE_SLOT], indirect=True, ids=["one_slot"])
async def test_generate_is_503_all_models_busy_with_retry_after_while_every_slot_is_busy(jp_fetch, manager):
    async with busy(manager, TINY_A):
        response = await post(jp_fetch, "mlx/api/generate", {"model": TINY_B, "prompt": "hi", "max_tokens": 2})
        error = assert_error(response, 503, "all_models_busy", "'tiny-b'")
        assert error["type"] == "overloaded_error"
        assert int(response.headers["Retry-After"]) > 0
        assert [s.id for s in manager.status()] == [TINY_A], "the busy model must not be evicted"
    # Once the slot frees up, the same request succeeds by evicting the idle model.
    answer = ok_json(await post(jp_fetch, "mlx/api/generate", {"model": TINY_B, "prompt": "hi", "max_tokens": 2}))
    assert answer["model"] == TINY_B
    assert [s.id for s in manager.status()] == [TINY_B]


@pytest.mark.parametrize(
    "mlx_config",
    [{"token_timeout": 1.0, "first_token_timeout": 1.0, "max_tokens_limit": 100_000}],
    indirect=True,
    ids=["one_second_deadlines"],
)
@pytest.mark.parametrize("path", ["mlx/api/generate", "mlx/v1/completions"])
async def test_a_worker_that_hangs_mid_answer_is_a_504_even_without_streaming(jp_fetch, manager, path):
    manager.load(TINY)
    # Greedy on "x" never meets the end token: the answer cannot finish before the hang.
    body = {"prompt": "x", "max_tokens": LONG, "temperature": 0}
    answer = asyncio.ensure_future(post(jp_fetch, path, body))
    for _ in range(500):  # until the request holds the worker
        if manager.status()[0].active_requests:
            break
        await asyncio.sleep(0.01)
    # Tokens come about every millisecond: by now the answer is under way.
    await asyncio.sleep(0.3)
    pid = manager.status()[0].pid
    os.kill(pid, signal.SIGSTOP)
    assert_error(await answer, 504, "worker_timeout", "was killed")
    assert wait_for(lambda: not pid_alive(pid), timeout=5)
    await assert_still_serves(jp_fetch, manager)


# -- activity ------------------------------------------------------------------


async def test_polling_is_not_activity_but_generation_and_held_leases_are(jp_fetch, jp_serverapp, manager, extension):
    settings = jp_serverapp.web_app.settings
    before = settings.get("api_last_activity")
    for path in ("mlx/api/health", "mlx/api/models", "mlx/api/models/available", "mlx/v1/models"):
        ok_json(await get(jp_fetch, path))
        assert settings.get("api_last_activity") == before, f"GET {path} counted as activity"

    ok_json(await post(jp_fetch, "mlx/api/generate", VALID))
    after = settings.get("api_last_activity")
    assert after is not None and (before is None or after > before), "a generate must count as activity"

    # current_activity() reads the event hub's snapshot, which follows lease changes
    # a moment later (a refresh on the event loop).
    assert await eventually(lambda: extension.current_activity() is False)
    async with busy(manager, TINY):
        assert await eventually(lambda: extension.current_activity() is True)
        assert jp_serverapp.extension_manager.any_activity(), "shutdown_no_activity must see the stream"
    assert await eventually(lambda: extension.current_activity() is False)


# -- metrics -------------------------------------------------------------------


async def test_metrics_count_requests_tokens_loads_and_loaded_models(jp_fetch):
    requests_ok = ("mlx_requests_total", (("endpoint", "api/generate"), ("status", "200")))
    requests_bad = ("mlx_requests_total", (("endpoint", "api/generate"), ("status", "400")))
    tokens = ("mlx_generated_tokens_total", (("model", TINY),))
    before = await scrape(jp_fetch)
    assert before[("mlx_model_loads_total", ())] == 0
    assert before[("mlx_loaded_models", (("state", "ready"),))] == 0

    answer = ok_json(await post(jp_fetch, "mlx/api/generate", VALID))
    await post(jp_fetch, "mlx/api/generate", {"prompt": "hi", "max_tokens": 0})

    async def ready_models() -> float:
        return (await scrape(jp_fetch))[("mlx_loaded_models", (("state", "ready"),))]

    # The loaded-models gauge reads the event hub's snapshot, refreshed off the loop.
    for _ in range(100):
        if await ready_models() == 1:
            break
        await asyncio.sleep(0.05)
    after = await scrape(jp_fetch)
    assert after[("mlx_loaded_models", (("state", "ready"),))] == 1
    assert after[requests_ok] == before.get(requests_ok, 0) + 1
    assert after[requests_bad] == before.get(requests_bad, 0) + 1
    assert after[tokens] == before.get(tokens, 0) + answer["usage"]["completion_tokens"]
    assert after[("mlx_model_loads_total", ())] == 1
    assert ("mlx_time_to_first_token_seconds_count", (("model", TINY),)) in after
