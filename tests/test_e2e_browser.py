"""JupyterLab in Debian's headless chromium: the MLX panel, its countdown, unload, and a notebook."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.live_server import LiveServer
from tests.models import TINY, TINY_A, TINY_B

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
TINY_ROW = f'{PANEL} tr.mlx-model[data-model="{TINY}"]'

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (scripts/setup.sh installs it)")


@pytest.fixture
def jp_asyncio_loop():
    """pytest-jupyter's loop fixture would close Playwright's running loop: give it its own."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def jp_server_cleanup():
    """No in-process ServerApp here to clean up (the server is a subprocess)."""
    yield


@pytest.fixture(scope="module")
def lab(tmp_path_factory, model_dir) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("lab")
    # JupyterLab's news pop-up would cover the page for nothing.
    labconfig = tmp / "config" / "labconfig"
    labconfig.mkdir(parents=True)
    disabled = {"@jupyterlab/apputils-extension:announcements": True}
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": disabled}))
    server = LiveServer(
        tmp,
        model_dir,
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


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def open_lab(browser, lab, name: str, block_events: bool = False) -> Iterator:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {ARTIFACTS}")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    if block_events:  # a browser-side fault: every request for the event stream fails
        page.route(re.compile(r".*/mlx/api/events(\?.*)?$"), lambda route: route.abort())
    page.set_default_timeout(30_000)
    page.goto(f"{lab.url}lab?token={lab.token}")
    page.wait_for_selector(".jp-LabShell", state="attached", timeout=60_000)
    yield page
    shot(page, f"last-{name}")  # how the page looked at the end, passed or failed
    context.close()


@pytest.fixture
def page(browser, lab, request):
    yield from open_lab(browser, lab, request.node.name)


@pytest.fixture
def page_without_events(browser, lab, request):
    yield from open_lab(browser, lab, request.node.name, block_events=True)


def open_panel(page) -> None:
    """Show the MLX panel by its sidebar tab (a click on it when it is open would close it)."""
    page.evaluate("window.jupyterapp.restored.then(() => null)")  # the saved layout is applied
    if not page.is_visible(PANEL):
        page.click('.jp-SideBar .lm-TabBar-tab[data-id="mlx-models-panel"]')
    page.wait_for_selector(PANEL, state="visible")


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def seconds_left(text: str) -> int:
    match = re.fullmatch(r"unloads in (\d+):(\d\d)", text)
    assert match, f"not a countdown: {text!r}"
    return int(match[1]) * 60 + int(match[2])


def test_panel_loads_the_model_counts_down_and_unloads_it(page, lab):
    open_panel(page)
    page.wait_for_selector(f"{PANEL} .mlx-empty", state="visible")
    page.wait_for_selector(f'{PANEL} .mlx-load-select option[value="{TINY}"]', state="attached")
    assert page.inner_text(".mlx-status-item") == "MLX: no model loaded"
    shot(page, "1-panel-empty")

    page.select_option(f"{PANEL} .mlx-load-select", TINY)
    page.click(f"{PANEL} .mlx-load-button")
    countdown = page.locator(f"{TINY_ROW} .mlx-model-countdown")
    countdown.filter(has_text="unloads in").wait_for()
    assert [m["id"] for m in lab.models()] == [TINY]
    first = seconds_left(countdown.inner_text())
    assert IDLE_TIMEOUT - 10 <= first <= IDLE_TIMEOUT, first
    assert page.inner_text(f"{TINY_ROW} .mlx-model-state") == "idle"
    assert re.fullmatch(r"[\d.]+ [kMG]?B", page.inner_text(f"{TINY_ROW} .mlx-model-memory"))
    status = page.inner_text(".mlx-status-item")
    assert re.fullmatch(r"MLX: 1 loaded · next unload 0:\d\d", status), status
    shot(page, "2-panel-loaded")

    # It ticks in the browser: a later reading is lower, with no request between them.
    assert wait_for(lambda: seconds_left(countdown.inner_text()) <= first - 2, timeout=10, interval=0.25)
    shot(page, "3-panel-counting-down")

    page.click(f"{TINY_ROW} .mlx-unload-button")
    page.wait_for_selector(TINY_ROW, state="detached")
    page.wait_for_selector(f"{PANEL} .mlx-empty", state="visible")
    assert lab.models() == []
    assert page.inner_text(".mlx-status-item") == "MLX: no model loaded"
    assert page.inner_text(f"{PANEL} .mlx-panel-mode") == "live (server events)"
    shot(page, "4-panel-unloaded")

    # A model another client loads shows up, counts down to zero, and goes when the reaper unloads it.
    # It is shown before its short keep-alive starts: a slow browser must not miss a row already gone.
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_A, "keep_alive": -1}).status_code == 200
    row = f'{PANEL} tr.mlx-model[data-model="{TINY_A}"]'
    page.wait_for_selector(row, state="visible")
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_A, "keep_alive": "6s"}).status_code == 200
    page.locator(f"{row} .mlx-model-countdown").filter(has_text="unloads in 0:0").wait_for()
    page.wait_for_selector(row, state="detached", timeout=30_000)
    assert lab.models() == []


