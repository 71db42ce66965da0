"""The %%mlx and %mlx magics in a bare IPython InteractiveShell, served by a kernel-hosted engine."""

from __future__ import annotations

import _thread
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output
from markdown_it import MarkdownIt
from traitlets import TraitError

from mlx_jupyter.discovery import ENV_TOKEN, ENV_URL
from mlx_jupyter.engine.models import DEFAULT_MODEL
from mlx_jupyter.kernel import client as mlx_client
from mlx_jupyter.kernel.arguments import interpolate
from mlx_jupyter.kernel.client import ClientError, LocalClient, UnknownModelError
from mlx_jupyter.kernel.magics import MLXMagics
from mlx_jupyter.kernel.render import LiveAnswer, MLXResult, code_to_insert, extract_code, final_bundle
from tests.helpers import run_cell as run
from tests.helpers import wait_for
from tests.models import LONG, PYDOC, TINY, TINY_A, TINY_B


def engine() -> LocalClient:
    client = mlx_client.get_client()
    assert isinstance(client, LocalClient)
    return client


def test_a_cell_streams_display_updates_then_the_final_answer_with_metadata(shell):
    shell.run_line_magic("config", "MLXMagics.updates_per_second = 0")  # every chunk updates the display
    result, out = run(shell, f"%%mlx -m {TINY} --raw --max-tokens 12 -o answer\nHello")
    assert result.success, result.error_in_exec
    answer = shell.user_ns["answer"]
    assert shell.user_ns["_mlx"] is answer
    assert isinstance(answer, MLXResult) and answer.model == TINY and answer.tokens == 12
    assert answer.finish_reason == "length" and answer.ttft_s is not None and answer.tokens_per_s

    first, *updates, footer = out.outputs
    assert "text/markdown" in first.data
    assert len(updates) >= 2, "the answer should have been updated while it streamed"
    final = updates[-1]
    assert final.data["text/markdown"] == answer.text
    assert final.metadata["mlx"] == {
        "model": TINY,
        "tokens": 12,
        "tokens_per_s": answer.tokens_per_s,
        "ttft_s": answer.ttft_s,
        "finish_reason": "length",
    }
    assert f"{TINY} · 12 tokens" in footer.data["text/plain"]
    assert "first token" in footer.data["text/plain"]


def test_display_updates_are_throttled(shell):
    shell.run_line_magic("config", "MLXMagics.updates_per_second = 0.001")  # one per 1000 s
    result, out = run(shell, f"%%mlx -m {TINY} --raw --max-tokens 40\nHello")
    assert result.success, result.error_in_exec
    # The first chunk opens the display, the throttle holds back every other chunk,
    # and the final rendering still replaces it: 40 tokens, three outputs.
    assert len(out.outputs) == 3
    assert out.outputs[1].data["text/markdown"] == shell.user_ns["_mlx"].text


def test_no_stream_shows_only_the_final_answer(shell):
    result, out = run(shell, f"%%mlx -m {TINY} --raw --max-tokens 12 --no-stream -f text\nHello")
    assert result.success, result.error_in_exec
    answer, _footer = out.outputs
    assert answer.data == {"text/plain": shell.user_ns["_mlx"].text}


def test_variables_are_interpolated_and_unknown_names_left_as_written(shell):
    shell.user_ns["topic"] = "tea"
    shell.user_ns["cfg"] = type("Cfg", (), {"lang": "French"})()
    cell = f"%%mlx -m {TINY} --max-tokens 2\nTell me about {{topic}} in {{cfg.lang}}, {{nope}} {{{{x}}}}"
    result, _ = run(shell, cell)
    assert result.success, result.error_in_exec
    assert shell.user_ns["_mlx"].prompt == "Tell me about tea in French, {nope} {x}"
    run(shell, f"%%mlx -m {TINY} --max-tokens 2 --no-interpolate\nabout {{topic}}")
    assert shell.user_ns["_mlx"].prompt == "about {topic}"


def test_interpolate_leaves_json_and_missing_attributes_alone():
    ns = {"a": 1, "obj": object()}
    assert interpolate('{"a": 1} {a} {obj.missing} {a.real}', ns) == '{"a": 1} 1 {obj.missing} 1'


def test_interpolate_sends_nested_braces_of_json_and_code_as_written():
    ns = {"a": 1}
    for text in ('{"a": {"b": [1, {"c": 2}]}}', "if (a) { if (b) { c(); }}", "{{ a }} is Jinja", "{{}}"):
        assert interpolate(text, ns) == text
    assert interpolate("{{a}} is {a}", ns) == "{a} is 1"


