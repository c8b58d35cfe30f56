"""The dashboard in real headless Chromium (Debian's package, driven by Playwright) against a live API + worker:
a finished, a failed and a running experiment; tables hold the stored rows, every chart draws, the page follows
the event stream, user strings render as text, the cancel button works, auth headers are sent. Screenshots are
saved in the test's temporary folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveService, wait_terminal
from tests.server.conftest import SLOW_ANNEALING

pytestmark = [pytest.mark.integration, pytest.mark.slow]

XSS_NAME = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
BASE = {key: SLOW_ANNEALING[key] for key in ("config_list", "base_algo", "seed")}
ANNEALING = {**SLOW_ANNEALING, "name": "annealing running", "max_trials": 60}

# Whether every chart on the page has data and painted pixels (Chart.js draws on <canvas>).
CHARTS_DRAWN = """() => [...document.querySelectorAll('canvas')].map((canvas) => {
    const chart = Chart.getChart(canvas);
    const points = chart ? chart.data.datasets.reduce((n, d) => n + d.data.filter((p) => p !== null).length, 0) : 0;
    const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) painted++;
    return { id: canvas.id, points, painted, width: canvas.width };
})"""


@pytest.fixture
def eval_delay() -> float:
    return 0.7  # the running experiment must still run while the page is checked


def _open(page: Any, url: str, ready: str) -> None:
    page.goto(url)
    page.wait_for_selector(f"body[data-ready={ready}]", timeout=20_000)


def wait_until(page: Any, expression: str, timeout: float) -> None:
    """Poll ``expression`` in the page until it is truthy. Not ``page.wait_for_function``: Playwright builds its
    predicate with ``eval``, which the dashboard's Content-Security-Policy refuses (as it should)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout} s: {expression}"
        time.sleep(0.1)


def _assert_charts_drawn(page: Any, expected: int) -> None:
    charts = page.evaluate(CHARTS_DRAWN)
    assert len(charts) == expected, charts
    for chart in charts:
        assert chart["width"] > 0 and chart["painted"] > 500, chart
        assert chart["points"] > 0, chart


