"""Notebooks in Debian's headless chromium: the quickstart, the dashboard widget live and saved, an interrupted
cell, and the panel and magics in Jupyter Notebook 7."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.browser import (
    CHROMIUM,
    PANEL,
    ROOT,
    command,
    notebook_root,
    open_and_run,
    open_page,
    outputs_of,
    seconds_left,
    shot,
    write_notebook,
)
from tests.helpers import wait_for
from tests.live_server import LiveServer
from tests.models import LONG, TINY

DASHBOARD_CELL = "from mlx_jupyter.kernel.widgets import ModelDashboard\nModelDashboard()"
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (scripts/setup.sh installs it)")


@pytest.fixture
def page(browser, lab, request):
    # Each test opens its own notebook: none of the earlier tests' tabs (their cells look alike).
    yield from open_page(browser, lab, request.node.name, path="lab?reset")


def unload_all(lab: LiveServer) -> None:
    for model in lab.models():
        assert lab.client.post("mlx/api/models/unload", json={"model": model["id"]}).status_code == 200


def shut_down_kernels(lab: LiveServer) -> None:
    for kernel in lab.client.get("api/kernels").json():
        assert lab.client.delete(f"api/kernels/{kernel['id']}").status_code == 204


def test_quickstart_notebook_streams_mlx_output(page, lab):
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", notebook_root(lab) / "quickstart.ipynb")
    open_and_run(page, "quickstart.ipynb")
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
    assert page.locator(STDERR).count() == 0
    shot(page, "5-quickstart-notebook")


def test_dashboard_widget_ticks_in_the_browser_and_drives_the_server(page, lab):
    unload_all(lab)  # left loaded by the quickstart: start from an empty table
    name = write_notebook(notebook_root(lab), "dashboard.ipynb", [DASHBOARD_CELL])
    open_and_run(page, name)
    widget = outputs_of(page, "ModelDashboard").locator(".mlx-dashboard")
    widget.wait_for(timeout=30_000)
    widget.locator(".mlx-empty").wait_for()
    assert "served by Jupyter server at" in page.locator(".mlx-dashboard-host").inner_text()
    widget.locator(f'.mlx-load-select option[value="{TINY}"]').wait_for(state="attached")
    widget.locator(".mlx-load-select").select_option(TINY)
    widget.locator(".mlx-load-button").click()
    row = widget.locator(f'.mlx-model[data-model="{TINY}"]')
    countdown = row.locator(".mlx-model-countdown")
    countdown.filter(has_text="unloads in").wait_for(timeout=60_000)
    assert [m["id"] for m in lab.models()] == [TINY]
    first = seconds_left(countdown.inner_text())
    assert wait_for(lambda: seconds_left(countdown.inner_text()) <= first - 2, timeout=10, interval=0.25)
    # The lab's own views follow the same server, in the same words.
    status = page.inner_text(".mlx-status-item")
    assert status.startswith("MLX: 1 idle · next unload"), status
    assert row.locator(".mlx-model-state").inner_text() == "idle"
    shot(page, "6-dashboard-widget")

    row.locator(".mlx-unload-button").click()
    row.wait_for(state="detached", timeout=60_000)
    assert lab.models() == []
    shot(page, "7-dashboard-widget-unloaded")


def test_reopened_notebook_shows_the_saved_dashboard_snapshot(page, lab):
    unload_all(lab)
    assert lab.client.post("mlx/api/models/load", json={"model": TINY}).status_code == 200
    root = notebook_root(lab)
    name = write_notebook(root, "saved.ipynb", [DASHBOARD_CELL])
    open_and_run(page, name)
    outputs_of(page, "ModelDashboard").locator(f'.mlx-dashboard .mlx-model[data-model="{TINY}"]').wait_for()
    command(page, "docmanager:save")
    assert wait_for(lambda: "mlx-dashboard-snapshot" in (root / name).read_text(), timeout=30)
    command(page, "application:close")
    page.wait_for_selector(".jp-Notebook", state="detached")
    shut_down_kernels(lab)  # the widget's model dies with its kernel

    command(page, "docmanager:open", {"path": name})
    output = page.locator(".jp-CodeCell", has_text="ModelDashboard").first.locator(".jp-OutputArea-output")
    # The note comes only from our fallback in the widget renderer: the notebook is trusted, so
    # JupyterLab chose the widget view (an untrusted one would show the HTML snapshot anyway).
    output.locator(".mlx-snapshot-note").wait_for(timeout=60_000)
    text = output.inner_text()
    assert "Error displaying widget" not in text, text
    assert "MLX models served by" in text and TINY in text and "idle" in text, text
    shot(page, "12-reopened-saved-dashboard")
    unload_all(lab)


def test_interrupted_cell_keeps_its_answer_and_shows_no_traceback(page, lab):
    name = write_notebook(
        notebook_root(lab), "interrupt.ipynb", ["%load_ext mlx_jupyter", f"%%mlx -f text --max-tokens {LONG}\nx"]
    )
    open_and_run(page, name)
    outputs = outputs_of(page, "%%mlx -f text")
    assert wait_for(lambda: len(outputs.inner_text()) > 20, timeout=60, interval=0.25), "no answer streamed"
    page.click(".jp-NotebookPanel-toolbar [data-jp-item-name='interrupt'] button")  # the stop button (■)
    footer = outputs.locator(".jp-OutputArea-output").filter(has_text="interrupted")
    assert wait_for(lambda: footer.count() == 1, timeout=60, interval=0.25), outputs.inner_text()
    text = outputs.inner_text()
    assert text.count("interrupted") == 1, text
    assert footer.inner_text().startswith(TINY), footer.inner_text()
    # The cell still fails, so Run All stops there: with one line, not a traceback into the client.
    assert "Traceback" not in text and "http.client" not in text and text.count("KeyboardInterrupt") <= 1, text
    assert [e.inner_text().strip() for e in page.locator(STDERR).all()] in ([], ["KeyboardInterrupt"])
    shot(page, "13-interrupted-cell")


def test_notebook7_shows_the_panel_and_the_status_and_runs_the_magics(browser, lab, request):
    unload_all(lab)
    shut_down_kernels(lab)
    # The file browser page too: every Notebook 7 page used to log that the plugin failed to activate.
    tree = open_page(browser, lab, f"{request.node.name}-tree", path="tree", ready=".jp-DirListing")
    page = next(tree)
    try:
        page.locator(".mlx-status-item").filter(has_text="MLX: no model loaded").wait_for()
        failures = [line for line in page.console if "failed to activate" in line]
        assert not failures, failures
    finally:
        next(tree, None)
    cells = ["%load_ext mlx_jupyter", "%%mlx -f text --max-tokens 8\nHello"]
    name = write_notebook(notebook_root(lab), "nb7.ipynb", cells)
    pages = open_page(browser, lab, request.node.name, path=f"notebooks/{name}", ready=".jp-Notebook .jp-Cell")
    page = next(pages)
    try:
        assert wait_for(lambda: kernel_idle(lab), timeout=120, interval=0.5), "no kernel started for the notebook"
        page.click(".lm-MenuBar-item:has-text('Run')")
        page.click(".lm-Menu-item:has-text('Run All Cells')")
        outputs = outputs_of(page, "%%mlx -f text")
        assert wait_for(lambda: "tokens" in outputs.inner_text(), timeout=90, interval=0.5), outputs.inner_text()
        footer = outputs.locator(".jp-OutputArea-output").last.inner_text()
        assert footer.startswith(f"{TINY} · 8 tokens"), footer

        status = page.locator(".mlx-status-item")  # no status bar in Notebook 7: it is in the top bar
        status.filter(has_text="MLX: 1 idle").wait_for()
        status.click()
        page.wait_for_selector(PANEL, state="visible")
        page.locator(f'{PANEL} .mlx-model[data-model="{TINY}"] .mlx-model-countdown').filter(
            has_text="unloads in"
        ).wait_for()
        shot(page, "14-notebook7-panel-and-magics")
        failures = [line for line in page.console if "failed to activate" in line]
        assert not failures, failures
    finally:
        next(pages, None)


def kernel_idle(lab: LiveServer) -> bool:
    return any(k["execution_state"] == "idle" for k in lab.client.get("api/kernels").json())
