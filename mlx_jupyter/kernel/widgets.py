"""The notebook dashboard: loaded models with idle countdowns that tick in the browser, load and unload."""

from __future__ import annotations

import html
import queue
import threading
import time
from pathlib import Path
from typing import Any

import anywidget
import traitlets
from IPython.display import display

from mlx_jupyter.kernel.client import ClientError, MLXClient, get_client
from mlx_jupyter.kernel.labels import countdown_text, state_label
from mlx_jupyter.kernel.render import loaded_table, megabytes

# Built from labextension/src/widget.ts with the same table code as the JupyterLab panel.
STATIC = Path(__file__).parent / "static"


def _static(name: str) -> Path:
    path = STATIC / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: build it with 'bash scripts/setup.sh' (or reinstall mlx-jupyter)")
    return path


class ModelDashboard(anywidget.AnyWidget):
    """A live table of the loaded models with unload buttons and a load control.

    The countdown ticks in the browser from the models' absolute ``expires_at``, corrected
    by the host's clock. The browser asks for news (``{"type": "refresh"}``) every few
    seconds, every second while an action runs or a countdown has run out, and after each
    button; the kernel answers in the message handler on its shell thread.

    Thread-safety: the synced traits are set only on the thread that built the widget and
    the one that handles its comm messages (the kernel's shell thread), never from a
    background thread (ipykernel 7 does not reliably deliver comm messages sent from one).
    Load and unload run on their own threads, because a load can take minutes; they touch
    nothing but ``_finished``, a thread-safe queue the next refresh drains.

    Args:
        client: the model host to show (default: the kernel's, ``get_client()``).
    """

    _esm = _static("dashboard.js")
    _css = _static("dashboard.css")

    host = traitlets.Unicode("").tag(sync=True)
    snapshot = traitlets.Dict({"server_time": 0.0, "models": []}).tag(sync=True)
    available = traitlets.List().tag(sync=True)
    pending = traitlets.Dict().tag(sync=True)  # model id -> "load" | "unload"
    error = traitlets.Unicode("").tag(sync=True)
    reachable = traitlets.Bool(True).tag(sync=True)  # False while the host does not answer: no Load then

    def __init__(self, client: MLXClient | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client = client if client is not None else get_client()
        self._finished: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self._action_error = ""  # the last failed load or unload, shown until the next action
        self.host = self._client.host
        self.on_msg(self._on_message)
        self.refresh(with_available=True)

    def refresh(self, with_available: bool = False) -> None:
        """Read the host's models; change the synced state only where it really changed."""
        done = set()
        while not self._finished.empty():
            model, failure = self._finished.get()
            done.add(model)
            self._action_error = failure or self._action_error
        if done:
            self.pending = {k: v for k, v in self.pending.items() if k not in done}
            with_available = True  # a load may have brought a model into a cache
        fetch_error = ""
        try:
            models = self._client.models()
            if with_available:
                self.available = self._client.available()
        except ClientError as exc:
            fetch_error = str(exc)
            self.reachable = False
        else:
            self.reachable = True
            if models["models"] != self.snapshot["models"]:
                self.snapshot = models
            self.send({"type": "clock", "server_time": models["server_time"]})
        self.error = "; ".join(e for e in (self._action_error, fetch_error) if e)

    def load(self, model: str) -> None:
        """Load ``model`` in the background; the table shows it as it starts."""
        self._start("load", model)

    def unload(self, model: str) -> None:
        """Unload ``model`` in the background, once its requests finish."""
        self._start("unload", model)

    def _start(self, action: str, model: str) -> None:
        if not isinstance(model, str) or not model or model in self.pending:
            return
        self.pending = {**self.pending, model: action}
        self._action_error = ""
        threading.Thread(target=self._act, args=(action, model), name=f"mlx-dashboard-{action}", daemon=True).start()

    def _act(self, action: str, model: str) -> None:
        failure = None
        try:
            getattr(self._client, action)(model)
        except ClientError as exc:
            failure = f"{action} {model}: {exc}"
        except Exception as exc:  # shown in the table; the dashboard keeps working
            failure = f"{action} {model}: {type(exc).__name__}: {exc}"
        self._finished.put((model, failure))

    def _on_message(self, _widget: Any, content: dict[str, Any], _buffers: list[Any]) -> None:
        kind = content.get("type")
        if kind in ("load", "unload"):
            self._start(kind, content.get("model"))
        self.refresh()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live view, plus a snapshot for places without a widget frontend."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = self.snapshot_text()
        data["text/html"] = self.snapshot_html()
        return bundle

    def snapshot_text(self) -> str:
        lines = [f"models served by {self.host}", loaded_table(self.snapshot)]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)

    def snapshot_html(self) -> str:
        now = self.snapshot.get("server_time") or time.time()
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
            for row in (
                [m["id"], state_label(m), megabytes(m.get("memory_bytes")), countdown_text(m, now)]
                for m in self.snapshot["models"]
            )
        )
        head = "".join(f"<th>{h}</th>" for h in ("model", "state", "memory", "idle"))
        body = f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        if not rows:
            body = "<p>no model loaded</p>"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        caption = f"MLX models served by {html.escape(self.host)}, as of {stamp}"
        error = f"<p style='color: #d32f2f'>{html.escape(self.error)}</p>" if self.error else ""
        return f"<div class='mlx-dashboard-snapshot'><p><b>{caption}</b></p>{body}{error}</div>"


def render_status(client: MLXClient | None = None) -> ModelDashboard:
    """Show the dashboard for ``client`` (default: the kernel's) and return it: ``%mlx status``."""
    dashboard = ModelDashboard(client)
    display(dashboard)
    return dashboard