def test_dashboard_in_headless_chromium(live_slow: LiveService, browser: Any, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    http = live_slow.http()
    finished = http.post(
        "/experiments", json={**BASE, "name": XSS_NAME, "entrypoint": "examples.digits", "algorithm": "uniform"}
    ).json()
    failed = http.post(
        "/experiments",
        json={**BASE, "name": "raising", "entrypoint": "tests.tasks.broken_evaluator", "algorithm": "uniform"},
    ).json()
    assert wait_terminal(http, finished["id"])["status"] == "succeeded", live_slow.logs()
    assert wait_terminal(http, failed["id"])["status"] == "failed"
    running = http.post("/experiments", json=ANNEALING).json()

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.add_init_script(f"sessionStorage.setItem('prunehub.apiKey', {json.dumps(live_slow.api_key)})")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # The list: status, algorithm, progress, best score; a <script> name is text, never markup.
    _open(page, f"{live_slow.url}/", "list")
    rows = page.locator("#experiments-body tr")
    assert rows.count() == 3
    name_cell = page.locator(f"#experiments-body tr[data-id='{finished['id']}'] .exp-name")
    assert name_cell.inner_text() == XSS_NAME
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#experiments-body script, #experiments-body img").count() == 0
    assert page.locator(f"#experiments-body tr[data-id='{failed['id']}'] .badge").inner_text() == "failed"
    page.screenshot(path=str(shots / "list.png"), full_page=True)

    # The finished experiment: stored trials in the table, every chart drawn, the model link.
    _open(page, f"{live_slow.url}/#/experiments/{finished['id']}", "experiment")
    stored = http.get(f"/experiments/{finished['id']}/trials").json()
    assert page.locator("#trials-body tr").count() == stored["total"] == 1
    assert page.locator("#trials-body tr td").nth(2).inner_text() == f"{stored['items'][0]['score']:.4f}"
    assert page.locator("#exp-title").inner_text().startswith(XSS_NAME)
    _assert_charts_drawn(page, 4)
    download = page.locator("#download")
    assert download.get_attribute("href") == f"experiments/{finished['id']}/model"
    assert "disabled" not in (download.get_attribute("class") or "")
    assert page.locator("#cancel").is_disabled()
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=str(shots / "finished.png"), full_page=True)

    # The failed experiment shows its error text.
    _open(page, f"{live_slow.url}/#/experiments/{failed['id']}", "experiment")
    assert "evaluator exploded on purpose" in page.locator("#error-text").inner_text()
    assert "evaluator exploded on purpose" in page.locator("#trials-body").inner_text()
    page.screenshot(path=str(shots / "failed.png"), full_page=True)

    # The running experiment: the page follows the event stream as trials are recorded.
    deadline = time.monotonic() + 90
    while http.get(f"/experiments/{running['id']}/trials").json()["total"] < 2:
        assert time.monotonic() < deadline, live_slow.logs()
        time.sleep(0.3)
    _open(page, f"{live_slow.url}/#/experiments/{running['id']}", "experiment")
    page.wait_for_selector("body[data-stream=live]", timeout=10_000)
    first = int(page.evaluate("document.body.dataset.trials"))
    assert first >= 2 and page.locator("#trials-body tr").count() == first
    wait_until(page, f"Number(document.body.dataset.trials) >= {first + 2}", timeout=30)
    later = int(page.evaluate("document.body.dataset.trials"))
    assert page.locator("#trials-body tr").count() == later
    _assert_charts_drawn(page, 4)
    search_points = page.evaluate("Chart.getChart('chart-search').data.datasets[0].data.length")
    assert search_points >= later - 1  # the search curve grew with the new trials
    assert "temperature" in page.locator("#chart-search-subtitle").inner_text()
    # The trials table sorts and filters.
    page.locator("#trials th[data-key=score]").click()
    shown = [float(t) for t in page.locator("#trials-body tr td:nth-child(3)").all_inner_texts() if t != "–"]
    assert shown == sorted(shown, reverse=True)
    page.fill("#trial-filter", "iteration=1 ")
    assert page.locator("#trials-body tr").count() == 1
    page.fill("#trial-filter", "")
    page.screenshot(path=str(shots / "running.png"), full_page=True)

    # Cancel from the page (confirm dialog accepted): the stream brings the final status in.
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    page.wait_for_selector("body[data-status=cancelled]", timeout=60_000)
    final_total = http.get(f"/experiments/{running['id']}/trials").json()["total"]
    wait_until(page, f"Number(document.body.dataset.trials) === {final_total}", timeout=10)
    assert page.locator("#trials-body tr").count() == final_total
    assert page.locator("#exp-title .badge").inner_text() == "cancelled"

    # Compare view: best distributions and Pareto fronts of two experiments on one plot each.
    _open(page, f"{live_slow.url}/#/compare/{finished['id']},{running['id']}", "compare")
    _assert_charts_drawn(page, 2)
    assert page.evaluate("Chart.getChart('compare-pareto').data.datasets.length") == 2
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    assert errors == []

    # Auth: the server answers 401 without a key; the page asks for it once, keeps it in session storage and
    # sends it as a Bearer token from then on.
    page = browser.new_page()  # a fresh tab: empty session storage
    refused = []
    page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)
    page.goto(f"{live_slow.url}/#/")
    page.wait_for_selector("#key-dialog[open]", timeout=10_000)
    assert refused, "the API accepted a request without a key"
    page.fill("#key-input", live_slow.api_key)
    page.click("#key-form button[value=save]")
    page.wait_for_selector("body[data-ready=list]", timeout=10_000)
    assert page.locator("#experiments-body tr").count() == 3
    assert page.evaluate("sessionStorage.getItem('prunehub.apiKey')") == live_slow.api_key
    sent = page.wait_for_event("request", lambda r: "/experiments" in r.url, timeout=10_000)
    assert sent.headers.get("authorization") == f"Bearer {live_slow.api_key}"
    http.close()
