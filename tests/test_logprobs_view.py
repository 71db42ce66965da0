"""``%%mlx --logprobs N``: the answer shaded token by token, its alternatives on hover, a plain fallback."""

from __future__ import annotations

import contextlib
import html.parser
import io
import json
import math

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from mlx_jupyter.kernel.logprobs_view import (
    TOKEN_CLASS,
    colour,
    label,
    logprobs_bundle,
    logprobs_table,
    percent,
    visible,
)
from mlx_jupyter.kernel.render import MLXResult, final_bundle
from tests.helpers import run_cell
from tests.models import TINY, TINY_A


def entry(token: str | bytes, p: float, *alternatives: tuple[str, float]) -> dict:
    raw = token if isinstance(token, bytes) else token.encode()
    top = [{"token": t, "bytes": list(t.encode()), "logprob": math.log(q)} for t, q in alternatives]
    return {"token": raw.decode(errors="replace"), "bytes": list(raw), "logprob": math.log(p), "top_logprobs": top}


class Spans(html.parser.HTMLParser):
    """The token spans of a view: their title (unescaped), style and text (line breaks as ``\\n``)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tokens: list[dict] = []
        self.tags: list[str] = []
        self._open = 0  # depth inside a token span

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == TOKEN_CLASS:
            self.tokens.append({"title": attrs["title"], "style": attrs["style"], "text": ""})
            self._open += 1
        elif self._open and tag == "br":
            self.tokens[-1]["text"] += "\n"
        elif self._open:
            self._open += 1

    def handle_endtag(self, tag):
        if self._open:
            self._open -= 1

    def handle_data(self, data):
        if self._open:
            self.tokens[-1]["text"] += data


def parse(markup: str) -> Spans:
    spans = Spans()
    spans.feed(markup)
    spans.close()
    return spans


HOSTILE = [
    entry("<script>", 0.5, ("<script>", 0.5), ("</div>", 0.2), ('"', 0.1)),
    entry("alert(1)</script>", 0.9, ("alert(1)</script>", 0.9)),
    entry("&amp;", 0.25, ("&amp;", 0.25), ("&", 0.2)),
    entry("\n", 0.75, ("\n", 0.75), ("\n\n", 0.1)),
    entry(" a\tb", 0.01, (" a\tb", 0.01)),
    entry(b"\xe2\x80", 0.3, ("\u2014", 0.6)),  # the first two bytes of an em dash
]


def test_hostile_tokens_are_escaped_newlines_break_lines_and_partial_utf8_shows_its_bytes():
    view = logprobs_bundle("<script>alert(1)</script>&amp;\n a\tb\ufffd", HOSTILE)["text/html"]
    spans = parse(view)
    assert "script" not in spans.tags, "a token became markup"
    assert "<script>" not in view and "&amp;amp;" in view
    shown = ["<script>", "alert(1)</script>", "&amp;", "\u21b5\n", " a\tb", "\\xe2\\x80"]
    assert [t["text"] for t in spans.tokens] == shown
    assert spans.tags.count("br") == 1
    # The tooltip: the token quoted with its probability, then the alternatives with theirs.
    assert spans.tokens[0]["title"].splitlines() == [
        '"<script>"  50.0%',
        "top 3:",
        '  50.0%  "<script>"',
        '  20.0%  "</div>"',
        '  10.0%  "\\""',
    ]
    assert spans.tokens[3]["title"].splitlines() == ['"\\n"  75.0%', "top 2:", '  75.0%  "\\n"', '  10.0%  "\\n\\n"']
    assert spans.tokens[5]["title"].splitlines()[0] == '"\\xe2\\x80"  30.0%'


def test_each_token_is_shaded_by_its_probability_and_the_legend_shows_the_scale():
    view = logprobs_bundle("x", HOSTILE)["text/html"]
    spans = parse(view)
    shades = [t["style"].split("background-color: ")[1].split(";")[0] for t in spans.tokens]
    assert shades == [colour(math.exp(e["logprob"])) for e in HOSTILE]
    assert len(set(shades)) == len(shades), "different probabilities got the same shade"
    assert colour(1.0) == "#fff7ec" and colour(0.0) == "#f46d43" and colour(2.0) == colour(1.0)
    for p in ("0%", "25.0%", "50.0%", "75.0%", "100.0%"):
        assert f">{p}</span>" in view, f"the legend lacks {p}"
    assert "top 3 alternatives" in view


def test_the_plain_fallback_is_the_answer_then_a_table_of_tokens_and_probabilities():
    text = "<script>alert(1)</script>&amp;\n a\tb"
    plain = logprobs_bundle(text, HOSTILE)["text/plain"]
    assert plain.startswith(text + "\n\n")
    header, *rows = plain[len(text) + 2 :].splitlines()
    assert header.split() == ["#", "p", "token", "alternatives"]
    assert len(rows) == len(HOSTILE)
    assert rows[0].split()[:3] == ["1", "50.0%", '"<script>"']
    assert '"</div>" 20.0%' in rows[0]
    assert rows[3].split()[:3] == ["4", "75.0%", '"\\n"'] and '"\\n\\n" 10.0%' in rows[3]
    assert rows[4].split()[:2] == ["5", "1.0%"] and '" a\\tb"' in rows[4]


def test_labels_and_probabilities_as_shown():
    assert label({"token": "x", "bytes": None}) == "x"
    assert label({"token": "\ufffd", "bytes": [0xF0, 0x9F]}) == "\\xf0\\x9f"
    assert label({"token": "é", "bytes": [0xC3, 0xA9]}) == "é"
    assert visible('a\x00\x7f\r"') == '"a\\x00\\x7f\\r\\""'
    shown = {1.0: "100.0%", 0.5: "50.0%", 0.00123: "0.1%", 0.00098: "0.098%", 0.0000123: "0.0012%", 0.0: "0%"}
    assert {p: percent(p) for p in shown} == shown


def test_a_result_with_logprobs_renders_the_view_in_every_format_and_one_without_renders_as_before():
    for fmt in ("markdown", "text", "code", "json", "html"):
        result = MLXResult(text="x", model=TINY, finish_reason="stop", format=fmt, value="x", logprobs=HOSTILE)
        assert final_bundle(result) == logprobs_bundle("x", HOSTILE)
        assert result._repr_html_() == final_bundle(result)["text/html"]
    plain = MLXResult(text="*x*", model=TINY, finish_reason="stop", format="markdown", value="*x*")
    assert final_bundle(plain) == {"text/markdown": "*x*", "text/plain": "*x*"}
    assert plain._repr_html_() is None


def test_a_kernel_shows_logprobs_token_by_token_and_the_saved_notebook_keeps_the_view(tmp_path):
    cells = [
        "%load_ext mlx_jupyter\n%config MLXMagics.server = 'local'\n%config MLXMagics.idle_timeout = 0",
        f"%%mlx -m {TINY} --raw --max-tokens 12 --logprobs 3 -o shaded\nHello",
        f"%%mlx -m {TINY} --raw --max-tokens 12 -o plain\nHello",
        "import json\nprint(json.dumps({'usage': shaded.usage, 'text': shaded.text, 'logprobs': shaded.logprobs,"
        " 'plain': [plain.text, plain.logprobs]}))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    try:
        NotebookClient(nb, km=km, timeout=180).execute()
    finally:
        km.shutdown_kernel(now=False)
    nbformat.write(nb, tmp_path / "saved.ipynb")
    saved = nbformat.read(tmp_path / "saved.ipynb", as_version=4)
    _, shaded_cell, plain_cell, check_cell = saved.cells
    kept = json.loads(check_cell.outputs[0].text)
    entries, tokens = kept["logprobs"], kept["usage"]["completion_tokens"]

    # The result keeps one entry per answer token, in order, each with its 3 alternatives.
    assert tokens == 12 and len(entries) == tokens
    assert all(len(e["top_logprobs"]) == 3 for e in entries)
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", errors="replace") == kept["text"]
    # The answer's display, as saved: the token view (the streamed text it replaced is gone) and the footer.
    view, footer = shaded_cell.outputs
    assert set(view.data) == {"text/html", "text/plain"}
    spans = parse(view.data["text/html"]).tokens
    assert len(spans) == tokens, "not one span per completion token"
    for span, e in zip(spans, entries, strict=True):
        p = math.exp(e["logprob"])
        assert f"background-color: {colour(p)}" in span["style"]
        assert span["title"].splitlines()[:2] == [f"{visible(label(e))}  {percent(p)}", "top 3:"]
    assert view.data["text/plain"].startswith(kept["text"] + "\n\n")
    assert len(view.data["text/plain"].splitlines()) >= tokens + 1, "no table of tokens in the plain fallback"
    assert "12 tokens" in footer.data["text/plain"]
    # Without --logprobs: rendered as before, nothing kept.
    plain_text, plain_logprobs = kept["plain"]
    assert plain_logprobs is None and plain_text == kept["text"]
    assert plain_cell.outputs[0].data == {"text/markdown": plain_text, "text/plain": plain_text}


def test_through_a_server_the_result_keeps_the_same_logprobs_as_from_an_engine_in_the_kernel(
    shell, live
):  # shell first: it checks for leftover processes after the server stops
    shell.run_line_magic("config", f"MLXMagics.token = {live.token!r}")
    shell.run_line_magic("config", f"MLXMagics.server = {live.url!r}")
    result, out = run_cell(shell, f"%%mlx -m {TINY_A} --raw --max-tokens 8 --logprobs 2 -o remote\nHello")
    assert result.success, result.error_in_exec
    assert len(parse(out.outputs[-2].data["text/html"]).tokens) == 8
    shell.run_line_magic("config", "MLXMagics.server = 'local'")  # the same weights, as builtin:tiny
    result, _ = run_cell(shell, f"%%mlx -m {TINY} --raw --max-tokens 8 --logprobs 2 -o here\nHello")
    assert result.success, result.error_in_exec
    remote, here = shell.user_ns["remote"].logprobs, shell.user_ns["here"].logprobs
    assert len(remote) == len(here) == 8
    for a, b in zip(remote, here, strict=True):
        assert (a["token"], a["bytes"]) == (b["token"], b["bytes"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
        assert [t["bytes"] for t in a["top_logprobs"]] == [t["bytes"] for t in b["top_logprobs"]]


def test_in_a_terminal_the_table_of_tokens_follows_the_answer(shell):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = shell.run_cell(f"%%mlx -m {TINY} --raw --max-tokens 4 --logprobs 1 -f text\nHello")
    assert result.success, result.error_in_exec
    answer = shell.user_ns["_mlx"]
    printed = stdout.getvalue()
    assert answer.logprobs is not None and len(answer.logprobs) == 4
    table = logprobs_table(answer.logprobs)
    assert f"{answer.text}\n{table}\n[{answer.footer()}]" in printed
    assert len(table.splitlines()) == 5


def test_logprobs_0_asks_for_each_tokens_probability_without_alternatives(shell):
    magics = shell.magics_manager.registry["MLXMagics"]

    def request(*options: str) -> dict:
        return magics._request(magics.mlx_cell.parser.parse_args(list(options)), "x")

    assert request("--logprobs", "0").items() >= {"logprobs": True, "top_logprobs": 0}.items()
    assert request("--logprobs", "3")["logprobs"] is True
    assert "logprobs" not in request() and "top_logprobs" not in request()
    one_each = [entry("a", 0.5), entry("b", 0.25)]
    assert "hover a token for its probability" in logprobs_bundle("ab", one_each)["text/html"]