def test_code_format_does_not_insert_prose_as_a_code_cell(shell):
    # builtin:tiny's answer is random words: no fenced block, not Python.
    result, out = run(shell, f"%%mlx -m {TINY} --raw --max-tokens 8 -f code\nHello")
    assert result.success, result.error_in_exec
    answer = shell.user_ns["_mlx"]
    assert answer.text.strip() and getattr(shell, "rl_next_input", None) is None
    assert "no code" in out.outputs[-1].data["text/plain"]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Here:\n```python\nprint(1)\n```\nDone", "print(1)"),
        ("```bash\nls -l\n```", "ls -l"),
        ("x = [i * i for i in range(3)]", "x = [i * i for i in range(3)]"),
        ("The with statement wraps a block.", None),
        ("", None),
    ],
)
def test_the_code_to_insert_is_a_fenced_block_or_an_answer_that_is_python(text, code):
    assert code_to_insert(text) == code


def test_json_that_falls_back_to_text_shows_the_answer_once_in_a_terminal(shell):
    stdout = RecordedWrites()
    with contextlib.redirect_stdout(stdout):
        result = shell.run_cell(f"%%mlx -m {TINY} --raw --max-tokens 12 -f json\nHello")
    assert result.success, result.error_in_exec
    answer = shell.user_ns["_mlx"]
    assert answer.text.strip() and answer.value == answer.text
    assert stdout.getvalue().count(answer.text) == 1, stdout.getvalue()
    assert "not valid JSON" in stdout.getvalue()


def test_json_format_renders_parsed_json_and_says_when_the_answer_is_not_json(shell):
    result, out = run(shell, f"%%mlx -m {TINY} --raw --max-tokens 8 -f json\nHello")
    assert result.success, result.error_in_exec
    assert "not valid JSON" in out.outputs[-1].data["text/plain"]
    parsed = MLXResult(text='```json\n{"a": [1, 2]}\n```', model=TINY, finish_reason="stop", format="json")
    parsed.value = json.loads(extract_code(parsed.text)[0])
    assert final_bundle(parsed)["application/json"] == {"a": [1, 2]}


def test_formats_map_to_mime_types():
    def bundle(fmt: str, text: str) -> dict:
        return final_bundle(MLXResult(text=text, model=TINY, finish_reason="stop", format=fmt, value=text))

    assert bundle("html", "<b>x</b>") == {"text/html": "<b>x</b>", "text/plain": "<b>x</b>"}
    assert bundle("text", "*x*") == {"text/plain": "*x*"}
    assert bundle("markdown", "*x*")["text/markdown"] == "*x*"
    assert bundle("code", "Here:\n```python\nprint(1)\n```\nDone")["text/markdown"] == "```python\nprint(1)\n```"


def test_markdown_keeps_python_identifiers_outside_code_intact():
    text = (
        "Override __init__ and accept *args, **kwargs; object.__init__() runs first.\n\n"
        "**Note:** use *emphasis* and `__all__`.\n\n"
        "```python\ndef f(*args, **kwargs):\n    return __name__\n```"
    )
    bundle = final_bundle(MLXResult(text=text, model=TINY, finish_reason="stop", format="markdown", value=text))
    html = MarkdownIt("commonmark").render(bundle["text/markdown"])

    for name in ("__init__", "*args", "**kwargs", "object.__init__()", "__all__"):
        assert f"<code>{name}</code>" in html, html
    assert "<strong>init</strong>" not in html
    # The answer's own emphasis and its code block stay as written.
    assert "<strong>Note:</strong>" in html and "<em>emphasis</em>" in html
    assert "def f(*args, **kwargs):\n    return __name__" in html
    assert bundle["text/plain"] == text


def test_the_streamed_markdown_keeps_identifiers_intact_too(shell):
    with capture_output() as captured:
        LiveAnswer("markdown", True, 0).update("see __init__ and **kwargs")
    assert captured.outputs[0].data["text/markdown"] == "see `__init__` and `**kwargs`"


def test_a_completion_model_gets_the_cell_as_a_raw_prompt_and_a_chat_model_as_a_message(shell):
    def prompt_tokens(cell: str) -> int:
        result, _ = run(shell, cell)
        assert result.success, result.error_in_exec
        return shell.user_ns["_mlx"].usage["prompt_tokens"]

    # builtin:pydoc is marked a completion model: the chat template's tokens are not added.
    assert prompt_tokens(f"%%mlx -m {PYDOC} --max-tokens 1\nThe for statement") == prompt_tokens(
        f"%%mlx -m {PYDOC} --raw --max-tokens 1\nThe for statement"
    )
    assert prompt_tokens(f"%%mlx -m {TINY} --max-tokens 1\nThe for statement") > prompt_tokens(
        f"%%mlx -m {TINY} --raw --max-tokens 1\nThe for statement"
    )


