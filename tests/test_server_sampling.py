"""Sampling parameters, penalties and log probabilities over the native and OpenAI APIs, and models.retrieve."""

from __future__ import annotations

import math

import openai
import pytest

from tests.models import TINY, TINY_A
from tests.server_calls import assert_error, assert_still_serves, ok_json, post, sse_events

# builtin:tiny's greedy answer here repeats one token: a penalty on repeats must change it.
REPEATS = "The Zen of Python"
MESSAGES = [{"role": "user", "content": "Hello"}]


def _check_chat_entries(entries: list, text: str, alternatives: int) -> None:
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == text
    for e in entries:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and e["logprob"] <= 0
        assert len(e["top_logprobs"]) == alternatives
        assert all(set(a) == {"token", "logprob", "bytes"} for a in e["top_logprobs"])


async def test_chat_logprobs_whole_and_streamed_in_openais_shape(openai_call):
    ask = {"model": TINY, "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    whole = await openai_call(lambda client: client.chat.completions.create(**ask))
    choice = whole.choices[0]
    entries = [e.model_dump() for e in choice.logprobs.content]
    assert len(entries) == whole.usage.completion_tokens
    _check_chat_entries(entries, choice.message.content, 3)
    # Greedy: the chosen token is the most likely one.
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries)

    chunks = await openai_call(lambda client: list(client.chat.completions.create(**ask, stream=True)))
    streamed = [
        e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert streamed == entries
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content

    plain = await openai_call(lambda client: client.chat.completions.create(**(ask | {"logprobs": None})))
    assert plain.choices[0].logprobs is not None, "top_logprobs alone asks for log probabilities"
    none = {k: v for k, v in ask.items() if k not in ("logprobs", "top_logprobs")}
    assert (await openai_call(lambda client: client.chat.completions.create(**none))).choices[0].logprobs is None


async def test_completions_logprobs_in_the_legacy_shape_whole_and_streamed(openai_call):
    ask = {"model": TINY, "prompt": "Hello", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    whole = await openai_call(lambda client: client.completions.create(**ask))
    choice = whole.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == whole.usage.completion_tokens
    assert all(len(alternatives) <= 2 and max(alternatives.values()) <= 0 for alternatives in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert choice.text[offset:].startswith(token) or "\\x" in token, (token, offset, choice.text)

    chunks = await openai_call(lambda client: list(client.completions.create(**ask, stream=True)))
    pieces = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset, "offsets run on across chunks"

    none = {k: v for k, v in ask.items() if k != "logprobs"}
    assert (await openai_call(lambda client: client.completions.create(**none))).choices[0].logprobs is None


@pytest.mark.parametrize("count", [21, -1, 2.5, "3"])
async def test_a_completions_logprobs_count_out_of_range_is_refused_by_name(jp_fetch, manager, count):
    response = await post(jp_fetch, "mlx/v1/completions", {"prompt": "hi", "logprobs": count})
    error = assert_error(response, 400, "invalid_request", "logprobs", "0 to 20")
    assert error["param"] == "logprobs"
    await assert_still_serves(jp_fetch, manager)


async def test_native_logprobs_whole_and_streamed(jp_fetch):
    ask = {"model": TINY, "prompt": "Hello", "max_tokens": 8, "top_logprobs": 2}
    whole = ok_json(await post(jp_fetch, "mlx/api/generate", ask))
    assert len(whole["logprobs"]) == whole["usage"]["completion_tokens"]
    _check_chat_entries(whole["logprobs"], whole["text"], 2)
    *chunks, final = sse_events((await post(jp_fetch, "mlx/api/generate", ask | {"stream": True})).body)
    assert [e for c in chunks for e in c.get("logprobs", [])] == whole["logprobs"]
    assert final["done"] and "logprobs" not in final
    plain = ok_json(await post(jp_fetch, "mlx/api/generate", {"model": TINY, "prompt": "Hello", "max_tokens": 3}))
    assert "logprobs" not in plain


async def test_penalties_and_sampling_fields_through_the_openai_client_change_the_answer(openai_call):
    ask = {"model": TINY, "prompt": REPEATS, "max_tokens": 20, "temperature": 0}

    def text(**more):
        return lambda client: client.completions.create(**(ask | more)).choices[0].text

    plain = await openai_call(text())
    assert await openai_call(text(frequency_penalty=2.0)) != plain
    assert await openai_call(text(presence_penalty=2.0)) != plain
    assert await openai_call(text(extra_body={"repetition_penalty": 2.0})) != plain
    assert await openai_call(text(logit_bias={"70": 100})) != plain
    # top_k=1 and min_p=1 leave only the most likely token, whatever the temperature.
    narrow = await openai_call(text(temperature=5.0, extra_body={"top_k": 1}))
    assert narrow == plain == await openai_call(text(temperature=5.0, extra_body={"min_p": 1.0}))


async def test_models_retrieve_answers_one_model_and_404_for_an_unknown_id(openai_call):
    model = await openai_call(lambda client: client.models.retrieve(TINY))
    assert (model.id, model.object, model.owned_by) == (TINY, "model", "builtin")
    folder = await openai_call(lambda client: client.models.retrieve(TINY_A))
    assert folder.owned_by == "dir"
    with pytest.raises(openai.NotFoundError) as raised:
        await openai_call(lambda client: client.models.retrieve("no-such-model"))
    assert raised.value.code == "model_not_found" and "no-such-model" in raised.value.message


async def test_logprobs_are_finite_json_numbers_even_for_a_banned_token(openai_call):
    # A -100 bias on every likely token leaves alternatives far below; JSON has no -Infinity.
    ask = {"model": TINY, "prompt": "Hello", "max_tokens": 3, "logprobs": 5, "logit_bias": {"70": -100}}
    lp = (await openai_call(lambda client: client.completions.create(**ask))).choices[0].logprobs
    assert all(math.isfinite(v) for alternatives in lp.top_logprobs for v in alternatives.values())
