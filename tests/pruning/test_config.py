"""Config lists, problems and sparsity distributions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruning.config import (
    PruningProblem,
    PruningUnit,
    SparsityDistribution,
    initial_distribution,
    is_structured,
    layer_distribution,
    overall_sparsity,
    pruned_count,
    rescale,
    resolve_config_list,
    validate_config_list,
)
from pruning.metrics import count_params_flops
from tests.pruning.models import ConcatNet, DepthwiseSeparable, FlattenCNN, PlainCNN, ResNetTiny, seeded

X3 = torch.randn(2, 3, 8, 8)


def _problem(weights: dict[str, int], maxes: dict[str, float] | None = None) -> PruningProblem:
    maxes = maxes or {}
    units = [
        PruningUnit(name=n, members=[n], weight_count=w, initial_sparsity=0.5, max_sparsity=maxes.get(n, 0.95))
        for n, w in weights.items()
    ]
    return PruningProblem(
        base_algo="level",
        structured=False,
        layers=[],
        units=units,
        target_sparsity=0.5,
        dense_params=0,
        dense_flops=0,
    )


# --- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "non-empty"),
        ([{"sparsity": 0.5, "total_sparsity": 0.5, "op_types": ["Conv2d"]}], "entry 0.*at most one"),
        ([{"op_types": ["Conv2d"]}], "entry 0.*needs sparsity"),
        ([{"sparsity": 0.5}], "op_types or op_names"),
        ([{"sparsity": 0.5, "op_types": ["Conv3x"]}], "unknown op_types"),
        ([{"sparsity": 0.5, "op_types": ["default"]}, {"sparsity": 1.5, "op_types": ["Linear"]}], "entry 1.*sparsity"),
        ([{"sparsity": 0.5, "op_types": ["Linear"], "colour": 1}], "entry 0.*colour"),
        ([{"exclude": True, "op_names": ["fc"]}], "selects nothing"),
        ([{"sparsity": 0.5, "op_types": ["Linear"], "block_height": 2}], "go together"),
    ],
)
def test_invalid_config_lists_name_entry_and_field(raw: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_config_list(raw)


def test_valid_config_list_spellings() -> None:
    entries = validate_config_list(
        [
            {"sparsity_per_layer": 0.3, "op_types": ["default"]},
            {"total_sparsity": 0.4, "op_names": ["fc"], "max_sparsity_per_layer": 0.6},
            {"exclude": True, "op_names": ["conv1"]},
        ]
    )
    assert [e.value for e in entries] == [0.3, 0.4, 0.0]
    assert entries[0].type_names() == {"Conv2d", "Linear", "Conv1D"}  # Linear also selects Hugging Face's Conv1D
    assert is_structured("l1") and not is_structured("level")
    with pytest.raises(ValueError, match="unknown base algorithm"):
        is_structured("random")


# --- resolving ---------------------------------------------------------------------------------------
def test_fine_grained_resolution_lists_layers_with_sizes() -> None:
    model = seeded(PlainCNN())
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["default"]}], "level", X3)
    assert [layer.name for layer in problem.layers] == ["conv1", "conv2", "conv3", "fc"]
    conv2 = problem.layer("conv2")
    assert conv2.weight_shape == [32, 16, 3, 3] and conv2.weight_count == 4608 and conv2.params == 4640
    assert conv2.flops == 4608 * 8 * 8 * 2 + 32 * 8 * 8 * 2  # MACs of the weights + bias adds, batch of 2
    assert problem.unit_names() == ["conv1", "conv2", "conv3", "fc"]
    assert problem.target_sparsity == pytest.approx(0.5)
    assert (problem.dense_params, problem.dense_flops) == count_params_flops(model, X3)


def test_structured_excludes_the_output_layer_automatically() -> None:
    problem = resolve_config_list(seeded(PlainCNN()), [{"sparsity": 0.5, "op_types": ["default"]}], "l1", X3)
    assert problem.unit_names() == ["conv1", "conv2", "conv3"]
    assert all(u.channels == int(problem.layer(u.name).weight_shape[0]) for u in problem.units)


def test_structured_output_layer_named_explicitly_is_an_error() -> None:
    with pytest.raises(ValueError, match="'fc'.*model's output"):
        resolve_config_list(seeded(PlainCNN()), [{"sparsity": 0.5, "op_names": ["fc"]}], "l1", X3)


def test_residual_groups_are_units_named_by_first_member() -> None:
    problem = resolve_config_list(seeded(ResNetTiny()), [{"sparsity": 0.4, "op_types": ["Conv2d"]}], "l1", X3)
    units = {u.name: u.members for u in problem.units}
    assert units["stem"] == ["stem", "bn", "layer1.conv2", "layer1.bn2"]
    assert units["layer2.conv2"] == [
        "layer2.conv2",
        "layer2.bn2",
        "layer2.shortcut.0",
        "layer2.shortcut.1",
        "layer3.conv2",
        "layer3.bn2",
    ]
    assert units["layer1.conv1"] == ["layer1.conv1", "layer1.bn1"]
    assert "fc" not in units
    assert {layer.unit for layer in problem.layers} == set(units)


def test_op_names_may_name_any_member_and_exclude_removes_whole_unit() -> None:
    model = seeded(ResNetTiny())
    problem = resolve_config_list(model, [{"sparsity": 0.3, "op_names": ["layer1.bn2"]}], "l1", X3)
    assert problem.unit_names() == ["stem"]
    problem = resolve_config_list(
        model,
        [{"sparsity": 0.3, "op_types": ["Conv2d"]}, {"exclude": True, "op_names": ["layer3.conv2"]}],
        "l1",
        X3,
    )
    assert "layer2.conv2" not in problem.unit_names() and "stem" in problem.unit_names()


def test_depthwise_and_concat_groups() -> None:
    dw = resolve_config_list(seeded(DepthwiseSeparable()), [{"sparsity": 0.5, "op_types": ["default"]}], "l2", X3)
    assert {u.name: u.members for u in dw.units}["expand"] == ["expand", "bn1", "dw", "bn2"]
    cat = resolve_config_list(seeded(ConcatNet()), [{"sparsity": 0.5, "op_types": ["default"]}], "l1", X3)
    unit = cat.unit("a")
    assert unit.members == ["a", "b", "c"] and unit.channels == 16
    assert unit.channel_index == {"a": list(range(6)), "b": list(range(6, 16))}


def test_resolution_errors_name_the_layer() -> None:
    model = seeded(ResNetTiny())
    with pytest.raises(ValueError, match="'nope' matches no layer"):
        resolve_config_list(model, [{"sparsity": 0.5, "op_names": ["nope"]}], "l1", X3)
    with pytest.raises(ValueError, match="'level' cannot prune layer 'bn'"):
        resolve_config_list(model, [{"sparsity": 0.5, "op_names": ["bn"]}], "level", X3)
    with pytest.raises(ValueError, match="'level' cannot prune layer 'bn'"):
        resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}], "level", X3)
    with pytest.raises(ValueError, match="'stem' is a Conv2d"):
        resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Linear"], "op_names": ["stem"]}], "l1", X3)
    with pytest.raises(ValueError, match="slim.*'conv1'.*no BatchNorm"):
        resolve_config_list(
            seeded(FlattenCNN()), [{"sparsity": 0.5, "op_names": ["conv1"]}], "slim", torch.randn(1, 1, 8, 8)
        )
    with pytest.raises(ValueError, match="block sparsity"):
        resolve_config_list(
            model, [{"sparsity": 0.5, "op_types": ["Conv2d"], "block_height": 2, "block_width": 2}], "level", X3
        )


def test_later_entries_override_and_bounds_apply() -> None:
    problem = resolve_config_list(
        seeded(PlainCNN()),
        [
            {"sparsity": 0.5, "op_types": ["default"]},
            {"sparsity": 0.8, "op_names": ["conv2"], "max_sparsity_per_layer": 0.7},
        ],
        "l1",
        X3,
    )
    assert problem.unit("conv2").initial_sparsity == 0.7 and problem.unit("conv2").max_sparsity == 0.7
    assert problem.unit("conv1").initial_sparsity == 0.5


def test_model_is_not_modified_by_resolution() -> None:
    model = seeded(ResNetTiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["default"]}], "l1", X3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- distributions -----------------------------------------------------------------------------------
def test_overall_sparsity_is_weighted_by_weight_count() -> None:
    problem = _problem({"a": 100, "b": 300})
    assert overall_sparsity({"a": 0.8, "b": 0.4}, problem) == pytest.approx((80 + 120) / 400)
    with pytest.raises(ValueError, match="missing"):
        overall_sparsity({"a": 0.5}, problem)


def test_rescale_is_proportional_and_exact() -> None:
    problem = _problem({"a": 100, "b": 300, "c": 50})
    dist = {"a": 0.2, "b": 0.1, "c": 0.4}
    out = rescale(dist, 0.3, problem)
    assert overall_sparsity(out, problem) == pytest.approx(0.3, abs=1e-12)
    assert out["a"] / out["b"] == pytest.approx(2.0) and out["c"] / out["a"] == pytest.approx(2.0)


def test_rescale_clips_and_redistributes() -> None:
    problem = _problem({"a": 100, "b": 100, "c": 100}, maxes={"c": 0.5})
    out = rescale({"a": 0.1, "b": 0.2, "c": 0.4}, 0.6, problem)
    assert out["c"] == 0.5
    assert overall_sparsity(out, problem) == pytest.approx(0.6, abs=1e-12)
    assert out["b"] / out["a"] == pytest.approx(2.0)
    # all-zero input: spread by headroom
    out = rescale({"a": 0.0, "b": 0.0, "c": 0.0}, 0.3, problem)
    assert overall_sparsity(out, problem) == pytest.approx(0.3, abs=1e-12)
    with pytest.raises(ValueError, match="unreachable"):
        rescale({"a": 0.1, "b": 0.1, "c": 0.1}, 0.9, problem)


def test_distribution_json_round_trip_and_layer_expansion() -> None:
    dist = SparsityDistribution({"conv1": 0.25, "layer1.conv1": 0.5})
    again = SparsityDistribution.from_json(dist.to_json())
    assert again.root == dist.root
    with pytest.raises(ValueError):
        SparsityDistribution.model_validate({"a": 1.5})
    problem = resolve_config_list(seeded(ResNetTiny()), [{"sparsity": 0.4, "op_types": ["Conv2d"]}], "l1", X3)
    layers = layer_distribution(initial_distribution(problem), problem)
    assert layers["layer1.bn2"] == 0.4 and set(layers) == {layer.name for layer in problem.layers}


@pytest.mark.parametrize("n", [7, 10, 64])
def test_pruned_count_rounds(n: int) -> None:
    for i in range(10):
        assert pruned_count(i / 10, n) == round(i / 10 * n)


def test_multihead_attention_is_refused_with_its_reason_and_its_neighbours_still_prune() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(x, x, x, need_weights=False)[0]
            x = x + self.fc2(torch.relu(self.fc1(x)))
            return self.head(x.mean(1))

    model, x = Encoder().eval(), torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="'attn' cannot lose whole heads: torch.nn.MultiheadAttention ties"):
        resolve_config_list(model, [{"sparsity": 0.5, "op_names": ["attn.out_proj"]}], "l1", x)
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Linear"]}], "l1", x)
    assert [(u.name, u.channels) for u in problem.units] == [("fc1", 32)]
