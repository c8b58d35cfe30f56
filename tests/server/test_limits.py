"""Limits of a shared service, on SQLite and PostgreSQL: caps on what one experiment asks for (422 naming the field
and the cap), a default max_minutes every experiment inherits, per-owner quotas (stored configs: 422; queued
experiments: 429 with Retry-After), list items without their config, and Idempotency-Key reuse with another body."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.hardening import VALID, Api, running_api

LIMITS = {
    "max_trials_cap": 50,
    "max_minutes_cap": 120.0,
    "default_max_minutes": 30.0,
    "max_epochs_cap": 500,
    "max_config_kb": 8.0,
    "owner_quota_mb": 0.02,  # 20,971 bytes: a few 4-KiB configs
    "max_queued_per_owner": 3,
    "queued_retry_after_s": 17,
}


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    with running_api(request.param, tmp_path, **LIMITS) as api:
        yield api


def _submit(api: Api, owner: str = "alice", headers: dict[str, str] | None = None, **fields: Any) -> Any:
    return api.client.post("/experiments", json={**VALID, **fields}, headers={**api.auth(owner), **(headers or {})})


def _layers(count: int) -> list[dict[str, Any]]:
    # A config list naming many layers: what makes a stored config large.
    return [{"sparsity": 0.5, "op_names": [f"features.{i}.conv.weight_of_a_long_layer_name" for i in range(count)]}]


@pytest.mark.parametrize(
    ("fields", "field", "cap"),
    [
        ({"max_trials": 51}, "max_trials", "PRUNEHUB_MAX_TRIALS_CAP"),
        ({"algorithm": "optuna", "num_trials": 51}, "num_trials", "PRUNEHUB_MAX_TRIALS_CAP"),
        ({"max_minutes": 121}, "max_minutes", "PRUNEHUB_MAX_MINUTES_CAP"),
        (
            {"algorithm": "admm", "num_iterations": 1000, "training_epochs": 1000, "retrain_epochs": 1000},
            "training_epochs",
            "PRUNEHUB_MAX_EPOCHS_CAP",
        ),
        ({"algorithm": "lottery_ticket", "prune_iterations": 100, "epochs": 10}, "epochs", "PRUNEHUB_MAX_EPOCHS_CAP"),
        (
            {"algorithm": "optuna", "num_trials": 50, "finetune_epochs": 11},
            "finetune_epochs",
            "PRUNEHUB_MAX_EPOCHS_CAP",
        ),
        ({"config_list": _layers(200)}, "config", "PRUNEHUB_MAX_CONFIG_KB"),
    ],
)
def test_a_request_over_a_cap_is_422_naming_the_field_and_the_cap(
    api: Api, fields: dict[str, Any], field: str, cap: str
) -> None:
    response = _submit(api, **fields)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and cap in response.json()["detail"]
    assert api.client.get("/experiments", headers=api.auth()).json()["items"] == []


def test_requests_at_the_caps_are_accepted_and_inherit_the_default_max_minutes(api: Api) -> None:
    at_caps = _submit(api, algorithm="admm", max_trials=50, max_minutes=120, num_iterations=20, training_epochs=20)
    assert at_caps.status_code == 201, at_caps.text
    assert at_caps.json()["config"]["max_minutes"] == 120
    plain = _submit(api)
    assert plain.status_code == 201 and plain.json()["config"]["max_minutes"] == 30.0  # the server's default
    detail = api.client.get(f"/experiments/{plain.json()['id']}", headers=api.auth()).json()
    assert detail["config"]["max_minutes"] == 30.0  # stored: every runner enforces it


def test_list_items_carry_no_config_and_the_detail_does(api: Api) -> None:
    created = _submit(api, config_list=_layers(40)).json()
    items = api.client.get("/experiments", headers=api.auth()).json()["items"]
    assert [item["id"] for item in items] == [created["id"]]
    assert "config" not in items[0] and "traceback" not in items[0]
    assert items[0]["name"] == "ok" and items[0]["progress"]["phase"] == "queued"
    detail = api.client.get(f"/experiments/{created['id']}", headers=api.auth()).json()
    assert len(detail["config"]["config_list"][0]["op_names"]) == 40


def test_too_many_queued_experiments_is_429_with_retry_after_per_owner(api: Api) -> None:
    for _ in range(3):
        assert _submit(api).status_code == 201
    refused = _submit(api)
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "17"
    assert refused.json()["field"] == "owner" and "PRUNEHUB_MAX_QUEUED_PER_OWNER=3" in refused.json()["detail"]
    assert _submit(api, owner="bob").status_code == 201  # another owner is not held to alice's queue
    # A cancelled experiment is no longer queued: alice may submit again.
    first = api.client.get("/experiments", headers=api.auth()).json()["items"][-1]["id"]
    assert api.client.post(f"/experiments/{first}/cancel", headers=api.auth()).status_code == 200
    assert _submit(api).status_code == 201


def test_the_owner_storage_quota_counts_stored_configs(api: Api) -> None:
    accepted = 0
    for _ in range(8):
        response = _submit(api, config_list=_layers(70))  # about 4 KiB each
        if response.status_code != 201:
            break
        api.client.post(f"/experiments/{response.json()['id']}/cancel", headers=api.auth())  # not the queue limit
        accepted += 1
    assert 2 <= accepted < 8
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "config" and "PRUNEHUB_OWNER_QUOTA_MB" in response.json()["detail"]
    assert _submit(api, owner="bob", config_list=_layers(70)).status_code == 201  # quotas are per owner
    assert _submit(api).status_code == 201  # a small config still fits alice's remaining quota


def test_an_idempotency_key_reused_with_another_body_is_422(api: Api) -> None:
    key = {"Idempotency-Key": "retry-1"}
    first = _submit(api, headers=key)
    assert first.status_code == 201
    again = _submit(api, headers=key)
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    # Key order and an explicit default do not make another request.
    reordered = api.client.post(
        "/experiments",
        json={"seed": 0, **dict(reversed(list(VALID.items())))},
        headers={**api.auth(), **key},
    )
    assert reordered.status_code == 201 and reordered.json()["id"] == first.json()["id"]
    for changed in ({"name": "changed"}, {"seed": 1}, {"config_list": [{"sparsity": 0.4, "op_types": ["Conv2d"]}]}):
        response = _submit(api, headers=key, **changed)
        assert response.status_code == 422, (changed, response.text)
        assert response.json()["field"] == "Idempotency-Key"
    assert len(api.client.get("/experiments", headers=api.auth()).json()["items"]) == 1
    assert _submit(api, owner="bob", headers=key, name="changed").status_code == 201  # keys are per owner