def test_chat_keeps_the_conversation_until_reset(shell):
    magics = shell.magics_manager.registry["MLXMagics"]
    run(shell, f'%%mlx -m {TINY} --max-tokens 4 --chat --system "Be brief."\nMy name is Ada.')
    first = shell.user_ns["_mlx"]
    run(shell, f"%%mlx -m {TINY} --max-tokens 4 --chat\nWhat is my name?")
    second = shell.user_ns["_mlx"]
    assert [m["role"] for m in magics.history] == ["user", "assistant", "user", "assistant"]
    assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"] + 4, "history was not sent"
    # Same question with max_history = 0: the system message and the question, no history.
    shell.run_line_magic("config", "MLXMagics.max_history = 0")
    run(shell, f"%%mlx -m {TINY} --max-tokens 4 --chat\nWhat is my name?")
    assert shell.user_ns["_mlx"].usage["prompt_tokens"] < second.usage["prompt_tokens"], "max_history was ignored"
    shell.run_line_magic("config", "MLXMagics.max_history = 3")  # cuts the first answer from its question
    run(shell, f"%%mlx -m {TINY} --max-tokens 4 --chat\nAnd yours?")
    sent = magics._request(magics.mlx_cell.parser.parse_args(["--chat"]), "Next?")["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"], "history must start with a question"
    run(shell, "%mlx reset")
    assert magics.history == [] and magics.chat_system is None


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("%%mlx --max-tokens many\nhi", "invalid int value"),
        ("%%mlx -f pdf\nhi", "invalid choice"),
        ("%%mlx --bogus\nhi", "unrecognized arguments"),
        ('%%mlx --system "unclosed\nhi', "cannot parse the options"),
        ("%%mlx\n   ", "the cell is empty"),
        ("%%mlx --chat --raw\nhi", "do not go together"),
        ("%%mlx -o 2x\nhi", "not a variable name"),
        ("%%mlx -o a.b\nhi", "not a variable name"),
        ("%mlx frobnicate", "invalid choice"),
        ("%mlx load a b", "unrecognized arguments"),
        ("%mlx unload --keep-alive 1m", "unrecognized arguments"),
    ],
)
def test_bad_options_are_one_usage_error_and_the_kernel_keeps_working(shell, cell, message):
    result, _ = run(shell, cell)
    assert isinstance(result.error_in_exec, UsageError)
    assert message in str(result.error_in_exec)
    assert run(shell, "1 + 1")[0].result == 2


@pytest.mark.parametrize("cell", ["%%mlx --help", "%%mlx -h\n", "%%mlx -m x --help\n  \n"])
def test_help_with_an_empty_cell_body_shows_the_help(shell, cell):
    result, out = run(shell, cell)
    assert result.success, result.error_in_exec
    assert "--max-tokens" in out.stdout and "--system" in out.stdout


def test_an_empty_cell_body_without_help_is_still_a_usage_error(shell):
    result, _ = run(shell, "%%mlx -m x\n")
    assert isinstance(result.error_in_exec, UsageError) and "empty" in str(result.error_in_exec)


def test_help_prints_and_does_not_exit(shell):
    result, out = run(shell, "%%mlx --help\nignored")
    assert result.success and "--max-tokens" in out.stdout and "--keep-alive" in out.stdout
    result, out = run(shell, "%mlx help")
    assert result.success and "%mlx load" in out.stdout
    result, out = run(shell, "%mlx load --help")
    assert result.success and "--keep-alive DUR" in out.stdout
    assert engine().manager.status() == [], "--help loaded a model"


def test_the_magics_docstrings_list_their_options_for_question_mark_help(shell):
    cell_doc, line_doc = shell.find_cell_magic("mlx").__doc__, shell.find_line_magic("mlx").__doc__
    for option in ("--model", "--max-tokens", "--temperature", "--chat", "--format", "--keep-alive", "--no-stream"):
        assert option in cell_doc, option
    for command in ("list", "load", "unload", "status", "reset", "version", "help"):
        assert f"%mlx {command}" in line_doc, command


def test_each_magics_instance_owns_its_client_and_get_client_gives_the_shells(shell):
    magics = shell.magics_manager.registry["MLXMagics"]
    assert mlx_client.get_client() is magics.client
    other = MLXMagics(None, server="local", idle_timeout=0)
    try:
        mine, theirs = magics.client, other.client
        assert isinstance(theirs, LocalClient) and theirs is not mine
        other.server = "auto"  # another instance's setting: its own client goes, the shell's stays
        assert other.client is not theirs and magics.client is mine
        shell.run_line_magic("config", "MLXMagics.max_loaded_models = 3")
        assert mine.settings.max_loaded_models == 3 and other.max_loaded_models == 2
    finally:
        other.close()


