"""The real clients people use (openai, LangChain, litellm, jupyter-ai-magics) against one live server.

Each client runs in .venv-clients (scripts/setup_clients.sh) through a driver under tests/clients/
that records what the client returned; the tests here judge it: the text, the token counts, the
log-probability shapes, and the effect of every sampling and penalty parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx_jupyter.engine.models import builtin_model_path
from tests.helpers import pid_alive, wait_for
from tests.live_server import LiveServer
from tests.models import PYDOC
from tests.openai_answers import (
    answer,
    check_chat_logprobs,
    check_completion_logprobs,
    check_logprobs,
    check_usage,
    completion_logprobs,
)

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-clients"
DRIVERS = Path(__file__).resolve().parent / "clients"
DRIVER_TIMEOUT_S = 600  # a deadline for a hung client, not a guess of how long one takes

MODEL = PYDOC  # real text, so that answers can be compared across clients
QUESTION = "What is a list?"
PROMPT = "The list type"  # greedy, pydoc repeats itself here: room for the penalties to show
MAX_TOKENS = 16
TOP = 3  # top_logprobs asked for
STOP = " is"  # in both greedy answers
BIAS_WORD = " list"
GREEDY = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": QUESTION}]}
COMPLETION = {"prompt": PROMPT}
STREAMED = {"stream": True, "stream_options": {"include_usage": True}}


def bias_token() -> int:
    """The id of ``BIAS_WORD`` in pydoc's vocabulary (byte-level BPE writes a leading space as 'Ġ')."""
    vocab = json.loads((builtin_model_path("pydoc") / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab["Ġ" + BIAS_WORD.strip()]


def every_parameter(call: str) -> dict[str, Any]:
    """One request with every sampling, penalty and log-probability field, as the SDK takes them."""
    return {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 1234,
        "stop": ["\n\n\n"],  # its effect: test_openai_stop_ends_the_answer_before_the_stop_string
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "logit_bias": {str(bias_token()): 5},
        # Not in OpenAI's API: the SDK passes them through as extra fields.
        "extra_body": {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "repetition_context_size": 32},
        **({"logprobs": True, "top_logprobs": TOP} if call == "chat" else {"logprobs": TOP}),
    }


def openai_cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    for call, prompt in (("chat", CHAT), ("completions", COMPLETION)):
        logprobs = {"logprobs": True, "top_logprobs": TOP} if call == "chat" else {"logprobs": TOP}
        requests = {
            "greedy": GREEDY | prompt,
            "logprobs": GREEDY | prompt | logprobs,
            "every": every_parameter(call) | prompt,
        }
        for name, kwargs in requests.items():
            for client in ("sync", "async"):
                prefix = "" if client == "sync" else "async_"
                cases[f"{prefix}{call}_{name}"] = {"call": call, "client": client, "kwargs": kwargs}
                cases[f"{prefix}{call}_{name}_stream"] = {"call": call, "client": client, "kwargs": kwargs | STREAMED}
        cases[f"{call}_stop"] = {"call": call, "client": "sync", "kwargs": GREEDY | prompt | {"stop": [STOP]}}
    # Each changes a greedy completion, or must not: logprobs=1 shows the tokens it chose.
    hot = {"temperature": 1.5, "seed": 3}
    effects = {
        "hot": hot,
        "top_k_1": hot | {"extra_body": {"top_k": 1}},
        "min_p_1": hot | {"extra_body": {"min_p": 1.0}},
        "frequency_penalty": {"frequency_penalty": 2.0},
        "presence_penalty": {"presence_penalty": 2.0},
        "repetition_penalty": {"extra_body": {"repetition_penalty": 2.0, "repetition_context_size": 64}},
        "logit_bias": {"logit_bias": {str(bias_token()): 100}},
        "no_effect": {},
    }
    for name, fields in effects.items():
        kwargs = GREEDY | COMPLETION | {"logprobs": 1} | fields
        cases[f"effect_{name}"] = {"call": "completions", "client": "sync", "kwargs": kwargs}
    for client in ("sync", "async"):
        prefix = "" if client == "sync" else "async_"
        cases[f"{prefix}retrieve"] = {"call": "retrieve", "client": client, "kwargs": {"model": MODEL}}
        for call, prompt in (("chat", CHAT), ("completions", COMPLETION)):
            wrong_key = {"call": call, "client": client, "kwargs": GREEDY | prompt, "api_key": "not-the-token"}
            cases[f"{prefix}{call}_wrong_key"] = wrong_key
    return cases


# -- the server and the drivers ---------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir) -> Iterator[LiveServer]:
    """One live server for every client; pydoc stays loaded between them (no idle timeout)."""
    if not (VENV / "bin" / "python").exists():
        pytest.fail(f"{VENV} is missing: run scripts/setup.sh (or scripts/setup_clients.sh) to make it")
    stamp = VENV / ".installed"
    want = hashlib.sha256((DRIVERS / "requirements.txt").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:
        pytest.fail(f"{VENV} does not match tests/clients/requirements.txt: run scripts/setup_clients.sh")
    live = LiveServer(tmp_path_factory.mktemp("clients"), model_dir, idle_timeout=0)
    yield live
    workers = [m["pid"] for m in live.models()] if live.proc.poll() is None else []
    live.stop()
    assert wait_for(lambda: not any(pid_alive(p) for p in workers if p), timeout=15), "workers outlived the server"


def run_driver(
    server: LiveServer, tmp: Path, driver: str, config: dict[str, Any], python: Path = VENV / "bin" / "python"
) -> dict[str, Any]:
    """Run ``tests/clients/<driver>`` (in .venv-clients unless ``python`` says otherwise); its results by call name."""
    config = {"base_url": server.url + "mlx/v1", "api_key": server.token, "model": MODEL} | config
    out = tmp / f"{driver}.json"
    # No client setting from the environment: the drivers say where the server is.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LANGCHAIN_", "LANGSMITH_"))}
    env["IPYTHONDIR"] = str(tmp / "ipython")
    # jupyter-ai-magics runs in an IPython shell, as in a user's notebook or terminal.
    ipython = [VENV / "bin" / "ipython", "--quick", "--no-banner", "--HistoryManager.enabled=False"]
    command = [*(ipython if driver.startswith("jupyter_ai") else [python]), DRIVERS / driver, json.dumps(config), out]
    done = subprocess.run(command, env=env, cwd=DRIVERS, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert done.returncode == 0 and out.exists(), f"{driver} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(out.read_text())


# The openai SDK twice: the 2.x that langchain-openai 0.3 holds .venv-clients to, and the
# project's own test dependency, the newest release that a user who installs only openai gets.
OPENAI_PYTHONS = {"clients-venv": VENV / "bin" / "python", "project-venv": Path(sys.executable)}


@pytest.fixture(scope="module", params=list(OPENAI_PYTHONS))
def openai_results(server, tmp_path_factory, request) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("openai")
    return run_driver(server, tmp, "openai_calls.py", {"cases": openai_cases()}, OPENAI_PYTHONS[request.param])


@pytest.fixture(scope="module")
def langchain_results(server, tmp_path_factory) -> dict[str, Any]:
    config = {
        "question": QUESTION,
        "questions": [QUESTION, "What is a dict?", "What is a module?"],
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "top_logprobs": TOP,
    }
    return run_driver(server, tmp_path_factory.mktemp("langchain"), "langchain_calls.py", config)


@pytest.fixture(scope="module")
def litellm_results(server, tmp_path_factory) -> dict[str, Any]:
    config = {"question": QUESTION, "max_tokens": MAX_TOKENS}
    return run_driver(server, tmp_path_factory.mktemp("litellm"), "litellm_calls.py", config)


@pytest.fixture(scope="module")
def jupyter_ai_results(server, tmp_path_factory) -> dict[str, Any]:
    config = {"question": QUESTION, "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    return run_driver(server, tmp_path_factory.mktemp("jupyter-ai"), "jupyter_ai_calls.py", config)


@pytest.fixture(scope="module")
def greedy_answers(server) -> dict[str, str]:
    """The greedy answers every client must give, asked over plain HTTP: by endpoint ("chat", "completions")."""
    texts = {}
    for call, prompt in (("chat", CHAT), ("completions", COMPLETION)):
        response = server.client.post(f"mlx/v1/{call.replace('chat', 'chat/completions')}", json=GREEDY | prompt)
        assert response.status_code == 200, response.text
        (choice,) = response.json()["choices"]
        texts[call] = choice["message"]["content"] if call == "chat" else choice["text"]
    return texts


def result(results: dict[str, Any], name: str) -> Any:
    """What call ``name`` returned; a call that raised fails here, with the client's own traceback."""
    got = results[name]
    assert "result" in got, f"{name} raised {got['error']}: {got['message']}\n{got['trace']}"
    return got["result"]


def answers(results: dict[str, Any], call: str, *names: str) -> dict[str, dict[str, Any]]:
    """The answers of ``names``, each checked for its usage."""
    got = {name: answer(result(results, name), call, MODEL) for name in names}
    for each in got.values():
        check_usage(each, MAX_TOKENS)
    return got


def variants(call: str, request: str) -> list[str]:
    """A request's four runs: sync and async, whole and streamed."""
    return [f"{prefix}{call}_{request}{suffix}" for prefix in ("", "async_") for suffix in ("", "_stream")]


# -- openai ------------------------------------------------------------------------

CALLS = ["chat", "completions"]


@pytest.mark.parametrize("call", CALLS)
def test_openai_sync_and_async_whole_and_streamed_give_the_same_greedy_answer(openai_results, greedy_answers, call):
    got = answers(openai_results, call, *variants(call, "greedy"))
    assert {g["text"] for g in got.values()} == {greedy_answers[call]}, got
    assert {g["finish"] for g in got.values()} == {"length"}
    assert all(g["logprobs"] is None for g in got.values()), "log probabilities only when asked for"


@pytest.mark.parametrize("call", CALLS)
def test_openai_every_parameter_is_taken_and_a_seed_gives_one_answer_sync_async_whole_and_streamed(
    openai_results, call
):
    # The async runs were concurrent (batched together in the worker): a seeded answer does not change.
    got = answers(openai_results, call, *variants(call, "every"))
    assert len({g["text"] for g in got.values()}) == 1, got
    tokens = [check_logprobs(g, call, TOP, greedy=False) for g in got.values()]
    assert all(t == tokens[0] for t in tokens), tokens


@pytest.mark.parametrize("call", CALLS)
def test_openai_logprobs_have_openais_shape_whole_and_streamed(openai_results, greedy_answers, call):
    got = answers(openai_results, call, *variants(call, "logprobs"))
    tokens = [check_logprobs(g, call, TOP, greedy=True) for g in got.values()]
    assert all(t == tokens[0] for t in tokens), tokens
    assert {g["text"] for g in got.values()} == {greedy_answers[call]}, "logprobs change no answer"


@pytest.mark.parametrize("call", CALLS)
def test_openai_stop_ends_the_answer_before_the_stop_string(openai_results, greedy_answers, call):
    greedy = greedy_answers[call]
    assert STOP in greedy, f"pick a STOP that the greedy answer holds: {greedy!r}"
    (got,) = answers(openai_results, call, f"{call}_stop").values()
    assert got["text"] == greedy[: greedy.index(STOP)] and got["finish"] == "stop", got


def effect(results: dict[str, Any], name: str) -> tuple[str, list[str]]:
    """A greedy completion's text and tokens with one parameter set."""
    (got,) = answers(results, "completions", f"effect_{name}").values()
    return got["text"], completion_logprobs(got)["tokens"]


def test_openai_top_k_1_and_min_p_1_leave_only_the_likeliest_token_to_sample(openai_results, greedy_answers):
    greedy, _ = effect(openai_results, "no_effect")
    assert greedy == greedy_answers["completions"]
    assert effect(openai_results, "hot")[0] != greedy, "at temperature 1.5 the seed alone picks other tokens"
    assert effect(openai_results, "top_k_1")[0] == greedy
    assert effect(openai_results, "min_p_1")[0] == greedy


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty", "repetition_penalty"])
def test_openai_penalties_make_a_repetitive_greedy_answer_repeat_less(openai_results, penalty):
    _, greedy = effect(openai_results, "no_effect")
    assert len(set(greedy)) < len(greedy), f"the unpenalized answer must repeat itself: {greedy}"
    _, tokens = effect(openai_results, penalty)
    assert len(set(tokens)) > len(set(greedy)), (tokens, greedy)


def test_openai_logit_bias_of_100_makes_the_token_win_every_time(openai_results):
    _, tokens = effect(openai_results, "logit_bias")
    assert tokens == [BIAS_WORD] * MAX_TOKENS, tokens


def test_openai_a_completion_keeps_its_first_tokens_leading_space(openai_results):
    # The prompt and the completion together are what the model wrote ("The list type" + " list list ..."),
    # and the legacy tokens, which keep the space, spell the text (OpenAI's text_offset counts on it).
    (got,) = answers(openai_results, "completions", "effect_logit_bias").values()
    tokens = check_completion_logprobs(got, 1, greedy=False)
    assert got["text"] == "".join(tokens) == BIAS_WORD * MAX_TOKENS, got["text"]


@pytest.mark.parametrize("prefix", ["", "async_"])
def test_openai_models_retrieve_names_the_model(openai_results, prefix):
    model = result(openai_results, f"{prefix}retrieve")
    assert model["id"] == MODEL and model["object"] == "model", model


@pytest.mark.parametrize("case", [f"{prefix}{call}_wrong_key" for prefix in ("", "async_") for call in CALLS])
def test_openai_a_wrong_key_raises_authentication_error(openai_results, case):
    got = openai_results[case]
    # The code is what jupyter-ai reads to tell the user that the key is wrong.
    assert got.get("error") == "AuthenticationError" and got["status"] == 401 and got["code"] == "invalid_api_key", got


# -- LangChain -------------------------------------------------------------------


def test_langchain_chat_openai_invoke_stream_batch_and_logprobs(langchain_results, greedy_answers):
    greedy = greedy_answers["chat"]
    invoked = result(langchain_results, "chat_invoke")
    assert invoked["content"] == greedy, "the same greedy request as over plain HTTP"
    usage = invoked["usage_metadata"]
    assert usage["output_tokens"] == MAX_TOKENS and usage["total_tokens"] == usage["input_tokens"] + MAX_TOKENS
    assert invoked["response_metadata"]["finish_reason"] == "length"
    assert "".join(chunk["content"] for chunk in result(langchain_results, "chat_stream")) == greedy
    batch = result(langchain_results, "chat_batch")
    assert len(batch) == 3 and batch[0]["content"] == greedy, batch
    assert all(m["content"] and m["usage_metadata"]["output_tokens"] == MAX_TOKENS for m in batch), batch
    with_logprobs = result(langchain_results, "chat_logprobs")
    assert with_logprobs["content"] == greedy
    got = {"text": greedy, "usage": with_logprobs["response_metadata"]["token_usage"]}
    check_chat_logprobs(got | {"logprobs": with_logprobs["response_metadata"]["logprobs"]}, TOP, greedy=True)


def test_langchain_legacy_openai_class_that_sends_null_logprobs(langchain_results, greedy_answers):
    greedy = greedy_answers["completions"]
    assert result(langchain_results, "legacy_invoke") == greedy
    generated = result(langchain_results, "legacy_generate")
    ((generation,),) = generated["generations"]
    assert generation["text"] == greedy and generation["generation_info"]["finish_reason"] == "length"
    usage = generated["llm_output"]["token_usage"]
    assert usage["completion_tokens"] == MAX_TOKENS and usage["total_tokens"] == usage["prompt_tokens"] + MAX_TOKENS
    assert "".join(result(langchain_results, "legacy_stream")) == greedy


# -- litellm -----------------------------------------------------------------------


def test_litellm_completion_with_an_openai_model_and_api_base_whole_and_streamed(litellm_results, greedy_answers):
    greedy = greedy_answers["chat"]
    whole = answer(result(litellm_results, "whole"), "chat", MODEL)
    streamed = answer(result(litellm_results, "streamed"), "chat", MODEL)
    for got in (whole, streamed):
        check_usage(got, MAX_TOKENS)
        assert got["text"] == greedy and got["finish"] == "length", got


# -- jupyter-ai-magics -------------------------------------------------------------


def test_jupyter_ai_magics_ai_cells_with_the_openai_chat_custom_and_openai_providers(
    jupyter_ai_results, greedy_answers
):
    for name, provider, call in (("chat", "openai-chat-custom", "chat"), ("completion", "openai", "completions")):
        shown = result(jupyter_ai_results, name)
        assert shown["data"]["text/plain"] == greedy_answers[call], shown
        assert shown["metadata"]["jupyter_ai"] == {"provider_id": provider, "model_id": MODEL}