def test_panel_falls_back_to_polling_when_the_event_stream_fails(page_without_events, lab):
    page = page_without_events
    open_panel(page)
    page.locator(f"{PANEL} .mlx-panel-mode").filter(has_text="polling the server").wait_for()
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_B}).status_code == 200
    row = f'{PANEL} tr.mlx-model[data-model="{TINY_B}"]'
    page.locator(f"{row} .mlx-model-countdown").filter(has_text="unloads in").wait_for()
    shot(page, "4b-panel-polling")
    page.click(f"{row} .mlx-unload-button")
    page.wait_for_selector(row, state="detached")
    assert lab.models() == []


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


def open_and_run(page, lab, name: str) -> None:
    # Opened by command in the page already loaded: a lab/tree/ URL can start two kernels for it.
    page.evaluate(f"window.jupyterapp.commands.execute('docmanager:open', {{path: {json.dumps(name)}}})")
    page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=60_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", state="attached", timeout=60_000)
    # Not awaited: the command's promise settles only when every cell has run.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def outputs_of(page, cell_text: str):
    """The output area of the first cell holding ``cell_text``, once it shows something."""
    outputs = page.locator(".jp-CodeCell", has_text=cell_text).first.locator(".jp-OutputArea")
    shown = lambda: outputs.locator(".jp-OutputArea-output").count() > 0  # noqa: E731
    assert wait_for(shown, timeout=90, interval=0.5), "the cell showed no output"
    return outputs


def test_quickstart_notebook_streams_mlx_output(page, lab):
    root = Path(lab.env["JUPYTER_CONFIG_DIR"]).parent
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", root / "quickstart.ipynb")
    open_and_run(page, lab, "quickstart.ipynb")
    # The answer, then its footer: the model that wrote it and the token count. Read as text content:
    # once run-all has scrolled on, JupyterLab may not render a cell, and an unrendered one has no inner text.
    outputs = outputs_of(page, "%%mlx -f text")
    assert wait_for(lambda: "tokens" in outputs.text_content(), timeout=60)
    answer, footer = outputs.locator(".jp-OutputArea-output").all()
    # builtin:tiny has random weights: its answer may be only blank lines, so count characters.
    assert answer.text_content(), "no answer"
    assert footer.text_content().startswith("builtin:tiny · 24 tokens"), footer.text_content()
    # The --logprobs view as JupyterLab renders it: one shaded span per token, each with its tooltip.
    view = outputs_of(page, "%%mlx --logprobs 3")
    assert wait_for(lambda: "tokens" in view.text_content(), timeout=60)
    tokens = int(re.search(r"· (\d+) tokens", view.text_content())[1])
    spans = view.locator("span.mlx-logprob-token")
    assert wait_for(lambda: spans.count() == tokens, timeout=30), f"{spans.count()} spans for {tokens} tokens"
    first = spans.first
    assert "background-color" in first.get_attribute("style") and "top 3:" in first.get_attribute("title")
    last = outputs_of(page, "%mlx list")  # every cell ran, none failed
    assert TINY in last.inner_text()
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
    shot(page, "5-quickstart-notebook")


def test_dashboard_widget_ticks_in_the_browser_and_drives_the_server(page, lab):
    for model in lab.models():  # left loaded by the quickstart: start from an empty table
        assert lab.client.post("mlx/api/models/unload", json={"model": model["id"]}).status_code == 200
    root = Path(lab.env["JUPYTER_CONFIG_DIR"]).parent
    name = write_notebook(
        root, "dashboard.ipynb", ["from mlx_jupyter.kernel.widgets import ModelDashboard\nModelDashboard()"]
    )
    open_and_run(page, lab, name)
    widget = outputs_of(page, "ModelDashboard").locator(".mlx-dashboard")
    widget.wait_for(timeout=30_000)
    widget.locator(".mlx-empty").wait_for()
    assert "served by Jupyter server at" in page.locator(".mlx-dashboard-host").inner_text()
    widget.locator(f'.mlx-load-select option[value="{TINY}"]').wait_for(state="attached")
    widget.locator(".mlx-load-select").select_option(TINY)
    widget.locator(".mlx-load-button").click()
    row = widget.locator(f'tr.mlx-model[data-model="{TINY}"]')
    countdown = row.locator(".mlx-model-countdown")
    countdown.filter(has_text="unloads in").wait_for(timeout=60_000)
    assert [m["id"] for m in lab.models()] == [TINY]
    first = seconds_left(countdown.inner_text())
    assert wait_for(lambda: seconds_left(countdown.inner_text()) <= first - 2, timeout=10, interval=0.25)
    # The lab's own views follow the same server.
    status = page.inner_text(".mlx-status-item")
    assert status.startswith("MLX: 1 loaded · next unload"), status
    shot(page, "6-dashboard-widget")

    row.locator(".mlx-unload-button").click()
    row.wait_for(state="detached", timeout=60_000)
    assert lab.models() == []
    shot(page, "7-dashboard-widget-unloaded")
