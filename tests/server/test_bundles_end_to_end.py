"""Bring your own code over HTTP with real processes: ``prunehub submit --code DIR --wait`` uploads a package that
is installed nowhere and outside the allow-list, a real worker runs it to success; the same folder again is the
same bundle; another owner can neither read it nor run it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.client import ApiError, PrunehubClient
from server.db.session import make_engine, make_session_factory
from server.services.auth import create_key
from tests.bundle_tasks import SPEC, write_task_package
from tests.conftest import LiveService, _run_live, base_env
from tests.server.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveService]:
    # The default allow-list of the tests ("examples.,tests."): acme_tasks is not under it.
    yield from _run_live(LiveService(tmp_path, base_env(tmp_path)))


def test_submit_code_runs_an_uninstalled_package_to_success(live: LiveService, tmp_path: Path) -> None:
    code = write_task_package(tmp_path / "user-code")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(SPEC))
    env = {**live.env, "PRUNEHUB_API_URL": live.url, "PRUNEHUB_API_KEY": live.api_key}

    done = run_cli(env, "submit", str(spec_path), "--code", str(code), "--wait", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr + live.logs()
    assert "bundle sha256:" in done.stdout and "succeeded" in done.stdout

    with live.http() as http:
        (experiment,) = http.get("/experiments").json()["items"]
        assert experiment["status"] == "succeeded" and experiment["entrypoint"] == "acme_tasks.tiny"
        assert experiment["bundle"].startswith("sha256:") and experiment["best_score"] is not None
        assert http.get(f"/experiments/{experiment['id']}/trials").json()["total"] >= 1

    # The same folder again: the same bundle, reused (no second row).
    again = run_cli(env, "submit", str(spec_path), "--code", str(code))
    assert again.returncode == 0, again.stderr
    listed = run_cli(env, "bundles", "list", "--json")
    items = json.loads(listed.stdout)["items"]
    assert [b["id"] for b in items] == [experiment["bundle"]]

    # Another owner: cannot read it, cannot run it.
    engine = make_engine(live.env["PRUNEHUB_DATABASE_URL"])
    with make_session_factory(engine)() as session:
        bob_key = create_key(session, "bob")
        session.commit()
    engine.dispose()
    with PrunehubClient(live.url, api_key=bob_key) as bob:
        assert bob.bundles()["items"] == []
        with pytest.raises(ApiError) as refused:
            bob.submit({**SPEC, "bundle": experiment["bundle"]})
        assert refused.value.status_code == 404 and refused.value.detail["field"] == "bundle"


@pytest.fixture
def live_distributed(tmp_path: Path) -> Iterator[LiveService]:
    """PostgreSQL + Redis with the distributed runner (each job its own task): the bundle travels with every job."""
    import os

    import redis

    from tests.conftest import _reset_postgres

    database_url = os.environ.get("PRUNEHUB_TEST_DATABASE_URL")
    redis_url = os.environ.get("PRUNEHUB_TEST_REDIS_URL")
    if not database_url or not redis_url:
        pytest.skip("PRUNEHUB_TEST_DATABASE_URL / PRUNEHUB_TEST_REDIS_URL not set")
    redis.Redis.from_url(redis_url, socket_timeout=3).flushdb()
    _reset_postgres(database_url)
    env = base_env(
        tmp_path, PRUNEHUB_DATABASE_URL=database_url, PRUNEHUB_BROKER_URL=redis_url, PRUNEHUB_RUNNER="distributed"
    )
    yield from _run_live(LiveService(tmp_path, env))


def test_the_client_uploads_and_the_distributed_runner_runs_it(live_distributed: LiveService, tmp_path: Path) -> None:
    code = write_task_package(tmp_path / "user-code")
    with PrunehubClient(live_distributed.url, api_key=live_distributed.api_key) as client:
        bundle = client.upload_bundle(code)
        assert client.upload_bundle(code) == bundle  # found by its hash: not sent again
        experiment = client.submit({**SPEC, "bundle": bundle["id"], "entrypoint": "acme_tasks.probe"})
        final = client.wait(experiment["id"], timeout=240)
        assert final["status"] == "succeeded", (final, live_distributed.logs())
        assert final["bundle"] == bundle["id"]
    probe = json.loads((tmp_path / "scratch" / f"experiment-{experiment['id']}" / "probe.json").read_text())
    assert not [k for k in probe["env"] if k.startswith("PRUNEHUB_") and k != "PRUNEHUB_HOME"]
    assert "postgresql" not in json.dumps(probe["env"]) and "redis" not in json.dumps(probe["env"])
