"""The ``%%mlx --logprobs N`` view: each token shaded by its probability, its alternatives on hover, a plain table."""

from __future__ import annotations

import html
import math
from typing import Any

# Sequential scale, light for likely tokens and strong for unlikely ones, so the eye lands on
# the tokens the model hesitated over; readable for red-green colour blindness.
LIKELY = (0xFF, 0xF7, 0xEC)
UNLIKELY = (0xF4, 0x6D, 0x43)
LEGEND_STEPS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOKEN_CLASS = "mlx-logprob-token"
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"'}


def probability(logprob: float | None) -> float:
    """``exp(logprob)``; a missing or non-finite logprob counts as probability 0."""
    if logprob is None or not math.isfinite(logprob):
        return 0.0
    return min(1.0, math.exp(logprob))


def percent(p: float) -> str:
    """``92.1%``, with two significant digits below 0.1% (a random model's tokens live there)."""
    if p == 0:
        return "0%"
    return f"{100 * p:.1f}%" if p >= 0.001 else f"{100 * p:.2g}%"


def label(entry: dict[str, Any]) -> str:
    """The token's text, from its bytes where given; bytes that are not whole UTF-8 show as ``\\xe2``."""
    raw = entry.get("bytes")
    if isinstance(raw, list):
        return bytes(raw).decode("utf-8", errors="backslashreplace")
    return str(entry.get("token") or "")


def visible(text: str) -> str:
    """``text`` quoted, with quotes, newlines, tabs and other control characters written out (tooltips, tables)."""
    out = "".join(_ESCAPES.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in text)
    return f'"{out}"'


def colour(p: float) -> str:
    """The background of a token of probability ``p``: ``LIKELY`` at 1, ``UNLIKELY`` at 0."""
    p = min(1.0, max(0.0, p))
    rgb = (round(u + (v - u) * p) for u, v in zip(UNLIKELY, LIKELY, strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def tooltip(entry: dict[str, Any]) -> str:
    """The hover text of one token: its probability, then its top alternatives, most likely first."""
    lines = [f"{visible(label(entry))}  {percent(probability(entry.get('logprob')))}"]
    alternatives = entry.get("top_logprobs") or []
    if alternatives:
        lines.append(f"top {len(alternatives)}:")
        lines += [f"{percent(probability(a.get('logprob'))):>7}  {visible(label(a))}" for a in alternatives]
    return "\n".join(lines)


def _span_text(text: str) -> str:
    """A token's text as HTML: escaped, newlines as a visible mark and a line break."""
    if not text:
        return "\u2205"  # an empty token (an end token) stays hoverable
    parts = []
    for c in text:
        if c == "\n":
            parts.append("\u21b5<br>")
        elif c == "\t" or (ord(c) >= 32 and ord(c) != 127):
            parts.append(html.escape(c))
        else:
            parts.append(f"\\x{ord(c):02x}")
    return "".join(parts)


def token_span(entry: dict[str, Any]) -> str:
    # A faint right border marks where one token ends and the next begins.
    style = (
        f"background-color: {colour(probability(entry.get('logprob')))}; color: #000; border-right: 1px solid #00000026"
    )
    title = html.escape(tooltip(entry), quote=True)
    return f'<span class="{TOKEN_CLASS}" title="{title}" style="{style}">{_span_text(label(entry))}</span>'


def legend(top: int) -> str:
    steps = "".join(
        f'<span style="background-color: {colour(p)}; color: #000; padding: 0 0.5em">{percent(p)}</span>'
        for p in LEGEND_STEPS
    )
    hint = f"; hover a token for its top {top} alternatives" if top else "; hover a token for its probability"
    return f'<div style="font-size: 0.85em; opacity: 0.8; margin-bottom: 0.4em">probability: {steps}{hint}</div>'


def logprobs_html(entries: list[dict[str, Any]]) -> str:
    """The answer as one span per token (no whitespace between them: the spans are the text)."""
    top = max((len(e.get("top_logprobs") or []) for e in entries), default=0)
    spans = "".join(token_span(e) for e in entries)
    body = f'<div style="white-space: pre-wrap; line-height: 1.6">{spans}</div>'
    return f'<div class="mlx-logprobs">{legend(top)}{body}</div>'


def logprobs_table(entries: list[dict[str, Any]]) -> str:
    """One line per token: position, probability, token, alternatives."""
    tokens = [visible(label(e)) for e in entries]
    width = max((len(t) for t in tokens), default=5)
    lines = [f"{'#':>4}  {'p':>7}  {'token':<{width}}  alternatives"]
    for i, (entry, token) in enumerate(zip(entries, tokens, strict=True), 1):
        alternatives = " · ".join(
            f"{visible(label(a))} {percent(probability(a.get('logprob')))}" for a in entry.get("top_logprobs") or []
        )
        p = percent(probability(entry.get("logprob")))
        lines.append(f"{i:>4}  {p:>7}  {token:<{width}}  {alternatives}".rstrip())
    return "\n".join(lines)


def logprobs_bundle(text: str, entries: list[dict[str, Any]]) -> dict[str, str]:
    """The display bundle of an answer with its log probabilities: the HTML view and its plain fallback."""
    return {"text/html": logprobs_html(entries), "text/plain": f"{text}\n\n{logprobs_table(entries)}"}
