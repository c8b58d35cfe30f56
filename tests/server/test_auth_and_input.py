"""API keys (hashed, per owner, admin sees all), request size limits and idempotent submission."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from server.api.main import create_app
from server.db.session import make_engine, make_session_factory
from server.services.auth import create_key
from server.settings import Settings

VALID = {
    "name": "ok",
    "entrypoint": "examples.digits",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
}


@pytest.fixture
def app_and_keys(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], str]]:
    url = f"sqlite:///{tmp_path}/auth.db"
    settings = Settings(
        home=tmp_path, database_url=url, broker_url="filesystem://", artifacts_dir=tmp_path / "artifacts",
        allowed_entrypoints=["examples."], bootstrap_local_key=False, max_body_bytes=20_000,
    )
    with TestClient(create_app(settings)) as client:
        engine = make_engine(url)
        with make_session_factory(engine)() as session:
            keys = {
                "alice": create_key(session, "alice"),
                "bob": create_key(session, "bob"),
                "admin": create_key(session, "ops", "admin"),
            }
            session.commit()
        engine.dispose()
        yield client, keys, url


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_key_or_a_wrong_key_is_401(app_and_keys) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = app_and_keys
    for headers in ({}, _auth("ph_not-a-key"), {"Authorization": keys["alice"]}, {"Authorization": "Basic x"}):
        response = client.get("/experiments", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]
    assert client.post("/experiments", json=VALID).status_code == 401
    assert client.get("/healthz").status_code == 200  # probes need no key
    assert client.get("/readyz").status_code == 200


def test_another_owners_experiment_is_404_on_every_route(app_and_keys) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = app_and_keys
    created = client.post("/experiments", json=VALID, headers=_auth(keys["alice"]))
    assert created.status_code == 201 and created.json()["owner"] == "alice"
    experiment_id = created.json()["id"]
    for method, path in [
        ("GET", f"/experiments/{experiment_id}"),
        ("GET", f"/experiments/{experiment_id}/trials"),
        ("GET", f"/experiments/{experiment_id}/best"),
        ("GET", f"/experiments/{experiment_id}/pareto"),
        ("GET", f"/experiments/{experiment_id}/model"),
        ("GET", f"/experiments/{experiment_id}/events"),
        ("POST", f"/experiments/{experiment_id}/cancel"),
    ]:
        response = client.request(method, path, headers=_auth(keys["bob"]))
        assert response.status_code == 404, (method, path)
        assert response.json()["detail"] == f"experiment {experiment_id} not found"  # same as a missing id
    assert client.get("/experiments", headers=_auth(keys["bob"])).json()["items"] == []
    # The owner and an admin see it.
    assert client.get(f"/experiments/{experiment_id}", headers=_auth(keys["alice"])).status_code == 200
    listed = client.get("/experiments", headers=_auth(keys["admin"])).json()["items"]
    assert [e["id"] for e in listed] == [experiment_id]
    assert client.post(f"/experiments/{experiment_id}/cancel", headers=_auth(keys["admin"])).status_code == 200


def test_keys_are_stored_hashed(app_and_keys) -> None:  # type: ignore[no-untyped-def]
    _, keys, url = app_and_keys
    engine = create_engine(url)
    with engine.connect() as conn:
        dump = "\n".join(str(row) for row in conn.execute(text("SELECT * FROM api_keys")))
    engine.dispose()
    for key in keys.values():
        assert key not in dump
        assert key[20:] not in dump


def test_idempotency_key_returns_the_first_experiment(app_and_keys) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = app_and_keys
    headers = {**_auth(keys["alice"]), "Idempotency-Key": "retry-1"}
    first = client.post("/experiments", json=VALID, headers=headers)
    second = client.post("/experiments", json=VALID, headers=headers)
    assert first.status_code == 201 and second.status_code == 201
    assert second.json()["id"] == first.json()["id"] and second.json()["name"] == "ok"
    # The same key with another body is a 422 (tests/server/test_limits.py has the details).
    assert client.post("/experiments", json={**VALID, "name": "changed"}, headers=headers).status_code == 422
    # Keys are per owner: bob's identical key is his own experiment.
    other = client.post("/experiments", json=VALID, headers={**_auth(keys["bob"]), "Idempotency-Key": "retry-1"})
    assert other.json()["id"] != first.json()["id"]
    assert len(client.get("/experiments", headers=_auth(keys["admin"])).json()["items"]) == 2


def test_oversized_bodies_are_413_and_nothing_is_stored(app_and_keys) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = app_and_keys
    huge = {**VALID, "name": "x" * 50_000}
    response = client.post("/experiments", json=huge, headers=_auth(keys["alice"]))
    assert response.status_code == 413
    assert response.json()["field"] == "body"
    too_many = {**VALID, "config_list": [{"sparsity": 0.5, "op_names": [f"l{i}"]} for i in range(300)]}
    assert client.post("/experiments", json=too_many, headers=_auth(keys["alice"])).status_code in (413, 422)
    long_name = {**VALID, "name": "x" * 201}
    response = client.post("/experiments", json=long_name, headers=_auth(keys["alice"]))
    assert response.status_code == 422 and "name" in response.text
    assert client.get("/experiments", headers=_auth(keys["admin"])).json()["items"] == []
