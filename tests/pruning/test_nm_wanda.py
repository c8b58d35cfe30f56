"""N:M semi-structured masks and the wanda criterion, on tiny hand-computable layers."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from pruning.config import ConfigEntry, resolve_config_list
from pruning.importance import get_importance
from pruning.masks import achieved_sparsity
from pruning.nm import nm_keep_mask, satisfies_pattern
from pruning.pruner import compute_masks
from pruning.search.configs import parse_algorithm_config
from pruning.task import Task
from tests.pruning.models import ThreeLinear, model_factory


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_wanda_scores_are_weight_times_input_norm() -> None:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    model = nn.Sequential(layer)
    batches = [torch.tensor([[1.0, 0.0], [2.0, 1.0]]), torch.tensor([[2.0, 0.0]])]
    task = Task(
        entrypoint="tests.wanda",
        model=lambda: model,
        evaluator=lambda m: 0.0,
        dummy_input=lambda: batches[0],
        calibration_data=lambda: iter(batches),
    )
    importance = get_importance("wanda")
    importance.collect(model, ["0"], task)
    # ||X_0|| = sqrt(1 + 4 + 4) = 3, ||X_1|| = sqrt(0 + 1 + 0) = 1
    expected = torch.tensor([[1.0 * 3, 2.0 * 1], [3.0 * 3, 0.5 * 1]])
    assert torch.allclose(importance("0", layer), expected)


def test_nm_mask_keeps_the_top_n_of_every_group() -> None:
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 9.0, 0.0, 0.0, 8.0]])
    keep = nm_keep_mask(scores, (2, 4))
    assert keep.tolist() == [[False, True, False, True, True, False, False, True]]
    assert satisfies_pattern(scores * keep, (2, 4)) and not satisfies_pattern(scores, (2, 4))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_pattern_masks_meet_the_pattern_exactly(pattern: str) -> None:
    torch.manual_seed(0)
    model = TwoLinear()
    problem = resolve_config_list(
        model, [{"pattern": pattern, "op_names": ["fc1", "fc2"]}], "level", torch.zeros(1, 8)
    )
    n, m = (int(v) for v in pattern.split(":"))
    assert [u.pattern for u in problem.units] == [(n, m), (n, m)]
    distribution = {u.name: 1 - n / m for u in problem.units}
    masks = compute_masks(model, problem, distribution)
    for name, mask in masks.items():
        weight = dict(model.named_modules())[name].weight.detach() * mask
        assert satisfies_pattern(weight, (n, m))
        assert int((weight.reshape(weight.shape[0], -1, m) != 0).sum(-1).max()) == n
    achieved = achieved_sparsity(masks, problem)
    assert achieved == pytest.approx({"fc1": 1 - n / m, "fc2": 1 - n / m})
    with pytest.raises(ValueError, match="its sparsity is 0 or"):
        compute_masks(model, problem, {"fc1": 0.3, "fc2": 0.0})


def test_pattern_validation_names_the_field() -> None:
    for bad, why in [("4:4", "N must be below M"), ("2:16", "M must be one of"), ("x", "N:M")]:
        with pytest.raises(ValidationError, match=why):
            ConfigEntry.model_validate({"pattern": bad, "op_types": ["Linear"]})
    with pytest.raises(ValidationError, match="do not give sparsity"):
        ConfigEntry.model_validate({"pattern": "2:4", "sparsity": 0.5, "op_types": ["Linear"]})
    entry = [{"pattern": "2:4", "op_types": ["Linear"]}]
    with pytest.raises(ValidationError, match=r"config_list\[0\]\.pattern.*removes whole channels"):
        parse_algorithm_config({"algorithm": "uniform", "base_algo": "l1", "config_list": entry})
    with pytest.raises(ValidationError, match=r"score_target_drop: config_list\[0\] has a pattern"):
        parse_algorithm_config({"algorithm": "annealing", "base_algo": "level", "config_list": entry})
    parse_algorithm_config({"algorithm": "uniform", "base_algo": "wanda", "config_list": entry})
    with pytest.raises(ValueError, match="not a multiple of M=8"):
        resolve_config_list(
            nn.Sequential(nn.Linear(12, 4)), [{"pattern": "4:8", "op_names": ["0"]}], "level", torch.zeros(1, 12)
        )
    with pytest.raises(ValueError, match="scores the input channels of Linear"):
        resolve_config_list(
            nn.Sequential(nn.Conv2d(1, 2, 1)), [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "wanda",
            torch.zeros(1, 1, 2, 2),
        )


def test_uniform_job_exports_the_pattern(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import execute_job
    from pruning.search.base import Job, SearchProblem

    torch.manual_seed(0)
    state = TwoLinear().state_dict()

    model = model_factory(TwoLinear, state)

    inputs = [torch.randn(4, 8) for _ in range(3)]
    task = Task(
        entrypoint="tests.nm",
        model=model,
        evaluator=lambda net: float(net(inputs[0]).detach().sum()),
        dummy_input=lambda: inputs[0],
        calibration_data=lambda: iter(inputs),
    )
    pruning = resolve_config_list(model(), [{"pattern": "2:4", "op_names": ["fc1"]}], "wanda", inputs[0])
    store = ArtifactStore(tmp_path)
    job = Job(key="uniform-0", distribution={"fc1": 0.5}, save_artifact=True)
    result = execute_job(task, SearchProblem(pruning=pruning), job, store)
    assert result.status == "succeeded", result.error
    assert result.requested == {"fc1": 0.5} and result.achieved == {"fc1": 0.5}
    assert "not measured" in result.extra["nm"]["speedup"]
    tensors, meta = store.get(result.extra["model_artifact"])
    assert meta["patterns"]["fc1"]["pattern"] == "2:4"
    weight = tensors["fc1.weight"]
    assert weight.dim() == 2 and weight.is_contiguous() and satisfies_pattern(weight, (2, 4))
    assert result.params == sum(p.numel() for p in model().parameters()) - 16 * 4  # half of fc1's 128 weights


def _owl_task() -> Task:
    torch.manual_seed(0)
    state = ThreeLinear().state_dict()
    with torch.no_grad():
        # Planted outliers: every 4th weight of b is 100 times the largest initial weight.
        state["b.weight"].view(-1)[::4] = 25.0

    model = model_factory(ThreeLinear, state)

    inputs = [torch.randn(8, 16) for _ in range(2)]
    x_eval = torch.randn(32, 16)
    return Task(
        entrypoint="tests.owl",
        model=model,
        evaluator=lambda net: float(-(net(x_eval) - model()(x_eval)).pow(2).mean().detach()),
        dummy_input=lambda: inputs[0],
        calibration_data=lambda: iter(inputs),
    )


def test_owl_prunes_the_outlier_layer_less_and_keeps_the_mean() -> None:
    from pruning.config import overall_sparsity
    from pruning.owl import outlier_ratios, owl_allocation

    task = _owl_task()
    config_list = [{"sparsity": 0.5, "op_types": ["Linear"]}]
    problem = resolve_config_list(task.model(), config_list, "wanda", task.dummy_input())
    ratios = outlier_ratios(task.model(), problem, task)
    assert ratios["b"] > ratios["a"] and ratios["b"] > ratios["c"]
    allocation = owl_allocation(ratios, problem, 0.5)
    assert allocation["b"] < 0.5 and allocation["b"] == min(allocation.values())
    assert max(abs(v - 0.5) for v in allocation.values()) <= 0.16 + 1e-9
    assert overall_sparsity(allocation, problem) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "search",
    [
        {"algorithm": "annealing", "cool_down_rate": 0.5, "stop_temperature": 40},
        {"algorithm": "optuna", "num_trials": 3},
    ],
    ids=["annealing", "optuna"],
)
def test_search_with_owl_starts_from_the_owl_allocation(tmp_path, search) -> None:  # type: ignore[no-untyped-def]
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import execute_job, resolve_problem
    from pruning.owl import outlier_ratios, owl_allocation
    from pruning.search import make_strategy

    task = _owl_task()
    config = parse_algorithm_config(
        {
            **search,
            "base_algo": "wanda",
            "prior": "owl",
            "config_list": [{"sparsity": 0.5, "op_types": ["Linear"]}],
        }
    )
    problem = resolve_problem(task, config)
    strategy = make_strategy(config)
    state, jobs = strategy.ask(strategy.start(problem))
    expected = owl_allocation(outlier_ratios(task.model(), problem.pruning, task), problem.pruning, 0.5)
    assert jobs[0].distribution == pytest.approx(expected)
    store = ArtifactStore(tmp_path)
    while jobs:
        state = strategy.tell(state, [execute_job(task, problem, job, store) for job in jobs])
        state, jobs = strategy.ask(state)
    assert state.done and state.best_key is not None
    with pytest.raises(ValidationError, match="prior: 'owl'"):
        parse_algorithm_config({**config.model_dump(), "base_algo": "l1"})
