"""One end-to-end HTTP run per search strategy through a real worker (embedded defaults, small budgets)."""

from __future__ import annotations

import io
import zipfile

import pytest

from tests.conftest import LiveService, wait_terminal

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMON = {
    "entrypoint": "examples.digits",
    "config_list": [{"sparsity": 0.5, "op_types": ["Conv2d"]}],
    "base_algo": "l1",
    "seed": 1,
}
SHORT_ANNEALING = {"start_temperature": 100, "stop_temperature": 60, "cool_down_rate": 0.7}
SPECS = {
    "annealing": {**SHORT_ANNEALING, "batch_size": 2},
    "netadapt": {"target_resource_ratio": 0.8, "initial_reduction": 0.1, "short_term_finetune_epochs": 0,
                 "resource": "flops"},
    "admm": {"num_iterations": 2, "training_epochs": 1, "retrain_epochs": 1},
    "autocompress": {**SHORT_ANNEALING, "num_rounds": 2, "admm_iterations": 1, "final_finetune_epochs": 0},
    "optuna": {"num_trials": 4, "objectives": ["score", "flops"], "n_startup_trials": 2, "population_size": 2},
}


def test_every_strategy_runs_over_http(live_embedded: LiveService) -> None:
    with live_embedded.http() as client:
        ids = {}
        for algorithm, params in SPECS.items():
            body = {**COMMON, **params, "algorithm": algorithm, "name": f"e2e {algorithm}"}
            response = client.post("/experiments", json=body)
            assert response.status_code == 201, response.text
            ids[algorithm] = response.json()["id"]
        for algorithm, experiment_id in ids.items():
            final = wait_terminal(client, experiment_id, timeout=400)
            assert final["status"] == "succeeded", (algorithm, final.get("error"), live_embedded.logs())
            trials = client.get(f"/experiments/{experiment_id}/trials", params={"limit": 1000}).json()
            assert trials["total"] >= 1
            assert all(t["status"] in ("succeeded", "failed") for t in trials["items"])
            best = client.get(f"/experiments/{experiment_id}/best").json()
            assert best["score"] is not None
            if algorithm == "netadapt":
                assert best["flops_ratio"] <= 0.8 + 1e-9
            else:
                assert best["overall_sparsity"] == pytest.approx(0.5, abs=0.005), algorithm
            # the physical result sits next to the nominal one
            assert 0 < best["params_ratio"] < 1 and 0 < best["flops_ratio"] < 1
            pareto = client.get(f"/experiments/{experiment_id}/pareto").json()
            assert pareto["flops"], algorithm
            scores = [p["score"] for p in pareto["flops"]]
            assert scores == sorted(scores)  # more FLOPs must buy a better score on the front
            assert best["model_available"], algorithm  # every strategy's best downloads as a shrunk model
            archive = zipfile.ZipFile(io.BytesIO(client.get(f"/experiments/{experiment_id}/model").content))
            assert sorted(archive.namelist()) == ["model.safetensors", "recipe.json"]
            by_score = client.get(f"/experiments/{experiment_id}/trials", params={"order_by": "score"}).json()
            finished = [t["score"] for t in by_score["items"] if t["score"] is not None]
            assert finished == sorted(finished, reverse=True)
        ranked = client.get(
            "/experiments", params={"entrypoint": "examples.digits", "order_by": "best_score"}
        ).json()["items"]
        ranked_scores = [e["best_score"] for e in ranked]
        assert ranked_scores == sorted(ranked_scores, reverse=True) and len(ranked) == len(SPECS)


BUDGET = {"flops": 0.35}
BUDGET_SPECS = {
    "uniform": {},
    "annealing": {**SHORT_ANNEALING, "batch_size": 2},
    "optuna": {"num_trials": 4, "n_startup_trials": 2},
}


