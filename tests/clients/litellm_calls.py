"""litellm's ``completion`` with ``openai/<model>`` and ``api_base``, whole and streamed, greedy, against the server."""

from __future__ import annotations

import os

# litellm fetches its model price list from the internet at import unless told to use its own copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import calls  # after the environment that litellm reads at import
import litellm

conf = calls.config()
request = {
    "model": f"openai/{conf['model']}",
    "api_base": conf["base_url"],
    "api_key": conf["api_key"],
    "messages": [{"role": "user", "content": conf["question"]}],
    "max_tokens": conf["max_tokens"],
    "temperature": 0,
}

calls.write(
    calls.record(
        {
            "whole": lambda: litellm.completion(**request),
            "streamed": lambda: list(
                litellm.completion(**request, stream=True, stream_options={"include_usage": True})
            ),
        }
    )
)
