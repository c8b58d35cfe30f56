"""The distributed runner on the machine's PostgreSQL and Redis: one coordinator, several evaluation workers."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import LiveService, _run_live, wait_terminal

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISTRIBUTED = {
    "PRUNEHUB_RUNNER": "distributed",
    "PRUNEHUB_WORKER_HEARTBEAT_S": "0.5",
    "PRUNEHUB_LEASE_GRACE_S": "3",
    "PRUNEHUB_REAPER_INTERVAL_S": "1",
}
NETADAPT = {
    "name": "distributed netadapt",
    "entrypoint": "examples.digits",
    "algorithm": "netadapt",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
    "seed": 5,
    "target_resource_ratio": 0.8,
    "initial_reduction": 0.1,
    "short_term_finetune_epochs": 0,
    "resource": "flops",
}


def _history(client, experiment_id: int) -> list[tuple]:  # type: ignore[no-untyped-def]
    items = client.get(f"/experiments/{experiment_id}/trials", params={"limit": 1000}).json()["items"]
    return [
        (t["seq"], t["job_key"], t["status"], round(t["score"], 9) if t["score"] is not None else None,
         t["flops"], t["context"].get("decision"))
        for t in items
    ]


def _run_with(env: dict[str, str], home: Path, evaluation_workers: int, spec: dict) -> tuple[list[tuple], dict]:
    home.mkdir()
    (home / "examples").mkdir()
    for cached in (Path(env["PRUNEHUB_HOME"]) / "examples").glob("*.safetensors"):
        (home / "examples" / cached.name).write_bytes(cached.read_bytes())
    env = {**env, "PRUNEHUB_HOME": str(home), "PRUNEHUB_ARTIFACTS_DIR": str(home / "artifacts")}
    service = LiveService(home, env)
    for live in _run_live_without_worker(service):
        live.start_worker("experiments")
        for _ in range(evaluation_workers):
            live.start_worker("evaluations")
        with live.http() as client:
            created = client.post("/experiments", json=spec)
            assert created.status_code == 201, created.text
            experiment_id = created.json()["id"]
            final = wait_terminal(client, experiment_id, timeout=400)
            assert final["status"] == "succeeded", (final, live.logs())
            return _history(client, experiment_id), client.get(f"/experiments/{experiment_id}/best").json()
    raise AssertionError("unreachable")


def _run_live_without_worker(service: LiveService):  # type: ignore[no-untyped-def]
    # _run_live starts one default worker (both queues); stop it so the test decides the topology.
    for live in _run_live(service):
        live.workers[0].send_signal(signal.SIGTERM)
        live.workers[0].wait(30)
        live.workers.clear()
        yield live


def test_three_evaluation_workers_give_the_same_history_as_one(services_env: dict[str, str], tmp_path: Path) -> None:
    env = {**services_env, **DISTRIBUTED}
    one, best_one = _run_with(env, tmp_path / "one", 1, NETADAPT)
    from tests.conftest import _reset_postgres

    _reset_postgres(env["PRUNEHUB_DATABASE_URL"])
    three, best_three = _run_with(env, tmp_path / "three", 3, NETADAPT)
    assert len(one) >= 5  # the baseline and at least two iterations of parallel candidates
    assert three == one
    assert best_three["distribution"] == best_one["distribution"] and best_three["model_available"]


def test_a_killed_evaluation_workers_job_is_taken_by_another(services_env: dict[str, str], tmp_path: Path) -> None:
    env = {**services_env, **DISTRIBUTED, "PRUNEHUB_TEST_EVAL_DELAY": "4"}
    spec = {**NETADAPT, "entrypoint": "tests.tasks.slow_evaluator"}
    for live in _run_live_without_worker(LiveService(tmp_path, env)):
        live.start_worker("experiments")
        victim = live.start_worker("evaluations")
        with live.http() as client:
            experiment_id = client.post("/experiments", json=spec).json()["id"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # wait until the victim holds a job
                running = client.get(f"/experiments/{experiment_id}/trials", params={"status": "running"}).json()
                if running["total"]:
                    break
                time.sleep(0.2)
            taken = running["items"][0]["id"]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            live.start_worker("evaluations")
            final = wait_terminal(client, experiment_id, timeout=400)
            assert final["status"] == "succeeded", (final, live.logs())
            trial = next(t for t in client.get(f"/experiments/{experiment_id}/trials",
                                               params={"limit": 1000}).json()["items"] if t["id"] == taken)
            assert trial["status"] == "succeeded"
        from sqlalchemy import create_engine

        from server.db.models import Trial

        engine = create_engine(env["PRUNEHUB_DATABASE_URL"])
        with engine.connect() as conn:
            attempts = conn.execute(select(Trial.attempts).where(Trial.id == taken)).scalar()
        engine.dispose()
        assert attempts == 2  # ran again exactly once, on the new worker


def test_two_advances_racing_for_one_step_insert_it_once(services_env: dict[str, str], tmp_path: Path) -> None:
    from sqlalchemy import func

    from pruning.search.configs import parse_algorithm_config
    from server.db.migrate import upgrade
    from server.db.models import Experiment, Trial
    from server.db.session import make_engine, make_session_factory
    from server.services.experiments import create_experiment
    from server.settings import Settings
    from worker.runner import CeleryTransport, RunContext, advance

    url = services_env["PRUNEHUB_DATABASE_URL"]
    upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    settings = Settings(database_url=url, artifacts_dir=tmp_path, runner="distributed")
    annealing = {"algorithm": "annealing", "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
                 "batch_size": 4}
    import examples.digits as digits
    from pruning.config import resolve_config_list
    from pruning.search.base import SearchProblem

    problem = SearchProblem(pruning=resolve_config_list(digits.model(), annealing["config_list"], "l1",
                                                        digits.dummy_input()))
    with factory() as session:
        experiment = create_experiment(session, owner="t", name="race", entrypoint="examples.digits",
                                       config=parse_algorithm_config(annealing), allowed_prefixes=["examples."])
        experiment.problem = problem.model_dump(mode="json")
        session.commit()
        experiment_id = experiment.id
    sent: list[tuple[str, int]] = []
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def race() -> None:
        barrier.wait()
        transport = CeleryTransport(lambda name, target: sent.append((name, target)), factory, settings)
        outcomes.append(advance(experiment_id, RunContext(factory, settings, "racer", transport)))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with factory() as session:
        step = session.get(Experiment, experiment_id).step  # type: ignore[union-attr]
        jobs = session.scalar(select(func.count()).where(Trial.experiment_id == experiment_id))
    engine.dispose()
    assert step == 1
    assert sum(outcome.startswith("step 1") for outcome in outcomes) == 1, outcomes
    assert len(sent) == jobs == 1  # annealing's first step is the single start point; sent once
