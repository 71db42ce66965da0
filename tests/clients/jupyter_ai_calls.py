"""jupyter-ai-magics 2.x in an IPython shell: ``%%ai`` cells with the chat and the completion OpenAI providers.

Run by ``ipython`` (not python), as a user's cells run:
``ipython --quick tests/clients/jupyter_ai_calls.py CONFIG OUT``.
Each cell's displayed value (its MIME bundle and metadata, as a notebook would show it) is recorded.
"""

from __future__ import annotations

import json
from typing import Any

import calls
from IPython import get_ipython

conf = calls.config()
shell = get_ipython()
shell.run_line_magic("load_ext", "jupyter_ai_magics")
shell.run_line_magic("env", f"OPENAI_API_KEY={conf['api_key']}")
greedy = {"max_tokens": conf["max_tokens"], "temperature": 0}


def cell(line: str, body: str) -> calls.Call:
    def run() -> dict[str, Any]:
        result = shell.run_cell(f"%%ai {line}\n{body}")
        result.raise_error()
        data, metadata = shell.display_formatter.format(result.result)
        return {"data": data, "metadata": metadata}

    return run


def parameters(values: dict[str, Any]) -> str:
    """-m's JSON: %%ai splits its line on spaces, so the JSON has none."""
    return json.dumps(values, separators=(",", ":"))


def completion_cell() -> dict[str, Any]:
    # The completion provider finds the server through the environment, as its users configure it.
    shell.run_line_magic("env", f"OPENAI_API_BASE={conf['base_url']}")
    # Without the chat cell's exchange in its prompt: the answer is the prompt's own.
    shell.run_line_magic("ai", "reset")
    return cell(f"openai:{conf['model']} -f text -m {parameters(greedy)}", conf["prompt"])()


chat_parameters = parameters(greedy | {"openai_api_base": conf["base_url"]})
calls.write(
    calls.record(
        {
            "chat": cell(f"openai-chat-custom:{conf['model']} -f text -m {chat_parameters}", conf["question"]),
            "completion": completion_cell,
        }
    )
)
