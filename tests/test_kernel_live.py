"""Kernels started by a real Jupyter server use its models; the example notebooks run top to bottom."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from mlx_jupyter.discovery import ENV_TOKEN, ENV_URL
from mlx_jupyter.engine.models import DEFAULT_MODEL
from mlx_jupyter.kernel import client as mlx_client
from mlx_jupyter.kernel.client import AuthError, ClientError, LocalClient, ServerUnreachableError, UnknownModelError
from tests.english import english_problems, notebook_answers
from tests.helpers import child_pids, pid_alive, run_cell, wait_for
from tests.live_server import LiveServer
from tests.models import LONG, TINY, TINY_A

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
CELL_TIMEOUT_S = 180


class ServerKernel(KernelManager):
    """A kernel the Jupyter server started (``POST api/kernels``), reached through its connection file.

    nbclient then runs cells in it without owning it: the server started it, with the
    environment the server gives its kernels, and the server shuts it down. ``owns_kernel``
    is False, so a client waiting for a slow kernel's first reply takes it for alive
    instead of asking this manager for a process it never started; ``has_kernel`` is True,
    so nbclient does not start a kernel of its own.
    """

    def __init__(self, connection_file: str) -> None:
        super().__init__(connection_file=connection_file, owns_kernel=False)

    @property
    def has_kernel(self) -> bool:
        return True


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback URL that refuses connections for the whole test: its port is bound, never listened on.

    A port that is merely free may be taken by another process (a busy CI runs many servers).
    """
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}/"


def start_kernel(live: LiveServer) -> tuple[str, ServerKernel]:
    kernel_id = live.client.post("api/kernels", json={"name": "python3"}).json()["id"]
    km = ServerKernel(connection_file=str(live.tmp / "runtime" / f"kernel-{kernel_id}.json"))
    km.load_connection_file()
    return kernel_id, km


