"""Bad input gets a clear 4xx naming the field, and nothing is stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.main import create_app
from server.settings import Settings

VALID = {
    "name": "ok",
    "entrypoint": "examples.digits",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path}/api.db",
        broker_url="filesystem://",
        artifacts_dir=tmp_path / "artifacts",
        allowed_entrypoints=["examples."],
    )
    with TestClient(create_app(settings)) as test_client:
        # The embedded default created the local admin key on start-up.
        test_client.headers["Authorization"] = f"Bearer {(tmp_path / 'api-key').read_text().strip()}"
        yield test_client


def _error_text(response) -> str:  # type: ignore[no-untyped-def]
    return response.text


def _assert_nothing_stored(client: TestClient) -> None:
    assert client.get("/experiments").json()["items"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**VALID, "algorithm": "simulated_nonsense"}, "algorithm"),
        ({**VALID, "config_list": [{"sparsity": 1.0, "op_types": ["Conv2d"]}]}, "sparsity"),
        ({**VALID, "config_list": [{"sparsity": -0.1, "op_types": ["Conv2d"]}]}, "sparsity"),
        ({**VALID, "config_list": []}, "config_list"),
        ({**VALID, "base_algo": "l7"}, "base_algo"),
        ({**VALID, "seed": -1}, "seed"),
        ({**VALID, "unknown_knob": 3}, "unknown_knob"),
        ({k: v for k, v in VALID.items() if k != "entrypoint"}, "entrypoint"),
        # With a budget the config list only selects layers: a sparsity there is a 422 naming it.
        ({**VALID, "budget": {"flops": 0.25}}, "config_list[0].sparsity"),
        ({**VALID, "budget": {"flops": 0.25, "params": 0.5}}, "budget"),
        ({**VALID, "budget": {"flops": 1.5}, "config_list": [{"op_types": ["Conv2d"]}]}, "flops"),
        ({**VALID, "config_list": [{"op_types": ["Conv2d"]}]}, "config_list[0]"),
        ({**VALID, "candidate_eval": {"calibration_batches": 0}}, "calibration_batches"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    response = client.post("/experiments", json=body)
    assert response.status_code == 422, response.text
    assert field in response.text
    _assert_nothing_stored(client)


def test_entrypoint_outside_the_allow_list_is_rejected(client: TestClient) -> None:
    response = client.post("/experiments", json={**VALID, "entrypoint": "os.path"})
    assert response.status_code == 422
    assert response.json()["field"] == "entrypoint"
    assert "PRUNEHUB_ALLOWED_ENTRYPOINTS" in response.json()["detail"]
    response = client.post("/experiments", json={**VALID, "entrypoint": "examples_evil.x"})
    assert response.status_code == 422
    _assert_nothing_stored(client)


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/experiments", content=b'{"name": "x",', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "json" in response.text.lower()
    _assert_nothing_stored(client)


def test_unknown_experiment_is_404_on_every_route(client: TestClient) -> None:
    for method, path in [
        ("GET", "/experiments/999"),
        ("GET", "/experiments/999/trials"),
        ("GET", "/experiments/999/best"),
        ("GET", "/experiments/999/pareto"),
        ("GET", "/experiments/999/model"),
        ("POST", "/experiments/999/cancel"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert "999" in response.json()["detail"]


def test_a_valid_submission_is_stored_queued_and_cancellable(client: TestClient) -> None:
    created = client.post("/experiments", json=VALID)
    assert created.status_code == 201
    body = created.json()
    assert body["status"] == "queued"
    assert body["config"]["base_algo"] == "l1"
    cancelled = client.post(f"/experiments/{body['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    assert client.post(f"/experiments/{body['id']}/cancel").status_code == 409
    listed = client.get("/experiments", params={"status": "cancelled"}).json()["items"]
    assert [e["id"] for e in listed] == [body["id"]]


def test_listing_paginates_with_a_cursor(client: TestClient) -> None:
    ids = [client.post("/experiments", json={**VALID, "name": f"e{i}"}).json()["id"] for i in range(5)]
    first = client.get("/experiments", params={"limit": 2}).json()
    second = client.get("/experiments", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    third = client.get("/experiments", params={"limit": 2, "cursor": second["next_cursor"]}).json()
    seen = [e["id"] for page in (first, second, third) for e in page["items"]]
    assert seen == sorted(ids, reverse=True)
    assert third["next_cursor"] is None
    assert client.get("/experiments", params={"cursor": "garbage!"}).status_code == 422


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["database"] == "ok"
    assert client.get("/openapi.json").json()["info"]["title"] == "prunehub"
