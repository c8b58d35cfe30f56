"""Hand-computable cases for every criterion, exact counts, deterministic ties."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from pruning.config import (
    PruningProblem,
    PruningUnit,
    initial_distribution,
    overall_sparsity,
    pruned_count,
    resolve_config_list,
)
from pruning.importance import (
    APoZImportance,
    FPGMImportance,
    L1Importance,
    L2Importance,
    LevelImportance,
    MeanActivationImportance,
    SlimImportance,
    TaylorFOImportance,
    block_scores,
    get_importance,
)
from pruning.pruner import compute_masks, global_distribution, keep_mask, select_channels
from tests.pruning.conftest import DuckTask, synthetic
from tests.pruning.models import PlainCNN, ResNetTiny, seeded

SPARSITIES = [i / 10 for i in range(10)]


@functools.cache
def _resolved(model_name: str, algo: str) -> tuple[nn.Module, PruningProblem]:
    """One traced problem per (model, algorithm) for the many count cases (compute_masks never mutates)."""
    model = seeded(ResNetTiny() if model_name == "resnet" else PlainCNN())
    types = ["Conv2d"] if model_name == "resnet" else ["default"]
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": types}], algo, torch.randn(2, 3, 8, 8))
    return model, problem


def _linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def test_keep_mask_exact_and_ties_lowest_index_first() -> None:
    scores = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0])
    assert keep_mask(scores, 2).tolist() == [True, False, False, True, True]
    assert keep_mask(scores, 0).all() and not keep_mask(scores, 5).any()
    assert keep_mask(torch.ones(6), 3).tolist() == [False, False, False, True, True, True]


def test_level_prunes_smallest_magnitudes() -> None:
    layer = _linear([[0.1, -0.5], [0.3, -0.2]])
    scores = LevelImportance()("w", layer)
    assert scores is not None
    assert keep_mask(scores.flatten(), 2).view(2, 2).tolist() == [[False, True], [True, False]]


def test_l1_l2_filter_norms() -> None:
    layer = _linear([[3.0, 4.0], [-6.0, 0.0], [1.0, 1.0]])
    l1, l2 = L1Importance()("w", layer), L2Importance()("w", layer)
    assert l1 is not None and l2 is not None
    assert l1.tolist() == [7.0, 6.0, 2.0]
    assert l2.tolist() == pytest.approx([5.0, 6.0, 2**0.5])
    # L1 and L2 disagree on which of the first two filters is weaker
    assert keep_mask(l1, 2).tolist() == [True, False, False]
    assert keep_mask(l2, 2).tolist() == [False, True, False]
    assert L1Importance()("bn", nn.BatchNorm2d(3)) is None


def test_fpgm_prunes_filter_nearest_geometric_median() -> None:
    # 1-D filters 0, 1, 2, 10: distance sums 13, 11, 11, 27 → filter 1 first (tie with 2 → lower index)
    layer = _linear([[0.0], [1.0], [2.0], [10.0]])
    scores = FPGMImportance()("w", layer)
    assert scores is not None
    assert scores.tolist() == pytest.approx([13.0, 11.0, 11.0, 27.0])
    assert keep_mask(scores, 1).tolist() == [True, False, True, True]


def test_slim_ranks_batchnorm_scales() -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.1, 2.0, 0.3]))
    scores = SlimImportance()("bn", bn)
    assert scores is not None and scores.tolist() == pytest.approx([0.5, 0.1, 2.0, 0.3])
    assert SlimImportance()("conv", nn.Conv2d(1, 4, 1)) is None


def _two_layer() -> nn.Sequential:
    model = nn.Sequential(_linear([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), _linear([[1.0, 2.0, 3.0]]))
    return model


def test_taylorfo_hand_computed_and_weights_unchanged() -> None:
    # out = W1 W0 x, loss = sum(out): Σ_j W0[i,j] ∂L/∂W0[i,j] = W1[i] (W0 x)_i = [1, 2, 6] → squares
    model = _two_layer()
    x = torch.ones(1, 2)
    task = DuckTask(_two_layer, x.repeat(4, 1), torch.zeros(4, dtype=torch.long), batch_size=1)
    task.loss_fn = lambda out, target: out.sum()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imp = TaylorFOImportance(batches=3)
    imp.collect(model, ["0"], task)
    scores = imp("0", model[0])
    assert scores is not None and scores.tolist() == pytest.approx([1.0, 4.0, 36.0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_taylorfo_restores_batchnorm_statistics() -> None:
    inputs, labels = synthetic((3, 8, 8), 10)
    task = DuckTask(lambda: seeded(ResNetTiny()), inputs, labels)
    model = task.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "taylorfo", inputs[:2])
    masks = compute_masks(model, problem, initial_distribution(problem), task=task)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert task.trainer_calls == 1 and len(masks) == len(problem.layers)


def _hooked_task(model: nn.Module) -> DuckTask:
    x = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    return DuckTask(lambda: model, x, torch.zeros(2, dtype=torch.long), batch_size=2)


def test_apoz_and_mean_activation_hand_computed() -> None:
    # layer 0 outputs [1,-1,-1] and [2,0,-2]; after ReLU channel 0 is never zero, channels 1, 2 always
    model = nn.Sequential(_linear([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), _linear([[1.0, 1.0, 1.0]]))
    task = _hooked_task(model)
    apoz = APoZImportance()
    apoz.collect(model, ["0"], task)
    mean = MeanActivationImportance()
    mean.collect(model, ["0"], task)
    assert task.evaluator_calls == 2
    assert apoz("0", model[0]).tolist() == pytest.approx([1.0, 0.0, 0.0])  # type: ignore[union-attr]
    assert mean("0", model[0]).tolist() == pytest.approx([1.5, 0.0, 0.0])  # type: ignore[union-attr]


def test_statistics_criteria_need_the_task() -> None:
    model = seeded(PlainCNN())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "apoz", torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="needs the task"):
        compute_masks(model, problem, initial_distribution(problem))


def test_block_scores_avg_and_max_with_partial_blocks() -> None:
    scores = torch.arange(12.0).view(3, 4)  # 2x2 blocks; the last block row is partial
    avg = block_scores(scores, (2, 2), "avg")
    assert avg.tolist() == [[2.5, 4.5], [8.5, 10.5]]
    assert block_scores(scores, (2, 2), "max").tolist() == [[5.0, 7.0], [9.0, 11.0]]


def test_block_sparsity_prunes_whole_blocks() -> None:
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    seeded(model)
    problem = resolve_config_list(
        model,
        [{"sparsity": 0.5, "op_names": ["0"], "block_height": 2, "block_width": 4, "block_pooling": "max"}],
        "level",
        torch.randn(2, 8),
    )
    masks = compute_masks(model, problem, {"0": 0.5})
    blocks = masks["0"].view(3, 2, 2, 4).permute(0, 2, 1, 3).reshape(3, 2, 8)
    per_block = blocks.amax(dim=2)
    assert torch.equal(per_block, blocks.amin(dim=2))  # every block is all-kept or all-pruned
    assert int((per_block == 0).sum()) == 3


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_fine_grained_counts_are_exact(sparsity: float) -> None:
    model, problem = _resolved("plain", "level")
    dist = {name: sparsity for name in problem.unit_names()}
    masks = compute_masks(model, problem, dist)
    for layer in problem.layers:
        assert int((masks[layer.name] == 0).sum()) == pruned_count(sparsity, layer.weight_count)


@pytest.mark.parametrize("algo", ["l1", "l2", "fpgm", "slim"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_structured_counts_are_exact_per_group(algo: str, sparsity: float) -> None:
    model, problem = _resolved("resnet", algo)
    dist = {name: sparsity for name in problem.unit_names()}
    masks = compute_masks(model, problem, dist)
    for unit in problem.units:
        assert unit.channels is not None
        channel_masks = [masks[m].reshape(masks[m].shape[0], -1).amax(1) for m in unit.members]
        assert all(torch.equal(channel_masks[0], cm) for cm in channel_masks)  # one shared mask
        assert int((channel_masks[0] == 0).sum()) == pruned_count(sparsity, unit.channels)


def test_masks_are_deterministic() -> None:
    model = seeded(ResNetTiny())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", torch.randn(2, 3, 8, 8))
    a = compute_masks(model, problem, initial_distribution(problem))
    b = compute_masks(model, problem, initial_distribution(problem))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_select_channels_keeps_one_channel_per_concat_branch() -> None:
    unit = PruningUnit(
        name="a",
        members=["a", "b", "c"],
        channels=6,
        weight_count=60,
        initial_sparsity=0.5,
        channel_index={"a": [0, 1], "b": [2, 3, 4, 5]},
    )
    keep = select_channels(unit, torch.tensor([0.0, 0.1, 5.0, 6.0, 0.2, 7.0]), 3)
    assert int((~keep).sum()) == 3 and bool(keep[:2].any())
    # lowest three (0, 1, 4) would empty branch a: its best channel 1 stays, the next lowest free one (2) goes
    assert keep.tolist() == [False, True, False, True, False, True]


def test_slim_global_distribution_follows_the_global_ranking() -> None:
    model = seeded(ResNetTiny())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "slim", torch.randn(2, 3, 8, 8))
    with torch.no_grad():  # make one unit's BatchNorm scales tiny: the global ranking must empty it first
        model.layer1.bn1.weight.mul_(1e-3)  # type: ignore[operator]
    dist = global_distribution(model, problem, 0.05)
    assert dist["layer1.conv1"] > 0 and max(v for k, v in dist.items() if k != "layer1.conv1") == 0.0
    dist = global_distribution(model, problem, 0.5)
    assert overall_sparsity(dist, problem) == pytest.approx(0.5, abs=0.05)


def test_get_importance() -> None:
    assert isinstance(get_importance("taylorfo", batches=2), TaylorFOImportance)
    with pytest.raises(ValueError, match="unknown base algorithm"):
        get_importance("magic")


class _ZerosHighest(LevelImportance):
    """A criterion that ranks zeroed weights *highest*: without `previous`, a step would revive them."""

    def __call__(self, name: str, module: nn.Module) -> torch.Tensor | None:
        scores = super().__call__(name, module)
        return None if scores is None else torch.where(scores == 0, torch.full_like(scores, 1e9), scores)


@pytest.mark.parametrize("algo", ["level", "l1"])
def test_previous_masks_make_pruning_monotonic_with_exact_counts(algo: str) -> None:
    model = seeded(PlainCNN())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], algo, torch.randn(2, 3, 8, 8))
    importance = _ZerosHighest() if algo == "level" else None
    first = compute_masks(model, problem, {n: 0.3 for n in problem.unit_names()}, importance=importance)
    with torch.no_grad():  # the parent's weights, as a checkpoint holds them: pruned entries zero
        for name, mask in first.items():
            dict(model.named_modules())[name].weight.mul_(mask)  # type: ignore[operator]
    dist = {n: 0.6 for n in problem.unit_names()}
    second = compute_masks(model, problem, dist, importance=importance, previous=first)
    for name, mask in second.items():
        assert torch.all(mask[first[name] == 0] == 0), name  # what the parent removed stays removed
        size = mask.shape[0] if algo == "l1" else mask.numel()
        removed = int((mask.reshape(size, -1).amax(1) == 0).sum()) if algo == "l1" else int((mask == 0).sum())
        assert removed == pruned_count(0.6, size), name