def test_searches_under_a_flops_budget_over_http(live_embedded: LiveService) -> None:
    with live_embedded.http() as client:
        ids = {}
        for algorithm, params in BUDGET_SPECS.items():
            body = {
                **COMMON,
                **params,
                "config_list": [{"op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": ["fc2"]}],
                "budget": BUDGET,
                "algorithm": algorithm,
                "name": f"budget {algorithm}",
            }
            response = client.post("/experiments", json=body)
            assert response.status_code == 201, response.text
            ids[algorithm] = response.json()["id"]
        bests = {}
        for algorithm, experiment_id in ids.items():
            final = wait_terminal(client, experiment_id, timeout=400)
            assert final["status"] == "succeeded", (algorithm, final.get("error"), live_embedded.logs())
            trials = client.get(f"/experiments/{experiment_id}/trials", params={"limit": 1000}).json()["items"]
            # Every candidate was projected onto the budget and measured on the shrunk model.
            for trial in trials:
                assert trial["feasible"] is True, trial
                assert trial["budget_ratio"] == trial["flops_ratio"] <= 0.35
                assert trial["evaluation"]["bn_recalibration"] is True
            best = client.get(f"/experiments/{experiment_id}/best").json()
            assert best["budget"] == BUDGET and best["feasible"] is True
            assert best["flops_ratio"] <= 0.35 + 0.01
            bests[algorithm] = best
            if algorithm == "annealing":
                searched = [t for t in trials if t["context"].get("phase") != "finalists"]
                decided = [t for t in searched if "decision" in t["context"]]
                assert decided and all(t["context"]["decision"] in ("accepted", "rejected") for t in decided)
                # Then the finalist round a budget brings by default: the best is the finalist chosen there.
                finalists = [t for t in trials if t["context"].get("phase") == "finalists"]
                assert finalists and finalists[0]["job_key"] == "finalist-uniform"
                chosen = [t for t in finalists if t["context"]["decision"] == "chosen"]
                assert [t["id"] for t in chosen] == [best["trial_id"]]
                worse = [t for t in decided if "acceptance_probability" in t["context"]]
                assert all(0.0 <= t["context"]["acceptance_probability"] <= 1.0 for t in worse)
        # Uniform-at-budget is one sparsity for every unit (up to one channel each where the projection spent the
        # rounding slack: the digits CNN's narrowest unit has 16); the searches start from or around it.
        levels = bests["uniform"]["distribution"].values()
        assert max(levels) - min(levels) <= 1 / 16 + 1e-6
        assert bests["annealing"]["score"] >= bests["uniform"]["score"]


def test_pattern_search_over_http(live_embedded: LiveService) -> None:
    # optuna over which of digits' two Linear layers get 2:4, within 0.05 of the dense accuracy; four
    # assignments in all, so it stops once it has evaluated each.
    body = {
        "entrypoint": "examples.digits", "name": "e2e pattern", "algorithm": "optuna", "base_algo": "level",
        "seed": 1, "num_trials": 6, "n_startup_trials": 2, "score_target_drop": 0.05,
        "config_list": [{"pattern": "2:4", "op_types": ["Linear"]}],
    }
    with live_embedded.http() as client:
        response = client.post("/experiments", json=body)
        assert response.status_code == 201, response.text
        experiment_id = response.json()["id"]
        final = wait_terminal(client, experiment_id, timeout=300)
        assert final["status"] == "succeeded", (final.get("error"), live_embedded.logs())
        trials = client.get(f"/experiments/{experiment_id}/trials", params={"limit": 100}).json()["items"]
        dense = next(t for t in trials if t["job_key"] == "optuna-0")
        assert all(v == 0 for v in dense["requested"].values())
        target = dense["score"] - 0.05
        best = client.get(f"/experiments/{experiment_id}/best").json()
        assert best["score"] >= target
        for trial in trials:
            if trial["job_key"].startswith("optuna-") and trial["score"] is not None:
                assert (trial["context"].get("decision") == "infeasible") == (trial["score"] < target), trial
        assert best["model_available"]
        missing = client.post("/experiments", json={**body, "score_target_drop": None})
        assert missing.status_code == 422 and "score_target_drop" in missing.text
