"""Terminal escape injection: user text (names, errors, phases, layer names) reaches the terminal with its control
characters escaped, in every CLI command that prints it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from server import cli
from server.db.models import Experiment
from server.db.session import make_engine, make_session_factory
from server.services.auth import create_key
from server.settings import Settings, get_settings
from tests.server.hardening import VALID, serving

# A window-title change, a screen clear, a cursor move and a C1 CSI: each would act on a terminal printed raw.
HOSTILE = "evil\x1b]0;pwned\x07\x1b[2J\x1b[1;1H\x9b31m"


@pytest.fixture
def api_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite:///{tmp_path}/cli.db"
    settings = Settings(
        home=tmp_path, database_url=url, broker_url="filesystem://", artifacts_dir=tmp_path / "artifacts",
        allowed_entrypoints=["examples."], bootstrap_local_key=False,
    )
    with serving(settings) as base:
        yield from _seeded(base, url, monkeypatch)
    get_settings.cache_clear()


def _seeded(base: str, url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        key = create_key(session, HOSTILE)  # an owner name is user text too
        session.commit()
    monkeypatch.setenv("PRUNEHUB_API_URL", base)
    monkeypatch.setenv("PRUNEHUB_API_KEY", key)
    monkeypatch.setenv("PRUNEHUB_DATABASE_URL", url)
    get_settings.cache_clear()
    import httpx

    created = httpx.post(
        f"{base}/experiments", json={**VALID, "name": HOSTILE},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert created.status_code == 201, created.text
    httpx.post(f"{base}/experiments/1/cancel", headers={"Authorization": f"Bearer {key}"})
    with make_session_factory(engine)() as session:  # what a worker would store from the user's code
        session.execute(update(Experiment).values(error=f"boom {HOSTILE}", phase=f"phase {HOSTILE}"))
        session.commit()
    engine.dispose()
    yield base


@pytest.mark.parametrize(
    "argv",
    [["list"], ["status", "1"], ["status", "1", "--json"], ["watch", "1"], ["keys", "list"]],
)
def test_control_characters_in_user_text_never_reach_the_terminal(
    api_url: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    cli.main(argv)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "evil" in out, out  # the text is there ...
    assert not any(ch in out for ch in "\x1b\x07\x9b"), repr(out)  # ... without its control characters
    if argv[0] != "status" or "--json" not in argv:
        assert "\\x1b]0;pwned" in out  # shown as an escape, so the user sees what was there


def test_terminal_safe_escapes_keys_and_values_and_keeps_numbers() -> None:
    cleaned = cli.terminal_safe({"conv\x1b1": [HOSTILE, 0.5, None], "n": 3})
    assert cleaned == {"conv\\x1b1": ["evil\\x1b]0;pwned\\x07\\x1b[2J\\x1b[1;1H\\x9b31m", 0.5, None], "n": 3}