def run_notebook(name: str, km: KernelManager | None = None, **kwargs) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name="python3", **kwargs).execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Every text output of the executed notebook, joined."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def metric(live: LiveServer, sample: str) -> float:
    """One sample of the server's /metrics, named as exposed (``name{labels}``); 0 while absent."""
    for line in live.client.get("metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def iopub_outputs(kc, msg_id: str) -> list[dict]:
    """The outputs a cell sent (display data, streams, errors, each with its msg_type), up to its idle status."""
    outputs = []
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return outputs
        if msg["msg_type"] in ("display_data", "update_display_data", "stream", "error", "execute_result"):
            outputs.append({"msg_type": msg["msg_type"], **msg["content"]})


def generate_requests(live: LiveServer) -> float:
    """``mlx_requests_total`` for successful ``api/generate`` calls."""
    return metric(live, 'mlx_requests_total{endpoint="api/generate",status="200"}')


def idle(live: LiveServer) -> bool:
    """No generation running (a model unloaded by the server's 1 s idle timeout counts as idle)."""
    return all(m["active_requests"] == 0 for m in live.models())


@pytest.mark.parametrize("name", ["quickstart.ipynb", "model_management.ipynb", "openai_client.ipynb"])
def test_every_notebook_runs_in_a_kernel_the_server_started_and_uses_the_servers_models(live, name):
    kernel_id, km = start_kernel(live)
    before = generate_requests(live)
    nb = run_notebook(name, km)
    output = text_of(nb)
    if name != "openai_client.ipynb":
        assert f"models served by Jupyter server at {live.url}" in output
        assert generate_requests(live) > before, "the notebook's cells did not reach the server's API"
    else:
        assert TINY in output
    metrics = live.client.get("metrics").text
    assert re.search(r"mlx_model_loads_total\{[^}]*\} [1-9]|mlx_model_loads_total [1-9]", metrics), metrics[-2000:]
    live.client.delete(f"api/kernels/{kernel_id}")


async def test_the_extension_exports_url_and_token_while_the_server_runs(jp_serverapp, jp_base_url):
    (extension,) = jp_serverapp.extension_manager.extension_apps["mlx_jupyter"]
    deadline = time.monotonic() + 30  # the export is the event loop's first callback, once the port is final
    while ENV_URL not in os.environ and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert os.environ[ENV_URL] == f"http://{jp_serverapp.ip}:{jp_serverapp.port}{jp_base_url}"
    assert os.environ[ENV_TOKEN] == jp_serverapp.identity_provider.token
    extension.kernel_env.withdraw()  # what stop_extension does first
    assert ENV_URL not in os.environ and ENV_TOKEN not in os.environ


def test_discovery_tries_the_exported_url_then_the_runtime_file_then_nothing_for_local(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JPY_PARENT_PID", "4242")
    info = {"url": "http://127.0.0.1:1111/b/", "base_url": "/b/", "token": "from-file"}
    (tmp_path / "jpserver-4242.json").write_text(json.dumps(info))
    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:2222/a/")
    monkeypatch.setenv(ENV_TOKEN, "from-env")
    assert mlx_client.server_candidates(mlx_client.Discovery()) == [
        ("http://127.0.0.1:2222/a/", "from-env"),
        ("http://127.0.0.1:1111/b/", "from-file"),
    ]
    assert mlx_client.server_candidates(mlx_client.Discovery(server="local")) == []


def test_a_kernel_finds_the_server_through_its_runtime_file_when_the_exported_url_is_dead(
    live, monkeypatch, refusing_url
):
    monkeypatch.setenv(ENV_URL, refusing_url)  # tried first, refuses
    monkeypatch.setenv(ENV_TOKEN, "stale")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(live.tmp / "runtime"))
    monkeypatch.setenv("JPY_PARENT_PID", str(live.proc.pid))
    assert mlx_client.runtime_file_server() == (live.url, live.token)
    found = mlx_client.discover(mlx_client.Discovery())
    assert isinstance(found, mlx_client.ServerClient) and found.url == live.url
    assert found.health()["status"] == "ok"
    found.close()


def test_interrupting_the_kernel_cancels_the_generation_on_the_server(live):
    kernel_id, km = start_kernel(live)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert kc.execute_interactive("%load_ext mlx_jupyter", timeout=60)["content"]["status"] == "ok"
        exported = kc.execute_interactive(
            f"import os; assert os.environ['MLX_JUPYTER_SERVER_URL'] == {live.url!r}", timeout=30
        )
        assert exported["content"]["status"] == "ok", "the server did not export its URL to the kernel"
        # A finished answer adds its tokens to this counter; a cancelled one adds none.
        # That proves the cancel without racing the answer's natural end against a clock.
        tokens = f'mlx_generated_tokens_total{{model="{TINY}"}}'
        tokens_before = metric(live, tokens)
        # stop_on_error=False: the interrupt fails this cell, and ipykernel would abort a request
        # that arrives right after it (the next cell of this test).
        msg_id = kc.execute(f"%%mlx --raw --max-tokens {LONG}\nHello", stop_on_error=False)
        assert wait_for(lambda: [m["active_requests"] for m in live.models()] == [1], timeout=60, interval=0.1), (
            "the generation did not start on the server"
        )
        started = time.monotonic()
        live.client.post(f"api/kernels/{kernel_id}/interrupt")  # what the stop button sends
        assert wait_for(lambda: idle(live), timeout=60, interval=0.05), "the server is still generating"
        cancelled_after = time.monotonic() - started
        assert metric(live, tokens) == tokens_before, "the answer ran to its end: the interrupt did not cancel it"
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        # The footer names the server's default model (the cell named none) and says "interrupted"
        # once; the error is one line, no traceback into the HTTP client.
        outputs = iopub_outputs(kc, msg_id)
        footer = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})][-1]
        assert re.match(rf"{re.escape(TINY)} · \d+ tokens", footer), footer
        texts = [o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs]
        assert "".join(texts).count("interrupted") == 1, texts
        assert [o["traceback"] for o in outputs if o["msg_type"] == "error"] == [["KeyboardInterrupt"]]
        after = kc.execute_interactive("%%mlx --max-tokens 3 -o again\nagain", timeout=60, output_hook=lambda msg: None)
        assert after["content"]["status"] == "ok", after["content"]
        check = kc.execute_interactive(
            "assert again.tokens == 3 and _mlx is again", timeout=30, output_hook=lambda msg: None
        )
        assert check["content"]["status"] == "ok", check["content"]
        assert metric(live, tokens) == tokens_before + 3, "the token counter does not see finished answers"
        unknown = kc.execute_interactive("%%mlx -m no-such-model\nhi", timeout=30, output_hook=lambda msg: None)
        content = unknown["content"]
        assert content["status"] == "error" and content["ename"] == "UnknownModelError"
        assert len(content["traceback"]) == 1
        assert "available: builtin:pydoc, builtin:pydoc-chat, builtin:tiny, tiny-a, tiny-b" in content["traceback"][0]
        print(f"generation cancelled {cancelled_after:.2f}s after the interrupt", file=sys.stderr)
    finally:
        kc.stop_channels()
        live.client.delete(f"api/kernels/{kernel_id}")


