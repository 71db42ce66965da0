"""JupyterLab in Debian's headless chromium: the MLX panel, its countdown, unload, status bar, themes and command."""

from __future__ import annotations

import json
import re

import pytest

from tests.browser import (
    CHROMIUM,
    IDLE_TIMEOUT,
    LONG_ID,
    PANEL,
    command,
    open_page,
    open_panel,
    row,
    seconds_left,
    shot,
    start_lab,
)
from tests.helpers import wait_for
from tests.live_server import LiveServer
from tests.models import LONG, TINY, TINY_A, TINY_B

STATUS = ".mlx-status-item"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (scripts/setup.sh installs it)")


@pytest.fixture
def page(browser, lab, request):
    yield from open_page(browser, lab, request.node.name)


@pytest.fixture
def page_without_events(browser, lab, request):
    yield from open_page(browser, lab, request.node.name, block=r".*/mlx/api/events(\?.*)?$")


def unload_all(lab: LiveServer) -> None:
    for model in lab.models():
        assert lab.client.post("mlx/api/models/unload", json={"model": model["id"]}).status_code == 200


def test_panel_loads_the_model_counts_down_and_unloads_it(page, lab):
    open_panel(page)
    page.wait_for_selector(f"{PANEL} .mlx-empty", state="visible")
    page.wait_for_selector(f'{PANEL} .mlx-load-select option[value="{TINY}"]', state="attached")
    assert page.inner_text(STATUS) == "MLX: no model loaded"
    shot(page, "1-panel-empty")

    page.select_option(f"{PANEL} .mlx-load-select", TINY)
    page.click(f"{PANEL} .mlx-load-button")
    countdown = page.locator(f"{row(TINY)} .mlx-model-countdown")
    countdown.filter(has_text="unloads in").wait_for()
    assert [m["id"] for m in lab.models()] == [TINY]
    first = seconds_left(countdown.inner_text())
    assert IDLE_TIMEOUT - 10 <= first <= IDLE_TIMEOUT, first
    assert page.inner_text(f"{row(TINY)} .mlx-model-state") == "idle"
    assert re.fullmatch(r"[\d.]+ [kMG]?B · loaded \d+s ago", page.inner_text(f"{row(TINY)} .mlx-model-details"))
    status = page.inner_text(STATUS)
    assert re.fullmatch(r"MLX: 1 idle · next unload 0:\d\d", status), status
    shot(page, "2-panel-loaded")

    # It ticks in the browser: a later reading is lower, with no request between them.
    assert wait_for(lambda: seconds_left(countdown.inner_text()) <= first - 2, timeout=10, interval=0.25)
    shot(page, "3-panel-counting-down")

    page.click(f"{row(TINY)} .mlx-unload-button")
    page.wait_for_selector(row(TINY), state="detached")
    page.wait_for_selector(f"{PANEL} .mlx-empty", state="visible")
    assert lab.models() == []
    assert page.inner_text(STATUS) == "MLX: no model loaded"
    assert page.inner_text(f"{PANEL} .mlx-panel-mode") == "live (server events)"
    shot(page, "4-panel-unloaded")

    # A model another client loads shows up, counts down to zero, and goes when the reaper unloads it.
    # It is shown before its short keep-alive starts: a slow browser must not miss a row already gone.
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_A, "keep_alive": -1}).status_code == 200
    page.wait_for_selector(row(TINY_A), state="visible")
    assert page.inner_text(f"{row(TINY_A)} .mlx-model-countdown") == "kept loaded"
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_A, "keep_alive": "6s"}).status_code == 200
    page.locator(f"{row(TINY_A)} .mlx-model-countdown").filter(has_text="unloads in 0:0").wait_for()
    page.wait_for_selector(row(TINY_A), state="detached", timeout=30_000)
    assert lab.models() == []


def test_panel_falls_back_to_polling_when_the_event_stream_fails(page_without_events, lab):
    page = page_without_events
    open_panel(page)
    page.locator(f"{PANEL} .mlx-panel-mode").filter(has_text="polling the server").wait_for()
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_B}).status_code == 200
    page.locator(f"{row(TINY_B)} .mlx-model-countdown").filter(has_text="unloads in").wait_for()
    shot(page, "4b-panel-polling")
    page.click(f"{row(TINY_B)} .mlx-unload-button")
    page.wait_for_selector(row(TINY_B), state="detached")
    assert lab.models() == []


