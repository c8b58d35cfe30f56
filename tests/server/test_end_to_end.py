"""The full HTTP path with real processes: uvicorn API + Celery worker, on the embedded defaults and on the
machine's PostgreSQL + Redis. The stored numbers must equal what the pruning library computes."""

from __future__ import annotations

import io
import json
import zipfile
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import LiveService, wait_terminal
from tests.server.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNIFORM_L1 = {
    "name": "digits uniform l1",
    "entrypoint": "examples.digits",
    "algorithm": "uniform",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
    "seed": 0,
}
UNIFORM_LEVEL = {
    **UNIFORM_L1,
    "name": "digits uniform level",
    "config_list": [{"sparsity": 0.7, "op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": ["fc2"]}],
    "base_algo": "level",
}


def _library_result(spec: dict, distribution: dict[str, float], evaluation: dict | None = None) -> dict:
    """What the pruning library computes for ``distribution`` on a fresh dense digits model, in this process (with
    the BatchNorm recalibration the trial says it got)."""
    import copy

    import examples.digits as digits
    from pruning.config import resolve_config_list
    from pruning.masks import achieved_sparsity, apply_masks, strip
    from pruning.metrics import count_nonzero, count_params_flops
    from pruning.pruner import compute_masks
    from pruning.shrink import shrink

    model = digits.model()
    problem = resolve_config_list(model, spec["config_list"], spec["base_algo"], digits.dummy_input())
    masks = compute_masks(model, problem, distribution)
    apply_masks(model, masks)
    if evaluation and evaluation.get("bn_recalibration"):
        from pruning.calibration import recalibrate_batchnorm
        from pruning.task import load_task

        recalibrate_batchnorm(model, load_task("examples.digits"), evaluation["calibration_batches"])
    score = digits.evaluator(model)
    strip(model)
    if problem.structured:
        shrunk = copy.deepcopy(model)
        shrink(shrunk, masks, digits.dummy_input())
        params, flops = count_params_flops(shrunk, digits.dummy_input())
    else:
        params = count_nonzero(model)
        _, flops = count_params_flops(model, digits.dummy_input())
    return {
        "score": score,
        "params": params,
        "flops": flops,
        "achieved": achieved_sparsity(masks, problem),
        "dense_params": problem.dense_params,
    }


def _check_run(service: LiveService) -> None:
    with service.http() as client:
        assert client.get("/readyz").json()["status"] == "ok"
        created = client.post("/experiments", json=UNIFORM_L1)
        assert created.status_code == 201, created.text
        assert created.json()["status"] == "queued"
        second = client.post("/experiments", json=UNIFORM_LEVEL).json()
        for experiment_id, spec in ((created.json()["id"], UNIFORM_L1), (second["id"], UNIFORM_LEVEL)):
            final = wait_terminal(client, experiment_id)
            assert final["status"] == "succeeded", (final, service.logs())
            trials = client.get(f"/experiments/{experiment_id}/trials").json()
            assert trials["total"] == 1
            trial = trials["items"][0]
            assert trial["status"] == "succeeded"
            best = client.get(f"/experiments/{experiment_id}/best").json()
            assert best["trial_id"] == trial["id"]
            assert final["best"]["trial_id"] == trial["id"]
            assert final["progress"]["done"] >= 1
            # The embedded defaults score candidates after BatchNorm recalibration (the model has BatchNorm).
            assert best["evaluation"] == {"finetune_epochs": 0, "bn_recalibration": True, "calibration_batches": 16}
            expected = _library_result(spec, best["distribution"], best["evaluation"])
            assert best["score"] == pytest.approx(expected["score"], abs=1e-9)
            assert best["params_after"] == expected["params"]
            assert best["flops_after"] == expected["flops"]
            assert best["params_before"] == expected["dense_params"]
            assert best["achieved"] == pytest.approx(expected["achieved"])
            assert best["overall_sparsity"] == pytest.approx(0.5 if spec is UNIFORM_L1 else 0.7, abs=0.01)
            if spec is UNIFORM_L1:
                assert best["params_after"] < best["params_before"]
                assert best["flops_after"] < best["flops_before"]
            # The pruned model downloads and rebuilds from the task's model().
            archive = zipfile.ZipFile(io.BytesIO(client.get(f"/experiments/{experiment_id}/model").content))
            assert sorted(archive.namelist()) == ["model.safetensors", "recipe.json"]
        listed = client.get("/experiments").json()["items"]
        assert [e["id"] for e in listed] == [second["id"], created.json()["id"]]  # newest first


