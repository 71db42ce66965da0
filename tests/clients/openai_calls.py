"""The openai SDK, sync and async: runs the requests the test names in its config and records their answers.

Config ``cases``: ``{name: {"call": "chat" | "completions" | "retrieve", "client": "sync" | "async",
"kwargs": {...}, "api_key"?: str}}``; kwargs go to the SDK method as they are (``extra_body``
included), a streamed answer is recorded as its list of chunks. The async cases run
concurrently, as an asyncio application sends them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import calls
import openai

conf = calls.config()


def client_options(case: dict[str, Any]) -> dict[str, Any]:
    return {"base_url": conf["base_url"], "api_key": case.get("api_key", conf["api_key"]), "max_retries": 0}


def sync_call(case: dict[str, Any]) -> calls.Call:
    def call() -> Any:
        with openai.OpenAI(**client_options(case)) as client:
            if case["call"] == "retrieve":
                return client.models.retrieve(**case["kwargs"])
            create = client.chat.completions.create if case["call"] == "chat" else client.completions.create
            answer = create(**case["kwargs"])
            return list(answer) if case["kwargs"].get("stream") else answer

    return call


async def async_call(case: dict[str, Any]) -> Any:
    async with openai.AsyncOpenAI(**client_options(case)) as client:
        if case["call"] == "retrieve":
            return await client.models.retrieve(**case["kwargs"])
        create = client.chat.completions.create if case["call"] == "chat" else client.completions.create
        answer = await create(**case["kwargs"])
        return [chunk async for chunk in answer] if case["kwargs"].get("stream") else answer


async def all_async(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    async def one(name: str, case: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return name, (await calls.record_async({name: lambda: async_call(case)}))[name]

    return dict(await asyncio.gather(*(one(name, case) for name, case in cases.items())))


cases = conf["cases"]
results = calls.record({name: sync_call(case) for name, case in cases.items() if case["client"] == "sync"})
results |= asyncio.run(all_async({name: case for name, case in cases.items() if case["client"] == "async"}))
calls.write(results)
