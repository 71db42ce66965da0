"""OpenAI answers as clients receive them: whole or streamed in one shape, and the checks every answer must pass."""

from __future__ import annotations

from typing import Any

# Each assert says what it saw: pytest does not rewrite the asserts of a helper module.


def answer(response: Any, call: str, model: str) -> dict[str, Any]:
    """A chat or completion answer, whole or streamed, as one text, finish reason, usage and logprobs."""
    chat = call == "chat"
    if isinstance(response, dict):  # a whole answer
        assert response["object"] == ("chat.completion" if chat else "text_completion"), response
        assert response["model"] == model, response
        (choice,) = response["choices"]
        text = choice["message"]["content"] if chat else choice["text"]
        return {
            "text": text,
            "finish": choice["finish_reason"],
            "usage": response["usage"],
            "logprobs": choice["logprobs"],
        }
    assert {c["object"] for c in response} == {"chat.completion.chunk" if chat else "text_completion"}, response
    *chunks, last = response
    assert last["choices"] == [] and last["usage"], "include_usage: the last chunk carries the usage alone"
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    finishes = [c["finish_reason"] for c in choices if c["finish_reason"]]
    assert len(finishes) == 1, f"one chunk ends the answer: {finishes}"
    text = "".join((c["delta"].get("content") or "") if chat else c["text"] for c in choices)
    parts = [c["logprobs"] for c in choices if c["logprobs"]]
    if not parts:
        logprobs = None
    elif chat:
        logprobs = {"content": [entry for part in parts for entry in part["content"]]}
    else:
        logprobs = {key: [v for part in parts for v in part[key]] for key in parts[0]}
    return {"text": text, "finish": finishes[0], "usage": last["usage"], "logprobs": logprobs}


def check_usage(got: dict[str, Any], max_tokens: int) -> None:
    """A non-empty text, and token counts that add up within ``max_tokens`` (all of it when cut by length)."""
    usage = got["usage"]
    assert got["text"], got
    assert usage["prompt_tokens"] > 0, usage
    assert 1 <= usage["completion_tokens"] <= max_tokens, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert got["finish"] in ("length", "stop"), got
    if got["finish"] == "length":
        assert usage["completion_tokens"] == max_tokens, usage


def spelled(entry: dict[str, Any]) -> bool:
    """Is a chat logprob entry's token its bytes as text? (A token that ends inside a character has no text.)"""
    try:
        return bytes(entry["bytes"]).decode() == entry["token"]
    except UnicodeDecodeError:
        return True


def check_chat_logprobs(got: dict[str, Any], top: int, greedy: bool) -> list[str]:
    """OpenAI's chat shape, one entry per generated token; the tokens."""
    assert got["logprobs"], f"no logprobs in {got}"
    content = got["logprobs"]["content"]
    assert len(content) == got["usage"]["completion_tokens"], (len(content), got["usage"])
    if "\ufffd" not in got["text"]:  # an answer cut inside a character ends in a replacement character
        # A chat answer drops its first token's leading space.
        spelt = b"".join(bytes(entry["bytes"]) for entry in content).decode()
        assert got["text"] in (spelt, spelt.removeprefix(" ")), (got["text"], content)
    for entry in content:
        assert isinstance(entry["token"], str) and entry["logprob"] <= 0 and spelled(entry), entry
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top and all(spelled(a) for a in alternatives), entry
        values = [a["logprob"] for a in alternatives]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values), entry
        assert entry["logprob"] <= values[0] + 1e-4, entry  # none is likelier than the likeliest
        if greedy:
            assert entry["token"] == alternatives[0]["token"], entry
    return [entry["token"] for entry in content]


def check_completion_logprobs(got: dict[str, Any], top: int, greedy: bool) -> list[str]:
    """OpenAI's legacy completions shape: parallel lists, one item per generated token; the tokens."""
    logprobs = completion_logprobs(got)
    tokens = logprobs["tokens"]
    for key in ("token_logprobs", "top_logprobs", "text_offset"):
        assert len(logprobs[key]) == len(tokens), key
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets), offsets
    if got["text"].isascii():  # then no token ends inside a character: each is text at its offset
        assert "".join(tokens) == got["text"], (tokens, got["text"])
        assert all(got["text"].startswith(t, o) for t, o in zip(tokens, offsets, strict=True)), (tokens, offsets)
    for token, logprob, alternatives in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        # A dict by token text: two ids that decode alike share one key.
        assert logprob <= 0 and 1 <= len(alternatives) <= top, (token, logprob, alternatives)
        assert all(v <= 0 for v in alternatives.values()), alternatives
        assert logprob <= max(alternatives.values()) + 1e-4, (token, logprob, alternatives)
        if greedy:
            assert alternatives.get(token) == max(alternatives.values()), (token, alternatives)
    return tokens


def completion_logprobs(got: dict[str, Any]) -> dict[str, Any]:
    """A completion's legacy logprobs, one token per generated token."""
    assert got["logprobs"], f"no logprobs in {got}"
    tokens = got["logprobs"]["tokens"]
    assert len(tokens) == got["usage"]["completion_tokens"], (len(tokens), got["usage"])
    return got["logprobs"]


def check_logprobs(got: dict[str, Any], call: str, top: int, greedy: bool) -> list[str]:
    return (check_chat_logprobs if call == "chat" else check_completion_logprobs)(got, top, greedy)