def test_embedded_defaults_run_an_experiment_end_to_end(live_embedded: LiveService) -> None:
    _check_run(live_embedded)


def test_postgres_and_redis_run_an_experiment_end_to_end(live_services: LiveService) -> None:
    _check_run(live_services)


def test_user_failures_fail_the_experiment_and_the_worker_keeps_serving(live_embedded: LiveService) -> None:
    with live_embedded.http() as client:
        missing = client.post(
            "/experiments", json={**UNIFORM_L1, "name": "no such module", "entrypoint": "examples.does_not_exist"}
        ).json()
        broken = client.post(
            "/experiments",
            json={**UNIFORM_L1, "name": "raising evaluator", "entrypoint": "tests.tasks.broken_evaluator"},
        ).json()
        incomplete = client.post(
            "/experiments", json={**UNIFORM_L1, "name": "no evaluator", "entrypoint": "tests.tasks.missing_evaluator"}
        ).json()
        good = client.post("/experiments", json=UNIFORM_L1).json()

        final = wait_terminal(client, missing["id"])
        assert final["status"] == "failed"
        assert "examples.does_not_exist" in final["error"]
        final = wait_terminal(client, broken["id"])
        assert final["status"] == "failed"
        assert "evaluator exploded on purpose" in final["error"]
        final = wait_terminal(client, incomplete["id"])
        assert final["status"] == "failed"
        assert "evaluator" in final["error"]
        assert wait_terminal(client, good["id"])["status"] == "succeeded"
        assert all(w.poll() is None for w in live_embedded.workers)


def test_cli_client_commands_against_a_live_server(live_embedded: LiveService, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(UNIFORM_L1))
    cli = partial(run_cli, {**live_embedded.env, "PRUNEHUB_API_URL": live_embedded.url}, timeout=300)

    submitted = cli("submit", str(spec_file), "--wait")
    assert submitted.returncode == 0, submitted.stderr
    assert "succeeded" in submitted.stdout and "best trial" in submitted.stdout and "conv1" in submitted.stdout
    experiment_id = submitted.stdout.split()[1]
    status = cli("status", experiment_id)
    assert "succeeded" in status.stdout
    best = json.loads(cli("best", experiment_id, "--json").stdout)
    assert best["overall_sparsity"] == pytest.approx(0.5)
    assert experiment_id in cli("list").stdout
    trials = cli("trials", experiment_id).stdout
    assert trials.split()[:3] == ["seq", "status", "score"] and len(trials.splitlines()) == 1 + 1
    assert "uniform-0" not in trials  # table of seq/status/score, not keys
    downloaded = cli("download", experiment_id, str(tmp_path / "model"))
    assert downloaded.returncode == 0, downloaded.stderr
    missing = cli("status", "424242")
    assert missing.returncode == 2 and "404" in missing.stderr

    # The downloaded files rebuild a working, smaller module from the task's model().
    import examples.digits as digits
    import pruning
    from pruning.metrics import count_params_flops

    files = (tmp_path / "model/model.safetensors", tmp_path / "model/recipe.json")
    model = pruning.load_pruned(pruning.load_task("examples.digits"), files)
    params, _ = count_params_flops(model, digits.dummy_input())
    assert params == best["params_after"]
    assert digits.evaluator(model) == pytest.approx(best["score"], abs=1e-6)