# Where each line of an element's text starts, by the position of its characters on screen.
LINE_STARTS = """node => {
  const starts = []; let top = null; let text = '';
  const walker = document.createTreeWalker(node, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    for (let i = 0; i < n.length; i++) {
      const range = document.createRange(); range.setStart(n, i); range.setEnd(n, i + 1);
      const rect = range.getBoundingClientRect();
      if (top !== null && rect.top > top + 2) starts.push(text.length);
      top = rect.top; text += n.data[i];
    }
  }
  return {text, starts};
}"""


def test_panel_reads_at_the_default_sidebar_width(page, lab):
    unload_all(lab)
    open_panel(page)
    width = page.evaluate(f"document.querySelector('{PANEL}').getBoundingClientRect().width")
    assert width < 320, width  # JupyterLab's default: the test is about a narrow panel
    assert lab.client.post("mlx/api/models/load", json={"model": LONG_ID}).status_code == 200
    stream = lab.stream("mlx/api/generate", {"model": TINY_A, "prompt": "x", "max_tokens": LONG, "stream": True})
    try:
        next(stream)  # TINY_A is busy while the answer runs
        page.locator(f"{row(TINY_A)} .mlx-model-state").filter(has_text="busy (1 request)").wait_for()
        page.locator(f"{row(LONG_ID)} .mlx-model-countdown").filter(has_text="unloads in").wait_for()
        shot(page, "8-panel-default-width")
        # The id wraps, but only after its separators: no word is cut.
        layout = page.eval_on_selector(f"{row(LONG_ID)} .mlx-model-id", LINE_STARTS)
        assert layout["text"] == LONG_ID
        assert layout["starts"], "the long id fits on one line: the test needs a narrower panel"
        for start in layout["starts"]:
            assert layout["text"][start - 1] in ":/_.-", f"the id breaks mid-word at {layout['text'][:start]!r}"
        # The state is said once: no second 'busy' for the countdown.
        busy = page.inner_text(f"{row(TINY_A)} .mlx-model-status")
        assert busy == "busy (1 request)", busy
        assert re.fullmatch(r"MLX: 1 busy, 1 idle · next unload 0:\d\d", page.inner_text(STATUS))
        # Nothing sticks out of the panel.
        overflow = page.evaluate(f"(n => n.scrollWidth - n.clientWidth)(document.querySelector('{PANEL}'))")
        assert overflow <= 0, f"the panel scrolls sideways by {overflow}px"
    finally:
        stream.close()  # the client leaves: the server cancels the answer
    page.locator(f"{row(TINY_A)} .mlx-model-state").filter(has_text="idle").wait_for()
    unload_all(lab)


def test_a_loading_model_shows_its_time_so_far_and_cannot_be_unloaded(browser, lab, request):
    """The server's own answer for a model that is still loading, held there by the browser.

    A real load of the tiny model is over before a browser can look (a warm spare worker is
    waiting), so the page gets that state as the server words it, from its own snapshot of
    a loaded model with the loading fields: an addition to the real loads of the other tests.
    """
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_B}).status_code == 200
    snapshot = lab.client.get("mlx/api/models").json()
    unload_all(lab)
    (status,) = [m for m in snapshot["models"] if m["id"] == TINY_B]
    status.update(state="starting", pid=None, memory_bytes=0, loaded_at=None, last_used_at=None, expires_at=None)
    body = json.dumps({"server_time": snapshot["server_time"], "models": [status]})
    answer = lambda route: route.fulfill(status=200, content_type="application/json", body=body)  # noqa: E731
    routes = [(r".*/mlx/api/models(\?.*)?$", answer)]
    pages = open_page(browser, lab, request.node.name, block=r".*/mlx/api/events(\?.*)?$", routes=routes)
    page = next(pages)
    try:
        open_panel(page)
        entry = row(TINY_B)
        page.locator(f"{entry} .mlx-model-countdown").filter(has_text=re.compile(r"^0:0[1-9] so far$")).wait_for()
        assert page.inner_text(f"{entry} .mlx-model-state") == "loading"
        assert page.is_hidden(f"{entry} .mlx-model-details"), "no memory or age yet: nothing to show"
        assert page.is_disabled(f"{entry} .mlx-unload-button")
        assert page.inner_text(STATUS) == "MLX: 1 loading"
        shot(page, "8b-panel-loading")
    finally:
        next(pages, None)


