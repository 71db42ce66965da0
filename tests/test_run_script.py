"""scripts/run.sh, the main job: one line per step, then one line whose URL opens JupyterLab as printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 180  # a deadline, not a guess: a busy machine may take this long to import and bind


class RunScript:
    """``bash scripts/run.sh ARGS`` in its own process group, its stdout read line by line."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tmp / "run.log"
        self.env = dict(
            env or os.environ,
            JUPYTER_CONFIG_DIR=str(tmp / "config"),
            JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
            JUPYTER_DATA_DIR=str(tmp / "data"),
            MLX_JUPYTER_SETUP_LOG=str(self.log),
        )
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "run.sh"), "--ServerApp.ip=127.0.0.1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self.lines: list[str] = []

    def until_url(self) -> str:
        """The lines up to the one with the URL (the script prints nothing after it)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # pytest's timeout turns a hang here into a stack dump
            self.lines.append(line.rstrip("\n"))
            if "http://" in line:
                (url,) = re.findall(r"http://\S+", line)
                return url
        raise AssertionError("run.sh ended without a URL:\n" + "\n".join(self.lines) + self.log.read_text())

    def stop(self) -> int:
        """Ctrl+C, as a user stops it: the script stops the server and exits."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def started(tmp_path) -> Iterator[RunScript]:
    run = RunScript(tmp_path, f"--ServerApp.port={free_port()}", "--IdentityProvider.token=a-token-passed-by-the-user")
    yield run
    run.stop()


@pytest.mark.timeout(STARTUP_S + 60)
def test_run_prints_its_steps_then_a_url_that_opens_jupyterlab_with_the_real_token(started):
    url = started.until_url()
    assert url.endswith("/lab/tree/quickstart.ipynb?token=a-token-passed-by-the-user"), url
    # Every line is a short progress line; pip's and the server's output went to the log.
    assert all(line.startswith(("setup: ", "run: ")) for line in started.lines), started.lines
    assert started.lines[-1].startswith("run: JupyterLab is ready"), started.lines
    assert "server log:" in "\n".join(started.lines)
    # A fresh client, as a browser would be: the URL alone logs in and opens JupyterLab.
    with httpx.Client(follow_redirects=True, timeout=60) as browser:
        page = browser.get(url)
    assert page.status_code == 200, page.text[:500]
    assert '"appName": "JupyterLab"' in page.text, page.text[:500]
    assert "Jupyter Server" in started.log.read_text()  # the server's own log went there
    assert started.stop() in (0, 130)
    assert started.proc.poll() is not None


@pytest.mark.timeout(STARTUP_S + 60)
def test_run_prints_the_generated_token_when_none_is_passed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}
    run = RunScript(tmp_path, f"--ServerApp.port={free_port()}", env=env)
    try:
        url = run.until_url()
        token = url.rsplit("?token=", 1)[1]
        assert re.fullmatch(r"[0-9a-f]{20,}", token), url  # Jupyter's own, not masked as "..."
        with httpx.Client(follow_redirects=True, timeout=60) as browser:
            assert browser.get(url).status_code == 200
        with httpx.Client(timeout=60) as stranger:  # the token is what lets the first one in
            assert stranger.get(url.replace(token, "wrong")).status_code in (302, 403)
    finally:
        run.stop()


def test_setup_prints_one_line_per_step_and_logs_the_rest(tmp_path):
    log = tmp_path / "setup.log"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh")],
        env=dict(os.environ, MLX_JUPYTER_SETUP_LOG=str(log)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("setup: ") for line in lines), lines
