"""``GET /experiments/{id}/sensitivity`` and ``POST /experiments/{id}/reallocate`` on stored experiments (fast: the
search state is the real strategy's, driven on the fake executor, and inserted through the services)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from pruning.budget import Budget
from pruning.search import make_strategy
from pruning.search.configs import parse_algorithm_config
from server.api.main import create_app
from server.db.models import Event, Experiment, ExperimentStatus
from server.services.auth import create_key
from server.services.experiments import create_experiment
from server.settings import Settings
from tests.pruning.search.driver import drive
from tests.pruning.search.fakes import FakeExecutor, fake_problem

BUDGET_LIST = [{"op_types": ["Conv2d", "Linear"], "max_sparsity": 0.9}]
SPEC: dict[str, Any] = {
    "algorithm": "sensitivity",
    "config_list": BUDGET_LIST,
    "base_algo": "l2",
    "budget": {"flops": 0.35},
    "levels": [0.25, 0.5],
    "refine_candidates": 2,
    "finetune_epochs": 1,
    "seed": 3,
}


@dataclass
class RecordingDispatcher:
    """Remembers what would have gone to the broker."""

    sent: list[tuple[str, int]] = field(default_factory=list)

    def send(self, task: str, target_id: int) -> None:
        self.sent.append((task, target_id))

    def enqueue_experiment(self, experiment_id: int) -> None:
        self.sent.append(("experiments.run", experiment_id))

    def ping(self) -> None:
        return None


@dataclass
class Api:
    client: TestClient
    dispatcher: RecordingDispatcher
    app: Any

    def session(self) -> Any:
        return self.app.state.session_factory()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    settings = Settings(
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path}/api.db",
        broker_url="filesystem://",
        artifacts_dir=tmp_path / "artifacts",
        allowed_entrypoints=["examples."],
        bootstrap_local_key=False,
    )
    dispatcher = RecordingDispatcher()
    app = create_app(settings, dispatcher=dispatcher)
    with TestClient(app) as client:
        with app.state.session_factory() as session:
            client.headers["Authorization"] = f"Bearer {create_key(session, 'alice')}"
            session.commit()
        yield Api(client, dispatcher, app)


def _finished_state(spec: dict[str, Any]) -> dict[str, Any]:
    """The state a finished run of ``spec`` stores (the fake problem has the budget the spec names)."""
    run = drive(spec, fake_problem(budget=spec.get("budget")), FakeExecutor(), check_resume=False)
    assert run.state.done and run.state.best_key is not None
    return run.state.model_dump(mode="json")


def _insert(api: Api, spec: dict[str, Any], *, status: str = "succeeded", state: dict[str, Any] | None = None,
            owner: str = "alice", name: str = "profiled") -> int:
    with api.session() as session:
        experiment = create_experiment(
            session, owner=owner, name=name, entrypoint="examples.digits", config=parse_algorithm_config(spec),
            allowed_prefixes=["examples."],
        )
        experiment.status = status
        experiment.search_state = state
        session.commit()
        return experiment.id


def test_sensitivity_serves_the_stored_curves_baseline_and_allocation(api: Api) -> None:
    state = _finished_state(SPEC)
    experiment_id = _insert(api, SPEC, state=state)
    response = api.client.get(f"/experiments/{experiment_id}/sensitivity")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["experiment_id"] == experiment_id and body["status"] == "succeeded"
    assert body["resource"] == "flops" and body["budget"] == {"flops": 0.35} and body["reused"] is False
    assert body["baseline_score"] == state["curves"]["baseline"]
    # The problem's unit order, one point per profiled level, each with what was measured.
    assert [u["name"] for u in body["units"]] == ["conv1", "conv2", "conv3", "conv4", "fc1"]
    for unit, stored in zip(body["units"], state["curves"]["units"], strict=True):
        assert [p["sparsity"] for p in unit["points"]] == [p["sparsity"] for p in stored["points"]] == [0.25, 0.5]
        assert [p["score"] for p in unit["points"]] == [p["score"] for p in stored["points"]]
        assert all(0 < p["ratio"] < 1 and p["ratio"] == p["flops_ratio"] for p in unit["points"])
        assert unit["allocated"] == state["allocation"]["distribution"][unit["name"]]
    allocation = body["allocation"]
    assert allocation["resource"] == "flops"
    assert allocation["needed_saving"] == pytest.approx(0.65)
    assert allocation["estimated_saving"] <= allocation["needed_saving"] + 1e-9


def test_sensitivity_is_404_naming_the_reason(api: Api) -> None:
    uniform = _insert(api, {"algorithm": "uniform", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}]})
    response = api.client.get(f"/experiments/{uniform}/sensitivity")
    assert response.status_code == 404
    assert "not a sensitivity experiment" in response.json()["detail"] and "uniform" in response.json()["detail"]
    queued = _insert(api, SPEC, status="queued")
    response = api.client.get(f"/experiments/{queued}/sensitivity")
    assert response.status_code == 404 and "no sensitivity curves yet" in response.json()["detail"]
    assert api.client.get("/experiments/424242/sensitivity").status_code == 404
    # Another owner's experiment does not exist for this key.
    hidden = _insert(api, SPEC, state=_finished_state(SPEC), owner="bob")
    assert api.client.get(f"/experiments/{hidden}/sensitivity").status_code == 404
    assert api.client.post(f"/experiments/{hidden}/reallocate", json={"budget": {"flops": 0.5}}).status_code == 404


def test_reallocate_creates_a_queued_experiment_with_the_old_curves_and_dispatches_it(api: Api) -> None:
    state = _finished_state(SPEC)
    source = _insert(api, SPEC, state=state)
    response = api.client.post(f"/experiments/{source}/reallocate", json={"budget": {"flops": 0.25}})
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"] != source and created["status"] == "queued" and created["algorithm"] == "sensitivity"
    assert created["owner"] == "alice" and created["entrypoint"] == "examples.digits"
    assert created["name"] == "profiled (re-allocated, flops 0.25)"
    config = created["config"]
    assert parse_algorithm_config(config).budget == Budget(flops=0.25)
    assert config["curves"] == state["curves"]
    for key in ("config_list", "base_algo", "levels", "refine_candidates", "finetune_epochs", "seed", "candidate_eval"):
        assert config[key] == parse_algorithm_config(SPEC).model_dump(mode="json")[key], key
    # Committed, then handed to the workers.
    assert api.dispatcher.sent == [("experiments.run", created["id"])]
    with api.session() as session:
        notes = list(session.scalars(select(Event).where(Event.experiment_id == created["id"], Event.kind == "note")))
        assert [n.payload["source_experiment_id"] for n in notes] == [source]
    # The worker's strategy for that config asks the candidates at once: no profiling job.
    strategy = make_strategy(config)
    new_state, jobs = strategy.ask(strategy.start(fake_problem(budget={"flops": 0.25})))
    assert jobs and all(job.context["stage"] == "candidate" and job.budget_ratio == 0.25 for job in jobs)
    assert new_state.reused  # type: ignore[attr-defined]
    # Its own curves are the reused ones, so it re-allocates again.
    with api.session() as session:
        row = session.get(Experiment, created["id"])
        row.status, row.search_state = ExperimentStatus.succeeded.value, new_state.model_dump(mode="json")
        session.commit()
    again = api.client.post(f"/experiments/{created['id']}/reallocate", json={"budget": {"params": 0.5}, "name": "p"})
    assert again.status_code == 201 and again.json()["config"]["curves"] == state["curves"]
    assert api.client.get(f"/experiments/{created['id']}/sensitivity").json()["reused"] is True


def test_reallocating_an_experiment_without_a_budget_drops_the_config_list_sparsities(api: Api) -> None:
    spec = {"algorithm": "sensitivity", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]},
                                                        {"exclude": True, "op_names": ["fc1"]}],
            "levels": [0.5]}
    source = _insert(api, spec, state=_finished_state(spec))
    response = api.client.post(f"/experiments/{source}/reallocate", json={"budget": {"flops": 0.4}, "name": "x"})
    assert response.status_code == 201, response.text
    entries = response.json()["config"]["config_list"]
    assert [e["sparsity"] for e in entries] == [None, None]
    assert [e["op_types"] for e in entries] == [["Conv2d", "Linear"], []] and entries[1]["exclude"] is True


def test_reallocate_refuses_what_it_cannot_do(api: Api) -> None:
    state = _finished_state(SPEC)
    running = _insert(api, SPEC, status="running", state=state)
    response = api.client.post(f"/experiments/{running}/reallocate", json={"budget": {"flops": 0.5}})
    assert response.status_code == 409 and "running" in response.json()["detail"]
    never_profiled = _insert(api, SPEC, status="failed", state=None)
    response = api.client.post(f"/experiments/{never_profiled}/reallocate", json={"budget": {"flops": 0.5}})
    assert response.status_code == 409 and "no sensitivity curves" in response.json()["detail"]
    uniform = _insert(api, {"algorithm": "uniform", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}]})
    response = api.client.post(f"/experiments/{uniform}/reallocate", json={"budget": {"flops": 0.5}})
    assert response.status_code == 404 and "not a sensitivity experiment" in response.json()["detail"]
    done = _insert(api, SPEC, state=state)
    # FLOPs curves carry FLOPs and params ratios, never latency: a latency budget needs a new profile.
    response = api.client.post(f"/experiments/{done}/reallocate", json={"budget": {"latency": 0.5}})
    assert response.status_code == 422 and response.json()["field"] == "budget"
    assert "latency" in response.json()["detail"]
    for body, named in (
        ({"budget": {"flops": 1.5}}, "flops"),
        ({"budget": {"flops": 0.5, "params": 0.5}}, "budget"),
        ({}, "budget"),
        ({"budget": {"flops": 0.5}, "levels": [0.5]}, "levels"),
        ({"budget": {"flops": 0.5}, "name": ""}, "name"),
    ):
        response = api.client.post(f"/experiments/{done}/reallocate", json=body)
        assert response.status_code == 422 and named in response.text, (body, response.text)
    # Nothing was created or sent by any refused request.
    assert api.dispatcher.sent == []
    with api.session() as session:
        assert len(list(session.scalars(select(Experiment)))) == 4
