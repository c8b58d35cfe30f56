"""BatchNorm recalibration: statistics re-estimated, no weight changed, the model's mode and momenta restored."""

from __future__ import annotations

from dataclasses import replace

import torch

from pruning.calibration import has_batchnorm, recalibrate_batchnorm
from pruning.config import resolve_config_list
from pruning.masks import apply_masks
from pruning.pruner import compute_masks
from tests.pruning.search.digits_task import data, make_task


def _pruned(task):  # type: ignore[no-untyped-def]
    model = task.model()
    problem = resolve_config_list(model, [{"sparsity": 0.6, "op_types": ["Conv2d"]}], "l1", task.dummy_input())
    masks = compute_masks(model, problem, {u.name: 0.6 for u in problem.units})
    apply_masks(model, masks, structured=True)
    return model


def _stats(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_recalibration_with_the_trainer_changes_statistics_and_no_weight() -> None:
    task = make_task("plain")
    model = _pruned(task)
    model.eval()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = _stats(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    used = recalibrate_batchnorm(model, task, batches=5)
    assert used == 5
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), f"{name} changed"
        assert p.grad is None  # the trainer's gradients are discarded
    after = _stats(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not model.training  # mode restored
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta


def test_recalibration_uses_calibration_data_when_the_task_has_it() -> None:
    x_train = data()[0]
    batches = [x_train[i : i + 32] for i in range(0, 32 * 8, 32)]
    calls: list[int] = []

    def calibration_data():  # type: ignore[no-untyped-def]
        calls.append(1)
        return iter(batches)

    def no_trainer(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the trainer must not run when calibration_data exists")

    task = replace(make_task("plain"), calibration_data=calibration_data, trainer=no_trainer)
    model = _pruned(task)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert recalibrate_batchnorm(model, task, batches=4) == 4
    assert calls == [1]
    assert all(torch.equal(p.detach(), params[n]) for n, p in model.named_parameters())
    # Cumulative averages over exactly the first four batches: the mean of bn1's input channel statistics.
    bn1 = model.bn1
    with torch.no_grad():
        means = torch.stack([model.conv1(b).mean(dim=(0, 2, 3)) for b in batches[:4]]).mean(dim=0)
    assert torch.allclose(bn1.running_mean, means, atol=1e-5)


def test_a_recalibrated_candidate_scores_closer_to_what_it_is_worth() -> None:
    task = make_task("plain")
    assert has_batchnorm(task.model())
    raw = _pruned(task)
    recalibrated = _pruned(task)
    recalibrate_batchnorm(recalibrated, task, batches=16)
    # The same masks: recalibration alone lifts the score the search would compare.
    assert task.evaluate(recalibrated) > task.evaluate(raw)
