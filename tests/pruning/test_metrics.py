"""Params, MACs, non-zeros, latency."""

from __future__ import annotations

import torch
from torch import nn

from pruning.config import initial_distribution, resolve_config_list
from pruning.metrics import count_nonzero, count_params_flops, layer_stats, measure_latency
from pruning.pruner import prune
from tests.pruning.models import PlainCNN, seeded


def test_hand_computed_params_and_macs() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(1, 2, 5, 5)
    params, macs = count_params_flops(model, x)
    assert params == 2 * 4 * 9 + (100 * 3 + 3)
    stats = layer_stats(model, x)
    assert stats["0"] == (72, 72 * 25)  # each weight is used once per output position
    assert stats["2"][0] == 303 and stats["2"][1] >= 300
    assert macs == sum(f for _, f in stats.values())


def test_masked_models_count_dense_and_nonzero_sparse() -> None:
    model = seeded(PlainCNN())
    x = torch.randn(1, 3, 8, 8)
    dense = count_params_flops(model, x)
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], "level", x)
    prune(model, problem, initial_distribution(problem))
    assert count_params_flops(model, x) == dense
    pruned = sum(round(0.5 * layer.weight_count) for layer in problem.layers)
    assert count_nonzero(model) == dense[0] - pruned


def test_latency_is_a_positive_median_and_restores_mode() -> None:
    model = seeded(PlainCNN()).train()
    seconds = measure_latency(model, torch.randn(1, 3, 8, 8), warmup=1, repeat=3)
    assert seconds > 0 and model.training
