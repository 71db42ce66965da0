"""What the magics show: the live answer, its final formats and footer, the model and status tables."""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from IPython.core.displaypub import DisplayPublisher
from IPython.display import DisplayHandle, display

from mlx_jupyter.kernel.client import MLXClient
from mlx_jupyter.kernel.labels import countdown_text, state_label
from mlx_jupyter.kernel.logprobs_view import logprobs_bundle, logprobs_html, logprobs_table
from mlx_jupyter.kernel.markdown import protect_identifiers

FORMATS = ("markdown", "text", "code", "json", "html")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:\n```|\Z)", re.DOTALL)


@dataclass
class MLXResult:
    """One answer of ``%%mlx``, stored in ``_mlx`` (and ``-o VAR``).

    Args:
        text: the whole answer.
        model: the model that wrote it.
        finish_reason: ``stop``, ``length`` or ``cancelled`` (interrupted).
        usage: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``.
        timings: ``ttft_s``, ``generation_tps``, ``load_s``, ... as the host reported them.
        format: the format it was rendered in.
        value: the parsed object for ``json``, the code for ``code``, else the text.
        prompt: the prompt as sent (after interpolation).
        logprobs: with ``--logprobs N``, one entry per answer token: ``token``, ``bytes``,
            ``logprob`` and its ``top_logprobs`` (most likely first); None when not asked.
    """

    text: str
    model: str
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    format: str = "markdown"
    value: Any = None
    prompt: str = ""
    logprobs: list[dict[str, Any]] | None = None

    @property
    def tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or 0)

    @property
    def tokens_per_s(self) -> float | None:
        return self.timings.get("generation_tps")

    @property
    def ttft_s(self) -> float | None:
        return self.timings.get("ttft_s")

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "ttft_s": self.ttft_s,
            "finish_reason": self.finish_reason,
        }

    def footer(self) -> str:
        parts = [self.model, f"{self.tokens} tokens"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        if self.ttft_s is not None:
            parts.append(f"first token {1000 * self.ttft_s:.0f} ms")
        if self.timings.get("load_s"):
            parts.append(f"model loaded in {self.timings['load_s']:.1f} s")
        if self.finish_reason != "stop":
            parts.append({"length": "stopped at max tokens", "cancelled": "interrupted"}.get(self.finish_reason, ""))
        return " · ".join(p for p in parts if p)

    def __str__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return protect_identifiers(self.text)

    def _repr_html_(self) -> str | None:
        return logprobs_html(self.logprobs) if self.logprobs is not None else None


def extract_code(text: str) -> tuple[str, str]:
    """The first fenced code block of ``text`` (the whole text if none) and its language."""
    match = _FENCE.search(text)
    if match is None:
        return text.strip(), ""
    return match.group(2).strip(), match.group(1)


def code_to_insert(text: str) -> str | None:
    """The code ``-f code`` puts in a new cell: the first fenced block, else the whole answer if it
    is Python that does something; None for prose (an answer of bare words parses as names)."""
    if _FENCE.search(text):
        return extract_code(text)[0] or None
    code = text.strip()
    try:
        statements = ast.parse(code).body
    except SyntaxError:
        return None
    if all(isinstance(s, ast.Expr) and isinstance(s.value, (ast.Name, ast.Constant)) for s in statements):
        return None
    return code


def parse_json(text: str) -> Any:
    """The JSON value in ``text`` (fences allowed); raises ValueError with the parser's reason."""
    code, _ = extract_code(text)
    return json.loads(code)


class LiveAnswer:
    """The answer as it streams: display-handle updates at most ``rate`` per second.

    Every update happens on the thread running the cell (ipykernel routes output by the
    cell's thread), and the last text always lands in ``finish``. In a terminal, where a
    display cannot be updated in place, the chunks are printed as they come.
    """

    def __init__(self, fmt: str, live: bool, rate: float) -> None:
        self.fmt = fmt
        self.live = live
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.terminal = type(_display_pub()) is DisplayPublisher
        self.handle: DisplayHandle | None = None
        self.last_update = 0.0
        self.printed = 0

    def update(self, text: str, force: bool = False) -> None:
        """Show ``text`` now, unless the last update was too recent (``force`` skips that check)."""
        if not self.live and not force:
            return
        if self.terminal:
            sys.stdout.write(text[self.printed :])
            sys.stdout.flush()
            self.printed = len(text)
            return
        now = time.monotonic()
        if self.handle is not None and now - self.last_update < self.interval and not force:
            return
        self.last_update = now
        bundle = {"text/plain": text}
        if self.fmt == "markdown":
            bundle["text/markdown"] = protect_identifiers(text)
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)

    def finish(self, result: MLXResult, note: str = "") -> None:
        """The final rendering in the result's format, with its metadata, and the footer line."""
        footer = result.footer() + (f" · {note}" if note else "")
        if self.terminal:
            if self.printed:
                print()
            # What streamed is the answer as text; print again only what differs from it.
            final = str(result.value or "")
            if result.format == "json" and result.value is not result.text:  # parsed, not the text fallback
                final = json.dumps(result.value, indent=2)
            if not self.printed:
                print(final if result.format in ("json", "code") else result.text)
            elif result.format in ("json", "code") and final.strip() != result.text.strip():
                print(final)
            if result.logprobs is not None:
                print(logprobs_table(result.logprobs))
            print(f"[{footer}]")
            return
        bundle = final_bundle(result)
        metadata = {"mlx": result.metadata()}
        if self.handle is None:
            display(bundle, raw=True, metadata=metadata)
        else:
            self.handle.update(bundle, raw=True, metadata=metadata)
        html = f'<div style="font-size: 0.85em; opacity: 0.7">{_escape(footer)}</div>'
        display({"text/plain": footer, "text/html": html}, raw=True, metadata=metadata)


def final_bundle(result: MLXResult) -> dict[str, Any]:
    text = result.text
    if result.logprobs is not None:  # the token view replaces the format's rendering; value still follows it
        return logprobs_bundle(text, result.logprobs)
    if result.format == "markdown":
        return {"text/markdown": protect_identifiers(text), "text/plain": text}
    if result.format == "html":
        return {"text/html": text, "text/plain": text}
    if result.format == "code":
        code, lang = extract_code(text)
        return {"text/markdown": f"```{lang}\n{code}\n```", "text/plain": code}
    if result.format == "json" and not isinstance(result.value, str):
        return {"application/json": result.value, "text/plain": json.dumps(result.value, indent=2)}
    return {"text/plain": text}


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _display_pub() -> Any:
    from IPython.core.getipython import get_ipython

    shell = get_ipython()
    return shell.display_pub if shell is not None else None


# -- tables -------------------------------------------------------------------------


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def megabytes(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


def loaded_table(models: dict[str, Any]) -> str:
    now = models.get("server_time") or time.time()
    rows = [
        [
            m["id"],
            state_label(m),
            str(m.get("pid") or "-"),
            megabytes(m["memory_bytes"]) if m.get("memory_bytes") else "-",  # none yet while loading
            countdown_text(m, now),
        ]
        for m in models.get("models", [])
    ]
    if not rows:
        return "no model loaded"
    return table(rows, ["model", "state", "pid", "memory", "idle"])


def available_table(available: list[dict[str, Any]]) -> str:
    rows = [[m["id"], m["source"], megabytes(m.get("size_bytes"))] for m in available]
    return table(rows, ["model", "source", "size"]) if rows else "no loadable model found"


def health_line(client: MLXClient) -> str:
    """The first line of ``%mlx status``: the host's health and version (the dashboard shows the models)."""
    health = client.health()
    line = f"{client.host}: {health.get('status')}, mlx_jupyter {health.get('version')}"
    if health.get("degraded_reason"):
        line += f" ({health['degraded_reason']})"
    return line