def test_an_unknown_model_is_one_line_that_lists_the_available_ones(shell):
    result, out = run(shell, "%%mlx -m no-such-model\nhi")
    assert isinstance(result.error_in_exec, UnknownModelError)
    assert "unknown model 'no-such-model'" in str(result.error_in_exec)
    assert "available: builtin:pydoc, builtin:pydoc-chat, builtin:tiny" in str(result.error_in_exec)
    assert len(out.stdout.strip().splitlines()) == 1, out.stdout
    assert "Traceback" not in out.stdout
    result, out = run(shell, "%mlx load no-such-model")
    assert "available: builtin:pydoc, builtin:pydoc-chat, builtin:tiny" in str(result.error_in_exec)
    result, out = run(shell, "%mlx unload no-such-model")
    assert str(result.error_in_exec) == "model 'no-such-model' is not loaded; loaded: none"


def test_bad_sampling_values_are_one_line_errors(shell):
    result, out = run(shell, f"%%mlx -m {TINY} --temperature -3\nhi")
    assert isinstance(result.error_in_exec, ClientError) and "temperature" in str(result.error_in_exec)
    assert len(out.stdout.strip().splitlines()) == 1
    result, out = run(shell, f"%%mlx -m {TINY} --max-tokens 0\nhi")  # not silently the default 512
    assert isinstance(result.error_in_exec, ClientError) and "max_tokens" in str(result.error_in_exec)
    assert len(out.stdout.strip().splitlines()) == 1


def test_penalty_and_sampling_options_reach_the_worker(shell):
    def answer(options: str) -> str:
        result, _ = run(shell, f"%%mlx -m {TINY} --raw --max-tokens 16 -f text {options}\nThe Zen of Python")
        assert result.success, result.error_in_exec
        return shell.user_ns["_mlx"].text

    plain = answer("")
    for penalty in ("--repetition-penalty 2", "--presence-penalty 2", "--frequency-penalty 2"):
        assert answer(penalty) != plain, penalty
    assert answer("--temperature 5 --top-k 1") == plain == answer("--temperature 5 --min-p 1")


def test_line_magics_load_list_status_unload(shell):
    result, out = run(shell, "%mlx load --keep-alive 10m")  # no id: the engine's default model
    assert result.success, result.error_in_exec
    assert f"{DEFAULT_MODEL} loaded (pid" in out.stdout
    out = run(shell, "%mlx list")[1].stdout
    assert re.search(r"unloads in (10:00|9:\d\d)", out), out  # the countdown from the 10 min keep-alive
    assert "available:" in out and "builtin" in out
    result, captured = run(shell, "%mlx status")
    assert result.success, result.error_in_exec
    assert captured.stdout.startswith("this kernel (local engine): ok, mlx_jupyter ")
    (dashboard,) = [o.data for o in captured.outputs]  # the dashboard: a widget view plus its snapshots
    assert "application/vnd.jupyter.widget-view+json" in dashboard
    assert "this kernel (local engine)" in dashboard["text/plain"] and DEFAULT_MODEL in dashboard["text/plain"]
    result, out = run(shell, "%mlx unload")
    assert result.success and f"{DEFAULT_MODEL} unloaded" in out.stdout
    assert "no model loaded" in run(shell, "%mlx list")[1].stdout
    assert run(shell, "%mlx version")[1].stdout.startswith("mlx_jupyter ")


def test_config_traits_reach_the_running_local_engine(shell):
    run(shell, f"%mlx load {TINY}")
    shell.run_line_magic("config", "MLXMagics.max_loaded_models = 3")
    shell.run_line_magic("config", "MLXMagics.default_model = 'tiny-a'")
    manager = engine().manager
    assert manager.settings.max_loaded_models == 3 and manager.default_model == TINY_A
    shell.run_line_magic("config", "MLXMagics.default_model = ''")  # back to the engine's own default
    assert manager.default_model == DEFAULT_MODEL


def test_a_setting_the_engine_would_refuse_is_refused_by_config_and_the_engine_keeps_working(shell):
    magics = shell.magics_manager.registry["MLXMagics"]
    for name, value in [("max_loaded_models", 0), ("idle_timeout", -1.0), ("memory_limit", -1), ("max_tokens", 0)]:
        with pytest.raises(TraitError, match="less than"):
            setattr(magics, name, value)
    result, _ = run(shell, f"%%mlx -m {TINY} --max-tokens 2\nhi")
    assert result.success, result.error_in_exec