def luminance(css_color: str) -> float:
    r, g, b = (int(v) / 255 for v in re.findall(r"[\d.]+", css_color)[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


STYLE = "(n, p) => getComputedStyle(n)[p]"


def test_panel_in_the_dark_theme_uses_the_theme_colours(page, lab):
    open_panel(page)
    assert lab.client.post("mlx/api/models/load", json={"model": TINY_B}).status_code == 200
    page.locator(f"{row(TINY_B)} .mlx-model-countdown").filter(has_text="unloads in").wait_for()
    try:
        command(page, "apputils:change-theme", {"theme": "JupyterLab Dark"})
        page.wait_for_selector("body[data-jp-theme-light='false']", state="attached")
        page.wait_for_function(
            f"getComputedStyle(document.querySelector('{PANEL}')).backgroundColor !== 'rgb(255, 255, 255)'"
        )
        shot(page, "9-panel-dark-theme")
        panel_bg = luminance(page.eval_on_selector(PANEL, STYLE, "backgroundColor"))
        text = luminance(page.eval_on_selector(f"{row(TINY_B)} .mlx-model-id", STYLE, "color"))
        assert panel_bg < 0.25 < 0.6 < text, (panel_bg, text)
        # The buttons and the chooser follow the theme: no light native control in a dark panel.
        for control in (f"{row(TINY_B)} .mlx-unload-button", f"{PANEL} .mlx-load-select"):
            background = luminance(page.eval_on_selector(control, STYLE, "backgroundColor"))
            assert background < 0.4, (control, background)
            assert luminance(page.eval_on_selector(control, STYLE, "color")) > 0.6, control
        assert page.eval_on_selector(f"{PANEL} .mlx-load-select", "n => n.parentElement.className") == (
            "jp-select-wrapper"
        )
    finally:
        command(page, "apputils:change-theme", {"theme": "JupyterLab Light"})
        page.wait_for_selector("body[data-jp-theme-light='true']", state="attached")
        unload_all(lab)


def test_open_mlx_models_from_the_palette_and_the_view_menu(page):
    page.evaluate("window.jupyterapp.restored.then(() => null)")
    page.click('.jp-SideBar .lm-TabBar-tab[data-id="filebrowser"]')
    page.wait_for_selector(PANEL, state="hidden")
    page.keyboard.press("Control+Shift+C")
    page.fill(".lm-CommandPalette-input", "Open MLX models")
    page.locator(".lm-CommandPalette-item", has_text="Open MLX models").first.click()
    page.wait_for_selector(PANEL, state="visible")
    shot(page, "10-palette-opened-the-panel")

    page.click('.jp-SideBar .lm-TabBar-tab[data-id="filebrowser"]')
    page.wait_for_selector(PANEL, state="hidden")
    page.click(".lm-MenuBar-item:has-text('View')")
    page.click(".lm-Menu-item:has-text('Open MLX models')")
    page.wait_for_selector(PANEL, state="visible")
    # Its tab icon is not the table of contents' list.
    ours = page.inner_html('.jp-SideBar .lm-TabBar-tab[data-id="mlx-models-panel"] svg')
    toc = page.inner_html('.jp-SideBar .lm-TabBar-tab[data-id="table-of-contents"] svg')
    assert ours != toc


def test_status_bar_says_server_unreachable_and_load_is_disabled(browser, tmp_path, request):
    lab = next(gone := start_lab(tmp_path))
    pages = open_page(browser, lab, request.node.name)
    page = next(pages)
    try:
        open_panel(page)
        page.wait_for_selector(f'{PANEL} .mlx-load-select option[value="{TINY}"]', state="attached")
        assert page.inner_text(STATUS) == "MLX: no model loaded"
        assert page.is_enabled(f"{PANEL} .mlx-load-button")
        lab.stop()  # the server is gone
        page.locator(STATUS).filter(has_text="MLX: server unreachable").wait_for(timeout=60_000)
        assert page.is_disabled(f"{PANEL} .mlx-load-button")
        assert page.inner_text(f"{PANEL} .mlx-empty") == "The MLX server does not answer."
        assert page.inner_text(f"{PANEL} .mlx-error").startswith("MLX server unreachable")
        shot(page, "11-server-unreachable")
    finally:
        next(pages, None)
        next(gone, None)
