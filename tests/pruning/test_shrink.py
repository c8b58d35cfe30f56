"""Physical shrinking: outputs equal the masked model's, and each group loses what was asked."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from pruning.config import PruningProblem, pruned_count, resolve_config_list
from pruning.metrics import count_params_flops
from pruning.pruner import prune
from pruning.shrink import ShrinkRecipe, apply_recipe, predict_params_flops, shrink
from tests.pruning.models import ConcatNet, DepthwiseSeparable, FlattenCNN, PlainCNN, ResNetTiny, seeded

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "plain": (PlainCNN, (3, 3, 8, 8)),
    "residual_bn": (ResNetTiny, (3, 3, 8, 8)),
    "depthwise": (DepthwiseSeparable, (3, 3, 8, 8)),
    "flatten_linear": (FlattenCNN, (3, 1, 8, 8)),
    "concat_add": (ConcatNet, (3, 3, 8, 8)),
}


def _distribution(problem: PruningProblem, base: float) -> dict[str, float]:
    # different sparsities per unit, so a mix-up between groups would show
    return {name: min(0.9, base + 0.1 * (i % 3)) for i, name in enumerate(problem.unit_names())}


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return int(module.weight.shape[0])  # type: ignore[union-attr,index]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("algo", "base"), [("l1", 0.3), ("fpgm", 0.5), ("l2", 0.7)])
def test_shrunk_equals_masked_and_removes_what_was_asked(case: str, algo: str, base: float) -> None:
    make, shape = CASES[case]
    x = torch.randn(shape)
    model = seeded(make())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["default"]}], algo, x)
    dist = _distribution(problem, base)
    dense_out_channels = {
        n: _out_channels(m) for n, m in model.named_modules() if n in {la.name for la in problem.layers}
    }
    masks = prune(model, problem, dist)
    with torch.no_grad():
        masked_out = model(x)
    predicted = predict_params_flops(model, problem, dist, x)
    recipe = shrink(model, masks, x)
    with torch.no_grad():
        shrunk_out = model(x)
    assert shrunk_out.shape == masked_out.shape
    assert torch.allclose(shrunk_out, masked_out, atol=1e-5, rtol=1e-4)
    modules = dict(model.named_modules())
    for unit in problem.units:
        assert unit.channels is not None
        asked = pruned_count(dist[unit.name], unit.channels)
        removed_unit_channels = set()
        for member in unit.members:
            lost = dense_out_channels[member] - _out_channels(modules[member])
            assert lost == len(recipe.removed.get(member, []))
            index = unit.channel_index.get(member, list(range(dense_out_channels[member])))
            removed_unit_channels |= {index[i] for i in recipe.removed.get(member, [])}
        assert len(removed_unit_channels) == asked, unit.name  # requested == physically removed
    assert count_params_flops(model, x) == predicted


def test_recipe_replays_on_a_fresh_model_and_round_trips_json() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = seeded(ResNetTiny())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["default"]}], "l1", x)
    masks = prune(model, problem, {n: 0.5 for n in problem.unit_names()})
    recipe = shrink(model, masks, x)
    again = ShrinkRecipe.model_validate_json(recipe.model_dump_json())
    fresh = seeded(ResNetTiny())
    apply_recipe(fresh, again, x)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # the kept weights are the same ones: loading the shrunk weights gives the same outputs
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x))


def test_shrink_never_touches_output_layer_and_leaves_unremovable_zeros() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = seeded(PlainCNN())
    masks = {"fc": torch.zeros_like(model.fc.weight)}
    masks["fc"][1:] = 1
    recipe = shrink(copy.deepcopy(model), masks, x)
    assert recipe.removed == {}


def test_shrink_keeps_channels_masked_in_only_one_coupled_layer() -> None:
    x = torch.randn(2, 3, 8, 8)
    model = seeded(ResNetTiny())
    masks = {"stem": torch.ones_like(model.stem.weight), "layer1.conv2": torch.ones_like(model.layer1.conv2.weight)}
    masks["stem"][:4] = 0  # layer1.conv2 keeps these channels: removing them would change the output
    masks["layer1.conv2"][2:6] = 0
    recipe = shrink(model, masks, x)
    assert recipe.removed["stem"] == [2, 3] and recipe.removed["layer1.conv2"] == [2, 3]
    assert model.bn.num_features == 14
