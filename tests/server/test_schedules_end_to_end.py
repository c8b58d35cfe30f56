"""One end-to-end HTTP run per pruning schedule (agp, iterative, lottery_ticket) and uniform with global ranking,
through one live service and a real worker (embedded defaults, tiny budgets)."""

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
SPECS = {
    "agp": {"algorithm": "agp", "end_step": 2, "frequency": 1, "finetune_epochs": 0},
    "iterative": {"algorithm": "iterative", "rounds": 2, "retrain_epochs": 1, "ranking": "global"},
    "lottery_ticket": {"algorithm": "lottery_ticket", "prune_iterations": 2, "epochs": 1, "base_algo": "level"},
    # Element magnitudes compared raw across layers: the split that emerges is never uniform. (Channel norms are
    # divided by each layer's mean before a global ranking, and on some trainings of the digits CNN that gives
    # exactly 0.5 in all three convolutions.)
    "uniform-global": {"algorithm": "uniform", "ranking": "global", "base_algo": "level"},
}
# (job kind, context key and its first value, overall sparsity per trial from the schedule's formula)
EXPECTED = {
    "agp": ("agp_step", "step", 0, [0.0, 0.5 * (1 - 0.5**3), 0.5]),
    "iterative": ("iterative_round", "round", 1, [1 - 0.5**0.5, 0.5]),
    "lottery_ticket": ("lottery_round", "round", 0, [0.0, 1 - 0.5**0.5, 0.5]),
    "uniform-global": ("evaluate", "iteration", 0, [0.5]),
}


def test_every_schedule_runs_over_http(live_embedded: LiveService) -> None:
    with live_embedded.http() as client:
        rejected = client.post(
            "/experiments",
            json={**COMMON, "name": "global fpgm", "algorithm": "uniform", "ranking": "global", "base_algo": "fpgm"},
        )
        assert rejected.status_code == 422 and "ranking" in rejected.text, rejected.text
        ids = {}
        for name, spec in SPECS.items():
            response = client.post("/experiments", json={**COMMON, **spec, "name": f"e2e {name}"})
            assert response.status_code == 201, response.text
            ids[name] = response.json()["id"]
        for name, experiment_id in ids.items():
            final = wait_terminal(client, experiment_id, timeout=300)
            assert final["status"] == "succeeded", (name, final.get("error"), live_embedded.logs())
            kind, context_key, first, sparsities = EXPECTED[name]
            trials = client.get(f"/experiments/{experiment_id}/trials", params={"limit": 1000}).json()["items"]
            trials.sort(key=lambda t: t["seq"])
            assert [t["kind"] for t in trials] == [kind] * len(sparsities), name
            assert all(t["status"] == "succeeded" for t in trials), name
            assert [t["context"][context_key] for t in trials] == list(range(first, first + len(sparsities)))
            tolerance = 0.02 if name != "lottery_ticket" else 0.001  # whole channels vs elements
            for trial, sparsity in zip(trials, sparsities, strict=True):
                assert trial["overall_sparsity"] == pytest.approx(sparsity, abs=tolerance), (name, trial["context"])
                assert trial["score"] is not None
            best = client.get(f"/experiments/{experiment_id}/best").json()
            assert best["trial_id"] == trials[-1]["id"], name  # the step at the target is the deliverable
            assert best["overall_sparsity"] == pytest.approx(0.5, abs=0.02), name
            assert 0 < best["params_ratio"] < 1, name
            if "global" in name or name == "iterative":
                # one threshold across layers: the per-layer split emerged from the weights
                assert len({round(v, 4) for v in best["requested"].values()}) > 1, best["requested"]
            assert client.get(f"/experiments/{experiment_id}/pareto").json()["params"], name
            assert best["model_available"], name
            archive = zipfile.ZipFile(io.BytesIO(client.get(f"/experiments/{experiment_id}/model").content))
            assert sorted(archive.namelist()) == ["model.safetensors", "recipe.json"]
