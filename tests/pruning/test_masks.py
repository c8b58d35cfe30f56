"""Masks survive training, strip to plain modules, read back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruning.config import initial_distribution, resolve_config_list
from pruning.masks import Mask, achieved_sparsity, apply_masks, is_channel_mask, masks_of, strip
from pruning.pruner import compute_masks, prune
from tests.pruning.models import PlainCNN, ResNetTiny, seeded

X3 = torch.randn(4, 3, 8, 8)


def _level_problem(model: nn.Module, sparsity: float = 0.6):  # type: ignore[no-untyped-def]
    return resolve_config_list(model, [{"sparsity": sparsity, "op_types": ["default"]}], "level", X3)


def test_forward_uses_weight_times_mask() -> None:
    layer = nn.Linear(3, 2)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    dense = layer.weight.detach().clone()
    apply_masks(layer_holder := nn.Sequential(layer), {"0": mask}, structured=False)
    x = torch.randn(5, 3)
    expected = x @ (dense * mask).T + layer.bias.detach()
    assert torch.allclose(layer_holder(x), expected)


@pytest.mark.parametrize("structured", [False, True])
def test_masks_survive_momentum_and_weight_decay(structured: bool) -> None:
    model = seeded(ResNetTiny() if structured else PlainCNN())
    algo = "l1" if structured else "level"
    types = ["Conv2d"] if structured else ["default"]
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": types}], algo, X3)
    model.train()
    masks = prune(model, problem, initial_distribution(problem))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    modules = dict(model.named_modules())
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(X3).square().mean()
        loss.backward()
        for name, mask in masks.items():
            original = modules[name].parametrizations.weight.original  # type: ignore[union-attr,index]
            assert original.grad is not None
            assert torch.all(original.grad[mask == 0] == 0)
        optimizer.step()
        for name, mask in masks.items():
            assert torch.all(modules[name].weight[mask == 0] == 0)
    strip(model)
    assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert type(weight) is nn.Parameter and torch.all(weight[mask == 0] == 0)
        assert torch.count_nonzero(weight[mask == 1]) > 0


def test_strip_keeps_parameter_identity_and_zeros() -> None:
    model = seeded(PlainCNN())
    problem = _level_problem(model)
    prune(model, problem, initial_distribution(problem))
    original = model.conv2.parametrizations.weight.original  # type: ignore[union-attr,index]
    out = model(X3)
    strip(model)
    assert model.conv2.weight is original
    assert torch.allclose(model(X3), out)
    assert masks_of(model) == {}


def test_masks_of_reads_back_and_reapplying_updates_in_place() -> None:
    model = seeded(PlainCNN())
    problem = _level_problem(model)
    masks = prune(model, problem, initial_distribution(problem))
    read = masks_of(model)
    assert set(read) == set(masks) and all(torch.equal(read[k], masks[k]) for k in masks)
    original = model.conv1.parametrizations.weight.original  # type: ignore[union-attr,index]
    more = compute_masks(model, problem, {n: 0.8 for n in problem.unit_names()})
    apply_masks(model, more, structured=False)
    assert model.conv1.parametrizations.weight.original is original  # type: ignore[union-attr,index]
    assert torch.equal(masks_of(model)["conv1"], more["conv1"])
    assert sum(1 for m in model.conv1.parametrizations.weight if isinstance(m, Mask)) == 1  # type: ignore[union-attr]


def test_structured_masks_also_zero_biases_and_batchnorm() -> None:
    model = seeded(ResNetTiny())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "l1", X3)
    masks = prune(model, problem, initial_distribution(problem))
    assert all(is_channel_mask(m) for m in masks.values())
    removed = masks["bn"] == 0
    assert torch.all(model.bn.weight[removed] == 0) and torch.all(model.bn.bias[removed] == 0)
    achieved = achieved_sparsity(model, problem)
    assert achieved["stem"] == pytest.approx(0.5) and achieved["bn"] == pytest.approx(0.5)
    assert achieved_sparsity(masks, problem) == achieved


def test_fine_grained_achieved_sparsity() -> None:
    model = seeded(PlainCNN())
    problem = _level_problem(model, 0.3)
    masks = prune(model, problem, initial_distribution(problem))
    achieved = achieved_sparsity(masks, problem)
    assert achieved["conv2"] == pytest.approx(round(0.3 * 4608) / 4608)
    strip(model)
    assert achieved_sparsity(model, problem)["conv2"] >= achieved["conv2"]


def test_stripping_a_copy_does_not_break_the_original() -> None:
    model = seeded(PlainCNN())
    problem = _level_problem(model)
    prune(model, problem, initial_distribution(problem))
    twin = copy.deepcopy(model)
    strip(twin)
    out = model(X3)  # the original still has its masked `weight`
    assert torch.allclose(out, twin(X3))
    strip(model)


def test_mask_shape_and_name_errors() -> None:
    model = seeded(PlainCNN())
    with pytest.raises(ValueError, match="does not have"):
        apply_masks(model, {"missing": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(model, {"conv1": torch.ones(3)})
