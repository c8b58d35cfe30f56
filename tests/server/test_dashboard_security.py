"""Dashboard headers (a self-only Content-Security-Policy, X-Frame-Options: DENY, nosniff), a page that runs under
that policy without a single violation, and an API-key dialog that closes once a request with a key succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.db.session import make_engine, make_session_factory
from server.services.auth import create_key
from server.settings import Settings
from tests.server.hardening import VALID, NoDispatch, serving
from tests.server.test_dashboard import wait_until

# Every CSP violation the page reports, collected before any of its scripts run.
RECORD_VIOLATIONS = """window.__violations = [];
document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(
  `${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`));"""


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path, database_url=f"sqlite:///{tmp_path}/dash.db", broker_url="filesystem://",
        artifacts_dir=tmp_path / "artifacts", allowed_entrypoints=["examples."], bootstrap_local_key=False,
    )


def test_the_dashboard_sends_a_self_only_policy_and_no_framing(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path), dispatcher=NoDispatch())) as client:  # type: ignore[arg-type]
        for path in ("/", "/static/app.js", "/static/app.css", "/static/vendor/chart.umd.min.js"):
            response = client.get(path)
            assert response.status_code == 200, path
            policy = response.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy and "style-src 'self'" in policy
            assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
            assert "frame-ancestors 'none'" in policy
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["x-content-type-options"] == "nosniff"
        api = client.get("/experiments")  # every response: no sniffing, no framing
        assert api.headers["x-content-type-options"] == "nosniff" and api.headers["x-frame-options"] == "DENY"
        assert "content-security-policy" not in client.get("/docs").headers  # Swagger UI loads from its CDN


@pytest.mark.integration
def test_the_page_runs_under_its_policy_and_the_key_dialog_closes_once_a_request_succeeds(
    tmp_path: Path, browser: Any
) -> None:
    settings = _settings(tmp_path)
    with serving(settings) as url:
        engine = make_engine(settings.database_url)
        with make_session_factory(engine)() as session:
            key = create_key(session, "alice")
            session.commit()
        engine.dispose()
        created = httpx.post(f"{url}/experiments", json=VALID, headers={"Authorization": f"Bearer {key}"})
        assert created.status_code == 201

        page = browser.new_page()  # no key in session storage: the first request is a 401
        page.add_init_script(RECORD_VIOLATIONS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{url}/#/")
        page.wait_for_selector("#key-dialog[open]", timeout=10_000)
        # The key arrives another way than this dialog (another view's prompt, another script of the tab); a
        # request with it succeeds, so the dialog asking for a key has nothing left to ask.
        page.evaluate(f"sessionStorage.setItem('prunehub.apiKey', {key!r})")
        page.evaluate("location.hash = '#/compare/1'")
        page.wait_for_selector("body[data-ready=compare]", state="attached", timeout=10_000)
        wait_until(page, "!document.getElementById('key-dialog').open", timeout=10)
        # The list draws its progress bars under the policy (their width is set through the CSSOM).
        page.evaluate("location.hash = '#/'")
        fill = "#experiments-body tr[data-id='1'] .progress-fill"
        page.wait_for_selector(fill, state="attached", timeout=10_000)
        assert page.evaluate(f"document.querySelector({fill!r}).style.width") == "0%"  # queued: nothing done
        assert page.evaluate("window.__violations") == []
        assert errors == []