def test_the_quickstart_runs_standalone_on_an_engine_in_the_kernel(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_URL, ENV_TOKEN, "JPY_PARENT_PID")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")  # no jpserver-*.json: no server to find
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))
    try:
        nb = run_notebook("quickstart.ipynb", km)
        output = text_of(nb)
        assert "models served by this kernel (local engine)" in output
        # The default model answers the quickstart's questions in English, not gibberish.
        answers = notebook_answers(nb)
        assert len(answers) >= 6, answers
        for question, answer in answers:
            assert english_problems(answer, min_words=4, known_share=0.8) == [], (question, answer)
        worker = re.search(rf"{re.escape(DEFAULT_MODEL)}\s+idle\s+(\d+)", output)  # the notebook names no model
        assert worker, output[-2000:]
    finally:
        km.shutdown_kernel(now=False)
    assert wait_for(lambda: not pid_alive(int(worker.group(1))), timeout=10), "the kernel's worker outlived it"


def test_the_notebooks_are_clean_of_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} >= {
        "quickstart.ipynb",
        "model_management.ipynb",
        "openai_client.ipynb",
    }


def use_server(shell, url: str, token: str) -> None:
    shell.run_line_magic("config", f"MLXMagics.token = {token!r}")
    shell.run_line_magic("config", f"MLXMagics.server = {url!r}")


def one_line(captured) -> str:
    lines = captured.stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.stdout, captured.stdout
    return lines[0]


def test_magics_use_an_explicit_server_and_list_its_models_on_an_unknown_one(
    shell, live
):  # shell first: it checks for leftover processes after the server stops
    use_server(shell, live.url, live.token)
    result, out = run_cell(shell, "%mlx status")
    assert result.success and f"Jupyter server at {live.url}" in out.stdout
    result, out = run_cell(shell, "%%mlx -m tiny-a --max-tokens 4\nhi")
    assert result.success, result.error_in_exec
    assert shell.user_ns["_mlx"].model == TINY_A and shell.user_ns["_mlx"].tokens == 4
    assert [m["id"] for m in live.models()] == [TINY_A]
    result, out = run_cell(shell, "%%mlx -m tiny-z\nhi")
    assert isinstance(result.error_in_exec, UnknownModelError)
    assert "available: builtin:pydoc, builtin:pydoc-chat, builtin:tiny, tiny-a, tiny-b" in one_line(out)


def test_a_refused_token_is_one_line_that_says_what_to_set(
    shell, live
):  # shell first: it checks for leftover processes after the server stops
    use_server(shell, live.url, "wrong")
    result, out = run_cell(shell, "%%mlx --max-tokens 4\nhi")
    assert isinstance(result.error_in_exec, AuthError)
    assert "refused this kernel's credential (401" in one_line(out) and "MLX_JUPYTER_TOKEN" in one_line(out)
    assert run_cell(shell, "1 + 1")[0].result == 2


def test_an_unreachable_server_is_one_line(shell, refusing_url):
    use_server(shell, refusing_url, "")
    result, out = run_cell(shell, "%mlx list")
    assert isinstance(result.error_in_exec, ServerUnreachableError)
    assert "cannot reach the Jupyter server at" in one_line(out)
    assert run_cell(shell, "1 + 1")[0].result == 2


def test_a_worker_killed_mid_answer_on_the_server_is_one_line(
    shell, live
):  # shell first: it checks for leftover processes after the server stops
    use_server(shell, live.url, live.token)
    # The keep-alive outlasts the server's 1 s idle timeout, so this pid is still the worker
    # that serves the answer below, however slow the machine.
    assert run_cell(shell, "%mlx load --keep-alive 10m")[0].success
    pid = live.models()[0]["pid"]

    def kill_once_streaming():
        if wait_for(lambda: [m["active_requests"] for m in live.models()] == [1], timeout=30, interval=0.05):
            os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_once_streaming, daemon=True).start()
    result, out = run_cell(shell, f"%%mlx --raw --max-tokens {LONG}\nHello")
    assert isinstance(result.error_in_exec, ClientError) and result.error_in_exec.code == "worker_crashed"
    assert "SIGKILL" in one_line(out)
    result, _ = run_cell(shell, "%%mlx --max-tokens 3\nagain")
    assert result.success and shell.user_ns["_mlx"].tokens == 3


class NotFoundHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


class CannedSSEHandler(http.server.BaseHTTPRequestHandler):
    """Answers ``POST <path>`` with a canned Server-Sent Events body: faults the real server never sends.

    ``/lingering/...`` sends one event of an answer that never ends, then sets ``left`` when the
    client closes the connection.
    """

    BODIES = {
        "/ok/mlx/api/generate": b': comment\n\nevent: ping\n\ndata: {"text": "a"}\n\n'
        b'data: {"text": "b", "finish_reason": "stop", "done": true}\n\n',
        "/garbled/mlx/api/generate": b'data: {"text": "a"}\n\ndata: {"text": \n\n',
    }
    left = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if self.path == "/lingering/mlx/api/generate":
            self.end_headers()
            self.wfile.write(b'data: {"text": "a"}\n\n')
            self.wfile.flush()
            if self.connection.recv(1) == b"":  # EOF: closed; a connection kept for reuse would wait here
                self.left.set()
            return
        body = self.BODIES[self.path]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def canned_url() -> Iterator[str]:
    """The URL of a local HTTP server answering with CannedSSEHandler."""
    CannedSSEHandler.left = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CannedSSEHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_stream_reader_skips_events_without_data_and_reports_a_garbled_one_as_one_error(canned_url):
    chunks = list(mlx_client.ServerClient(f"{canned_url}/ok/").generate({"prompt": "hi"}))
    assert [c["text"] for c in chunks] == ["a", "b"] and chunks[-1]["finish_reason"] == "stop"
    stream = mlx_client.ServerClient(f"{canned_url}/garbled/").generate({"prompt": "hi"})
    assert next(stream) == {"text": "a"}
    with pytest.raises(ClientError, match="unreadable event from the Jupyter server"):
        next(stream)


def test_closing_a_stream_closes_its_connection_so_the_server_sees_the_client_leave(canned_url):
    client = mlx_client.ServerClient(f"{canned_url}/lingering/")
    stream = client.generate({"prompt": "hi"})
    assert next(stream) == {"text": "a"}
    stream.close()
    assert CannedSSEHandler.left.wait(30), "the connection stayed open after the stream was closed"
    client.close()


def test_proxy_settings_in_the_environment_do_not_reroute_the_kernels_calls(canned_url, monkeypatch, refusing_url):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, refusing_url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = mlx_client.ServerClient(f"{canned_url}/ok/")
    assert [c["text"] for c in client.generate({"prompt": "hi"})] == ["a", "b"]
    client.close()


def test_a_server_without_the_extension_means_an_engine_in_the_kernel(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFoundHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(ENV_URL, f"http://127.0.0.1:{httpd.server_address[1]}/")
        monkeypatch.delenv("JPY_PARENT_PID", raising=False)
        found = mlx_client.discover(mlx_client.Discovery())
        assert isinstance(found, LocalClient)
        found.close()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_interrupting_a_kernel_that_hosts_its_engine_cancels_the_generation_and_keeps_the_worker(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_URL, ENV_TOKEN)}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        quiet = {"timeout": 60, "output_hook": lambda msg: None}
        setup = (
            "%load_ext mlx_jupyter\n"
            f"%config MLXMagics.max_tokens_limit = {LONG}\n"
            "from mlx_jupyter.kernel.client import get_client\n"
            "pid = get_client().load('builtin:tiny')['pid']"
        )
        assert kc.execute_interactive(setup, **quiet)["content"]["status"] == "ok"
        msg_id = kc.execute(f"%%mlx -m {TINY} --raw --max-tokens {LONG}\nHello", stop_on_error=False)
        while True:  # the first streamed display proves the generation is running
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "display_data":
                break
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        check = (
            "models = get_client().models()['models']\n"
            "assert [(m['pid'], m['active_requests']) for m in models] == [(pid, 0)], models\n"
            "assert _mlx.finish_reason == 'cancelled' and _mlx.text"
        )
        result = kc.execute_interactive(check, **quiet)
        assert result["content"]["status"] == "ok", result["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert wait_for(lambda: not child_pids(), timeout=10), f"processes left behind: {child_pids()}"