def test_model_dirs_trait_makes_folder_models_loadable(shell, model_dir):
    shell.run_line_magic("config", f"MLXMagics.model_dirs = [{str(model_dir)!r}]")
    shell.run_line_magic("config", "MLXMagics.default_model = 'tiny-b'")
    result, _ = run(shell, "%%mlx --max-tokens 3\nhi")
    assert result.success, result.error_in_exec
    assert shell.user_ns["_mlx"].model == TINY_B


def test_an_interrupt_cancels_the_generation_and_keeps_the_partial_answer(shell):
    shell.run_line_magic("config", "MLXMagics.updates_per_second = 0")  # each chunk is shown at once
    client = engine()
    client.load(TINY)
    manager = client.manager

    with capture_output() as out:

        def interrupt_once_some_text_is_shown():
            if wait_for(lambda: len(out.outputs) >= 3, timeout=60):
                _thread.interrupt_main()

        threading.Thread(target=interrupt_once_some_text_is_shown, daemon=True).start()
        result = shell.run_cell(f"%%mlx -m {TINY} --raw --max-tokens {LONG}\nHello")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert wait_for(lambda: manager.status()[0].active_requests == 0, timeout=5), "the generation was not cancelled"
    partial = shell.user_ns["_mlx"]
    assert partial.finish_reason == "cancelled" and partial.text
    # The footer names the model and counts the tokens shown; "interrupted" is said once, no traceback.
    footer = out.outputs[-1].data["text/plain"]
    assert footer.startswith(f"{TINY} · {partial.tokens} tokens") and partial.tokens >= 2, footer
    shown = out.stdout + "".join(o.data.get("text/plain", "") for o in out.outputs)
    assert shown.count("interrupted") == 1, shown
    assert "Traceback" not in out.stdout and "File " not in out.stdout, out.stdout
    result, _ = run(shell, f"%%mlx -m {TINY} --max-tokens 3\nagain")
    assert result.success and shell.user_ns["_mlx"].tokens == 3


def test_a_worker_crash_mid_answer_is_one_line_and_the_next_cell_works(shell):
    client = engine()
    pid = client.load(TINY)["pid"]
    manager = client.manager

    def kill_once_streaming():
        if wait_for(lambda: manager.status()[0].active_requests == 1, timeout=30):
            os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_once_streaming, daemon=True).start()
    result, out = run(shell, f"%%mlx -m {TINY} --raw --max-tokens {LONG}\nHello")
    assert isinstance(result.error_in_exec, ClientError), result.error_in_exec
    assert "SIGKILL" in str(result.error_in_exec) and "fresh worker" in str(result.error_in_exec)
    assert "Traceback" not in out.stdout and len(out.stdout.strip().splitlines()) == 1
    result, _ = run(shell, f"%%mlx -m {TINY} --max-tokens 3\nagain")
    assert result.success and shell.user_ns["_mlx"].tokens == 3


class RecordedWrites(io.StringIO):
    """A stdout that keeps each write apart, to tell a streamed answer from one printed at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_in_a_terminal_the_answer_is_printed_as_it_streams(shell):
    stdout = RecordedWrites()
    with contextlib.redirect_stdout(stdout):
        result = shell.run_cell(f"%%mlx -m {TINY} --raw --max-tokens 12 -f text\nHello")
    assert result.success, result.error_in_exec
    answer = shell.user_ns["_mlx"]
    before_footer = [w for w in stdout.writes[: stdout.writes.index(f"[{answer.footer()}]")] if w]
    assert "".join(before_footer) == answer.text + "\n"
    assert len(before_footer) > 2, "the answer was printed in one piece, not as it streamed"
    assert f"[{TINY} · 12 tokens" in stdout.getvalue()


def test_plain_ipython_answers_and_exits_without_a_crash_message(tmp_path):
    script = (
        "%load_ext mlx_jupyter\n"
        "%config MLXMagics.server = 'local'\n"
        f"%%mlx -m {TINY} --raw --max-tokens 3\nhello\n\n\n"
        "exit\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (ENV_URL, ENV_TOKEN)}
    env |= {"IPYTHONDIR": str(tmp_path / "ipython"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    argv = [sys.executable, "-m", "IPython", "--simple-prompt", "--no-banner", "--HistoryManager.enabled=False"]

    proc = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=300, env=env)

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert f"[{TINY} · 3 tokens" in output
    # The worker stops with the interpreter; nothing reads like a crash.
    assert not re.search(r"died|SIGKILL|Traceback|Error|Exception", output), output
