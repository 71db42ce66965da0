"""LangChain's ChatOpenAI (invoke, stream, batch, logprobs) and its legacy OpenAI class, greedy, against the server."""

from __future__ import annotations

import calls
from langchain_openai import ChatOpenAI, OpenAI

conf = calls.config()
common = {
    "model": conf["model"],
    "base_url": conf["base_url"],
    "api_key": conf["api_key"],
    "max_tokens": conf["max_tokens"],
    "temperature": 0,
    "max_retries": 0,
}
chat = ChatOpenAI(**common)
with_logprobs = ChatOpenAI(**common, logprobs=True, top_logprobs=conf["top_logprobs"])
# The legacy completions class: it sends "logprobs": null on every call.
legacy = OpenAI(**common)

calls.write(
    calls.record(
        {
            "chat_invoke": lambda: chat.invoke(conf["question"]),
            "chat_stream": lambda: list(chat.stream(conf["question"])),
            "chat_batch": lambda: chat.batch(conf["questions"]),
            "chat_logprobs": lambda: with_logprobs.invoke(conf["question"]),
            "legacy_invoke": lambda: legacy.invoke(conf["prompt"]),
            "legacy_generate": lambda: legacy.generate([conf["prompt"]]),
            "legacy_stream": lambda: list(legacy.stream(conf["prompt"])),
        }
    )
)
