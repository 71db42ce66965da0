"""Kernels started by a real Jupyter server use its models; the example notebooks run top to bottom."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from mlx_jupyter.discovery import ENV_TOKEN, ENV_URL
from mlx_jupyter.kernel import client as mlx_client
from tests.helpers import pid_alive, wait_for
from tests.test_server_live import LiveServer

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
CELL_TIMEOUT_S = 180


class ServerKernel(KernelManager):
    """A kernel the Jupyter server started (``POST api/kernels``), reached through its connection file.

    nbclient then runs cells in it without owning it: the server started it, with the
    environment the server gives its kernels, and the server shuts it down.
    """

    @property
    def has_kernel(self) -> bool:
        return True


@pytest.fixture
def server(tmp_path, model_dir):
    live = LiveServer(tmp_path, model_dir)
    live.tmp = tmp_path
    yield live
    workers = [m["pid"] for m in live.models()] if live.proc.poll() is None else []
    for kernel in live.client.get("api/kernels").json() if live.proc.poll() is None else []:
        live.client.delete(f"api/kernels/{kernel['id']}")
    live.stop()
    assert wait_for(lambda: not any(pid_alive(p) for p in workers if p), timeout=5), "workers outlived the server"


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


def generate_requests(live: LiveServer) -> float:
    """``mlx_requests_total`` for successful ``api/generate`` calls, from the server's /metrics."""
    metrics = live.client.get("metrics").text
    match = re.search(r'mlx_requests_total\{endpoint="api/generate",status="200"\} (\S+)', metrics)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("name", ["quickstart.ipynb", "model_management.ipynb", "openai_client.ipynb"])
def test_every_notebook_runs_in_a_kernel_the_server_started_and_uses_the_servers_models(server, name):
    kernel_id, km = start_kernel(server)
    before = generate_requests(server)
    nb = run_notebook(name, km)
    output = text_of(nb)
    if name != "openai_client.ipynb":
        assert f"models served by Jupyter server at {server.url}" in output
        assert generate_requests(server) > before, "the notebook's cells did not reach the server's API"
    else:
        assert "builtin:tiny" in output
    metrics = server.client.get("metrics").text
    assert re.search(r"mlx_model_loads_total\{[^}]*\} [1-9]|mlx_model_loads_total [1-9]", metrics), metrics[-2000:]
    server.client.delete(f"api/kernels/{kernel_id}")


def test_a_kernel_finds_the_server_through_its_runtime_file_too(server, monkeypatch):
    monkeypatch.delenv(ENV_URL, raising=False)
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server.tmp / "runtime"))
    monkeypatch.setenv("JPY_PARENT_PID", str(server.proc.pid))
    assert mlx_client.runtime_file_server() == (server.url, server.token)
    found = mlx_client._discover(mlx_client.Discovery())
    assert isinstance(found, mlx_client.ServerClient) and found.url == server.url
    assert found.health()["status"] == "ok"
    found.close()


def test_interrupting_the_kernel_cancels_the_generation_on_the_server(server):
    kernel_id, km = start_kernel(server)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert kc.execute_interactive("%load_ext mlx_jupyter", timeout=60)["content"]["status"] == "ok"
        msg_id = kc.execute("%%mlx --raw --max-tokens 8000\nHello")  # the server's max_tokens_limit is 8192
        assert wait_for(lambda: [m["active_requests"] for m in server.models()] == [1], timeout=60, interval=0.1), (
            "the generation did not start on the server"
        )
        started = time.monotonic()
        server.client.post(f"api/kernels/{kernel_id}/interrupt")  # what the stop button sends
        assert wait_for(lambda: server.models()[0]["active_requests"] == 0, timeout=5, interval=0.05), (
            "the server is still generating after the interrupt"
        )
        cancelled_after = time.monotonic() - started
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        after = kc.execute_interactive("%%mlx --max-tokens 3 -o again\nagain", timeout=60, output_hook=lambda msg: None)
        assert after["content"]["status"] == "ok", after["content"]
        check = kc.execute_interactive(
            "assert again.tokens == 3 and _mlx is again", timeout=30, output_hook=lambda msg: None
        )
        assert check["content"]["status"] == "ok", check["content"]
        print(f"generation cancelled {cancelled_after:.2f}s after the interrupt", file=sys.stderr)
    finally:
        kc.stop_channels()
        server.client.delete(f"api/kernels/{kernel_id}")


def test_the_quickstart_runs_standalone_on_an_engine_in_the_kernel(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_URL, ENV_TOKEN, "JPY_PARENT_PID")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")  # no jpserver-*.json: no server to find
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(tmp_path))
    try:
        nb = run_notebook("quickstart.ipynb", km)
        output = text_of(nb)
        assert "models served by this kernel (local engine)" in output
        worker = re.search(r"builtin:tiny\s+ready\s+(\d+)", output)
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
