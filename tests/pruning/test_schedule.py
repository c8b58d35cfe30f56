"""The AGP schedule and the gradual mask updater."""

from __future__ import annotations

import pytest
import torch

from pruning.config import overall_sparsity, resolve_config_list
from pruning.masks import achieved_sparsity
from pruning.schedule import GradualPruner, agp_sparsity
from tests.pruning.conftest import DuckTask, synthetic
from tests.pruning.models import PlainCNN, seeded


def test_agp_hand_values() -> None:
    # s_t = 0.8 + (0 - 0.8) (1 - t/100)^3
    assert agp_sparsity(0, 0.0, 0.8, 0, 100) == 0.0
    assert agp_sparsity(50, 0.0, 0.8, 0, 100) == pytest.approx(0.8 - 0.8 * 0.125)
    assert agp_sparsity(100, 0.0, 0.8, 0, 100) == 0.8
    assert agp_sparsity(500, 0.0, 0.8, 0, 100) == 0.8
    assert agp_sparsity(5, 0.1, 0.8, 10, 100) == 0.1
    # held between updates: frequency 20 → steps 40..59 share the value at 40
    assert agp_sparsity(59, 0.0, 0.8, 0, 100, frequency=20) == agp_sparsity(40, 0.0, 0.8, 0, 100)
    assert agp_sparsity(50, 0.0, 0.8, 0, 100, exponent=1) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        agp_sparsity(0, 0.0, 0.8, 10, 10)


def test_agp_is_monotone() -> None:
    values = [agp_sparsity(t, 0.05, 0.9, 10, 90, frequency=7) for t in range(120)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_gradual_pruner_from_a_trainer_loop() -> None:
    inputs, labels = synthetic((3, 8, 8), 5, n=40)
    task = DuckTask(lambda: seeded(PlainCNN()), inputs, labels, batch_size=4)  # 10 steps per epoch
    model = task.model()
    problem = resolve_config_list(model, [{"sparsity": 0.5, "op_types": ["default"]}], "level", inputs[:2])
    final = {n: 0.8 for n in problem.unit_names()}
    pruner = GradualPruner(model, problem, final, begin_step=2, end_step=16, frequency=4)
    seen: list[float] = []

    def callback() -> None:
        if pruner.step():
            achieved = achieved_sparsity(pruner.masks, problem)
            seen.append(overall_sparsity({n: achieved[n] for n in problem.unit_names()}, problem))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(2):
        task.trainer(model, optimizer, task.make_criterion(), epoch, callback=callback)
    assert len(seen) == 5  # steps 2, 6, 10, 14 and the final step 16
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1] == pytest.approx(0.8, abs=1e-3)
    assert all(torch.all(m.weight[pruner.masks[n] == 0] == 0) for n, m in model.named_modules() if n in pruner.masks)
