"""A sensitivity experiment over HTTP through a real worker on the digits task, then its re-allocation for
another budget, which evaluates only new candidates."""

from __future__ import annotations

import pytest

from tests.conftest import LiveService, wait_terminal

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = {
    "name": "digits sensitivity",
    "entrypoint": "examples.digits",
    "algorithm": "sensitivity",
    "config_list": [{"op_types": ["Conv2d"]}],
    "base_algo": "l1",
    "budget": {"flops": 0.35},
    "levels": [0.5],
    "refine_candidates": 1,
    "seed": 0,
}


def _trials(client, experiment_id: int) -> list[dict]:  # type: ignore[no-untyped-def]
    return client.get(f"/experiments/{experiment_id}/trials", params={"limit": 1000}).json()["items"]


def test_sensitivity_profiles_allocates_and_reallocates_over_http(live_embedded: LiveService) -> None:
    with live_embedded.http() as client:
        created = client.post("/experiments", json=SPEC)
        assert created.status_code == 201, created.text
        experiment_id = created.json()["id"]
        final = wait_terminal(client, experiment_id, timeout=300)
        assert final["status"] == "succeeded", (final.get("error"), live_embedded.logs())

        trials = _trials(client, experiment_id)
        by_stage: dict[str, list[dict]] = {}
        for trial in trials:
            # The search's own stages, then the finalist round a budget brings by default.
            by_stage.setdefault(trial["context"].get("stage") or trial["context"]["phase"], []).append(trial)
        # digits has three convolutions: the baseline, one profile per unit at 0.5, the allocation and uniform.
        assert [len(by_stage[s]) for s in ("baseline", "profile", "candidate")] == [1, 3, 2]
        finalists = by_stage["finalists"]  # uniform-at-budget and the candidates that are not uniform, fine-tuned
        assert finalists[0]["job_key"] == "finalist-uniform" and 1 <= len(finalists) <= 3
        assert all(t["status"] == "succeeded" for t in trials)
        assert by_stage["baseline"][0]["flops_ratio"] == pytest.approx(1.0)
        for trial in by_stage["profile"]:
            assert trial["context"]["decision"] == "profiled"
            pruned = [name for name, value in trial["distribution"].items() if value > 0]
            assert pruned == [trial["context"]["unit"]] and trial["flops_ratio"] < 1.0
        for trial in by_stage["candidate"] + finalists:  # projected onto the budget, measured on the shrunk model
            assert trial["feasible"] is True and trial["budget_ratio"] <= 0.35 + 0.01
            assert trial["context"]["decision"] in ("chosen", "candidate", "finalist")
        assert all(t["kind"] == "finetune_and_evaluate" for t in finalists)
        # The experiment's best is the finalist that scored best after its fine-tune.
        chosen = [t for t in trials if t["context"].get("decision") == "chosen" and t in finalists]
        assert [t["id"] for t in chosen] == [final["best"]["trial_id"]]
        assert final["best_score"] == max(t["score"] for t in finalists)

        curves = client.get(f"/experiments/{experiment_id}/sensitivity").json()
        assert curves["resource"] == "flops" and curves["reused"] is False
        assert curves["baseline_score"] == by_stage["baseline"][0]["score"]
        assert [u["name"] for u in curves["units"]] == ["conv1", "conv2", "conv3"]
        profiled = {t["context"]["unit"]: t for t in by_stage["profile"]}
        for unit in curves["units"]:
            (point,) = unit["points"]
            assert point["sparsity"] == 0.5 and point["score"] == profiled[unit["name"]]["score"]
            assert point["ratio"] == profiled[unit["name"]]["budget_ratio"]
        assert curves["allocation"]["needed_saving"] == pytest.approx(0.65)

        again = client.post(f"/experiments/{experiment_id}/reallocate", json={"budget": {"flops": 0.5}})
        assert again.status_code == 201, again.text
        second = wait_terminal(client, again.json()["id"], timeout=300)
        assert second["status"] == "succeeded", (second.get("error"), live_embedded.logs())
        reallocated = _trials(client, second["id"])
        # No profiling, and no finalist round by default when stored curves are re-allocated: only the two
        # candidates, each at the new budget.
        assert [t["context"]["stage"] for t in reallocated] == ["candidate", "candidate"]
        assert all(t["feasible"] and t["budget_ratio"] <= 0.5 + 0.01 for t in reallocated)
        reused = client.get(f"/experiments/{second['id']}/sensitivity").json()
        assert reused["reused"] is True and reused["units"] == [
            {**unit, "allocated": reused["allocation"]["distribution"][unit["name"]]} for unit in curves["units"]
        ]
        # A lighter budget needs less saving, so the one threshold cuts earlier: no unit is pruned more.
        lighter, tighter = reused["allocation"]["distribution"], curves["allocation"]["distribution"]
        assert all(lighter[name] <= tighter[name] + 1e-12 for name in tighter) and lighter != tighter
        assert client.get(f"/experiments/{second['id']}/model").status_code == 200
