"""Browser tests' parts: JupyterLab (and Notebook 7) in a live server, Debian's chromium, screenshots, notebooks."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from mlx_jupyter.engine.models import builtin_model_path
from tests.helpers import wait_for
from tests.live_server import LiveServer
from tests.models import TINY_A, TINY_B

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
IDLE_TIMEOUT = 45  # long enough not to race the test, short enough to watch it tick
# Without the background-networking flags chromium keeps calling home on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PANEL = "#mlx-models-panel"
# A real model under an id as long as the Hugging Face ones people load: it must wrap only
# after its separators in the panel's default width.
LONG_ID = "mlx-community_Qwen2.5-Coder-1.5B-Instruct-4bit"


def start_lab(tmp: Path) -> Iterator[LiveServer]:
    """JupyterLab (with Notebook 7 beside it) and our extension, serving copies of the tiny model."""
    models = tmp / "models"
    for name in (TINY_A, TINY_B, LONG_ID):
        shutil.copytree(builtin_model_path("tiny"), models / name)
    # JupyterLab's news pop-up would cover the page for nothing.
    labconfig = tmp / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    disabled = {"@jupyterlab/apputils-extension:announcements": True}
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": disabled}))
    server = LiveServer(
        tmp,
        models,
        app="jupyterlab",
        idle_timeout=IDLE_TIMEOUT,
        extra_args=(
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        ),
    )
    yield server
    server.stop()


def launch_chromium() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def open_page(
    browser, lab: LiveServer, name: str, path: str = "lab", block: str = "", ready: str = ".jp-LabShell", routes=()
):
    """A page at ``path`` (``block``: a regex of URLs whose requests fail; ``routes``: more (regex, handler)
    pairs, set before the page loads); its last screenshot when it closes.

    ``lab?reset`` starts from an empty layout, without the notebooks earlier pages left open.
    The console's messages are kept in ``page.console`` (an activation failure shows there).
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {ARTIFACTS}")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.console = []
    page.on("console", lambda message: page.console.append(message.text))
    if block:  # a browser-side fault: those requests fail as if the server were gone
        page.route(re.compile(block), lambda route: route.abort())
    for pattern, handler in routes:
        page.route(re.compile(pattern), handler)
    page.set_default_timeout(30_000)
    page.goto(f"{lab.url}{path}{'&' if '?' in path else '?'}token={lab.token}")
    page.wait_for_selector(ready, state="attached", timeout=60_000)
    yield page
    shot(page, f"last-{name}")  # how the page looked at the end, passed or failed
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def open_panel(page) -> None:
    """Show the MLX panel by its sidebar tab (a click on it when it is open would close it)."""
    page.evaluate("window.jupyterapp.restored.then(() => null)")  # the saved layout is applied
    if not page.is_visible(PANEL):
        page.click('.jp-SideBar .lm-TabBar-tab[data-id="mlx-models-panel"]')
    page.wait_for_selector(PANEL, state="visible")


def row(model: str) -> str:
    return f'{PANEL} .mlx-model[data-model="{model}"]'


def seconds_left(text: str) -> int:
    match = re.fullmatch(r"unloads in (\d+):(\d\d)", text)
    assert match, f"not a countdown: {text!r}"
    return int(match[1]) * 60 + int(match[2])


def write_notebook(root: Path, name: str, cells: list[str]) -> str:
    notebook = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": c, "outputs": [], "execution_count": None} for c in cells
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (root / name).write_text(json.dumps(notebook))
    return name


# The current tab is notebook ``path`` and its kernel is connected and idle.
KERNEL_READY = """path => {
  const widget = window.jupyterapp.shell.currentWidget;
  const kernel = widget?.sessionContext?.session?.kernel;
  return widget?.context?.path === path && kernel?.connectionStatus === 'connected' && kernel?.status === 'idle';
}"""


def command(page, name: str, args: dict | None = None) -> None:
    """Run a JupyterLab command and wait for it; its result (often a widget) stays in the page."""
    run = "([name, args]) => window.jupyterapp.commands.execute(name, args).then(() => null)"
    page.evaluate(run, [name, args or {}])


def open_and_run(page, name: str) -> None:
    """Open ``name`` in the JupyterLab page and run all its cells (not awaited)."""
    # Opened by command in the page already loaded: a lab/tree/ URL can start two kernels for it.
    command(page, "docmanager:open", {"path": name})
    page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=60_000)
    # Run only once its kernel answers: run-all before that asks the user to pick a kernel.
    page.wait_for_function(KERNEL_READY, arg=name, timeout=120_000)
    # Not awaited: the command's promise settles only when every cell has run.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def outputs_of(page, cell_text: str):
    """The output area of the first cell holding ``cell_text``, once it shows something."""
    outputs = page.locator(".jp-CodeCell", has_text=cell_text).first.locator(".jp-OutputArea")
    shown = lambda: outputs.locator(".jp-OutputArea-output").count() > 0  # noqa: E731
    assert wait_for(shown, timeout=90, interval=0.5), "the cell showed no output"
    return outputs


def notebook_root(lab: LiveServer) -> Path:
    return Path(lab.env["JUPYTER_CONFIG_DIR"]).parent
