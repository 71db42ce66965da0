"""The notebook dashboard: static snapshots, and its comm protocol with a real kernel acting as the frontend."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import pytest
from jupyter_client.manager import start_new_kernel

from mlx_jupyter.kernel.client import LocalClient, ServerClient
from mlx_jupyter.kernel.widgets import ModelDashboard
from tests.live_server import free_port
from tests.models import TINY

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def local_client() -> Iterator[LocalClient]:
    client = LocalClient({"idle_timeout": 300, "first_token_timeout": 30})
    yield client
    client.close()


def test_snapshot_renders_loaded_models_as_text_and_html(local_client):
    local_client.load(TINY)
    dashboard = ModelDashboard(local_client)
    data, _ = dashboard._repr_mimebundle_()
    assert WIDGET_MIME in data  # the live view where a widget frontend runs
    text = data["text/plain"]
    assert text.startswith("models served by this kernel (local engine)")
    assert TINY in text and "idle" in text and "unloads in" in text
    page = data["text/html"]
    assert "<td>builtin:tiny</td>" in page and "unloads in" in page
    assert TINY in [m["id"] for m in dashboard.available]


def test_snapshot_of_an_empty_host_says_so(local_client):
    data, _ = ModelDashboard(local_client)._repr_mimebundle_()
    assert data["text/plain"].endswith("no model loaded")
    assert "no model loaded" in data["text/html"]


def test_a_host_that_does_not_answer_is_unreachable_until_it_does(local_client):
    dashboard = ModelDashboard(ServerClient(f"http://127.0.0.1:{free_port()}/", timeout=5))
    assert dashboard.reachable is False  # the frontend disables Load
    assert "127.0.0.1" in dashboard.error
    dashboard._client = local_client  # the same dashboard, now asking a host that answers
    dashboard.refresh()
    assert dashboard.reachable is True and dashboard.error == ""


class Frontend:
    """Plays the browser's part for one dashboard in a real kernel: comm messages over ZMQ.

    Every answer is matched to its request by the ``msg_id`` in its parent header, never by
    order of arrival: on a busy machine ``wait_for_ready`` may send a second ``kernel_info``
    whose reply comes after the kernel is up, and a slow kernel answers after we stopped
    waiting. A request is done when the kernel publishes ``idle`` for it; everything it sent
    for that request was published before.
    """

    def __init__(self) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
        self.comm_id = ""
        self.state: dict = {}
        self.updates: list[dict] = []  # state changes the kernel pushed, in order
        self.clocks: list[float] = []
        self.outputs: list[dict] = []

    def execute(self, code: str, timeout: float = 120) -> None:
        msg_id = self.kc.execute(code)
        reply = self.shell_reply(msg_id, timeout)
        assert reply["content"]["status"] == "ok", reply["content"]
        self.wait_idle(msg_id)

    def shell_reply(self, msg_id: str, timeout: float) -> dict:
        """The shell reply to ``msg_id``; late replies to earlier requests are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no shell reply to {msg_id} in {timeout} s"
            try:
                reply = self.kc.get_shell_msg(timeout=remaining)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply

    def wait_idle(self, msg_id: str, timeout: float = 60) -> None:
        """Take every iopub message until the kernel is idle after handling ``msg_id``."""
        self.drain(
            until=lambda m: (
                m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle"
                and m["parent_header"].get("msg_id") == msg_id
            ),
            timeout=timeout,
        )

    def drain(self, until, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            self.take(msg)
            if until(msg):
                return
        raise AssertionError(f"the kernel did not answer in {timeout} s")

    def take(self, msg: dict) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "comm_open" and "snapshot" in content["data"].get("state", {}):
            self.comm_id = content["comm_id"]
            self.state = dict(content["data"]["state"])
        elif kind == "comm_msg" and content["comm_id"] == self.comm_id:
            data = content["data"]
            if data["method"] == "update":
                self.updates.append(data["state"])
                self.state.update(data["state"])
            elif data["method"] == "custom" and data["content"].get("type") == "clock":
                self.clocks.append(data["content"]["server_time"])
        elif kind in ("display_data", "execute_result"):
            self.outputs.append(content["data"])

    def send(self, content: dict) -> None:
        """Send a message to the dashboard and take all the kernel sends in answer to it."""
        data = {"method": "custom", "content": content}
        msg = self.kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        self.kc.shell_channel.send(msg)
        self.wait_idle(msg["header"]["msg_id"])

    def ask_until(self, predicate, timeout: float = 60) -> None:
        """Ask for a refresh every half second, as the browser does while waiting, until ``predicate(state)``."""
        deadline = time.monotonic() + timeout
        while not predicate(self.state):
            assert time.monotonic() < deadline, f"state never matched: {self.state}"
            self.send({"type": "refresh"})
            time.sleep(0.5)  # the browser's pace, not a guess: the loop waits on the state itself

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture
def frontend() -> Iterator[Frontend]:
    front = Frontend()
    yield front
    front.close()


def test_the_frontend_takes_only_the_reply_to_its_own_request(frontend):
    """A late reply to an earlier request (here a kernel_info, as ``wait_for_ready`` leaves one behind
    when the kernel is slow to start) is not taken for the reply to the next execute."""
    frontend.kc.kernel_info()  # its reply is never read
    frontend.execute("answer = 42")
    frontend.execute("assert answer == 42")


def models_of(state: dict) -> dict[str, dict]:
    return {m["id"]: m for m in state["snapshot"]["models"]}


def test_dashboard_loads_and_unloads_through_comm_messages_and_pushes_only_real_changes(frontend):
    frontend.execute(
        "from mlx_jupyter.kernel.client import LocalClient\n"
        "from mlx_jupyter.kernel.widgets import ModelDashboard\n"
        "client = LocalClient({'idle_timeout': 300})\n"
        "ModelDashboard(client)"
    )
    assert frontend.comm_id, "no dashboard widget was opened"
    (shown,) = [o for o in frontend.outputs if WIDGET_MIME in o]
    assert shown[WIDGET_MIME]["model_id"] == frontend.comm_id
    assert shown["text/plain"].endswith("no model loaded") and "<p>no model loaded</p>" in shown["text/html"]
    assert TINY in [m["id"] for m in frontend.state["available"]]

    frontend.send({"type": "load", "model": TINY})
    frontend.ask_until(lambda s: s["pending"] == {TINY: "load"} or TINY in models_of(s))
    frontend.ask_until(lambda s: models_of(s).get(TINY, {}).get("state") == "ready" and not s["pending"])
    tiny = models_of(frontend.state)[TINY]
    assert tiny["expires_at"] > frontend.clocks[-1] + 250  # the browser counts down from here
    assert frontend.state["error"] == ""

    # Nothing changed: refreshes bring the clock, never a state push.
    pushed = len(frontend.updates)
    for _ in range(3):
        clocks = len(frontend.clocks)
        frontend.send({"type": "refresh"})
        assert len(frontend.clocks) == clocks + 1, "each refresh is answered with one clock"
    assert len(frontend.updates) == pushed, frontend.updates[pushed:]
    assert frontend.clocks == sorted(frontend.clocks)

    frontend.send({"type": "load", "model": "no-such-model"})
    frontend.ask_until(lambda s: not s["pending"] and "no-such-model" in s["error"])
    assert TINY in models_of(frontend.state), "a failed load leaves the table as it was"

    frontend.send({"type": "unload", "model": TINY})
    frontend.ask_until(lambda s: not models_of(s) and not s["pending"])
    assert frontend.state["error"] == "", "a successful action clears the last failure"
    frontend.execute("client.close()")
