"""The shipped ViT example end to end over HTTP: a FLOPs-budget search over heads and MLP channels, a real worker,
and the shrunk model downloaded and rebuilt from the task's model()."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, LiveService, wait_terminal

pytest.importorskip("transformers")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = json.loads((ROOT / "examples" / "digits_vit_budget.json").read_text())


def test_vit_budget_search_over_http_downloads_a_model_with_fewer_heads(
    live_embedded: LiveService, tmp_path: Path
) -> None:
    with live_embedded.http() as client:
        created = client.post("/experiments", json=SPEC)
        assert created.status_code == 201, created.text
        experiment_id = created.json()["id"]
        final = wait_terminal(client, experiment_id, timeout=300)
        assert final["status"] == "succeeded", (final.get("error"), live_embedded.logs())
        trials = client.get(f"/experiments/{experiment_id}/trials", params={"limit": 1000}).json()["items"]
        assert len(trials) >= 2
        for trial in trials:  # every candidate was projected onto the budget and measured shrunk
            assert trial["feasible"] is True, trial
            assert trial["flops_ratio"] <= 0.5
        best = client.get(f"/experiments/{experiment_id}/best").json()
        assert best["budget"] == {"flops": 0.5} and best["feasible"] is True
        assert best["flops_after"] < best["flops_before"] and best["params_after"] < best["params_before"]
        layers = [f"net.vit.layers.{i}" for i in range(3)]
        assert sorted(best["distribution"]) == sorted([f"{la}.attention.q_proj" for la in layers] + [
            f"{la}.mlp.fc1" for la in layers
        ])
        for i in range(3):  # heads go whole: q, k and v of a layer lose the same quarter(s) of their rows
            lost = {best["achieved"][f"net.vit.layers.{i}.attention.{p}_proj"] for p in "qkv"}
            assert len(lost) == 1 and (4 * lost.pop()).is_integer()
        archive = zipfile.ZipFile(io.BytesIO(client.get(f"/experiments/{experiment_id}/model").content))
        assert sorted(archive.namelist()) == ["model.safetensors", "recipe.json"]
        archive.extractall(tmp_path)

    import examples.digits_vit as digits_vit
    import pruning
    from pruning.metrics import count_params_flops

    model = pruning.load_pruned(
        pruning.load_task("examples.digits_vit"), (tmp_path / "model.safetensors", tmp_path / "recipe.json")
    )
    assert count_params_flops(model, digits_vit.dummy_input()) == (best["params_after"], best["flops_after"])
    attention = dict(model.named_modules())["net.vit.layers.0.attention"]
    kept_heads = round(4 * (1 - best["achieved"]["net.vit.layers.0.attention.q_proj"]))
    assert attention.num_attention_heads == kept_heads == attention.q_proj.out_features // 8
    assert digits_vit.evaluator(model) == pytest.approx(best["score"], abs=1e-6)
