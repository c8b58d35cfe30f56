"""``taylorfo``: first-order Taylor estimate of the loss change from removing each filter.

Molchanov et al. (2019): the importance of filter c is ``(Σ_{i∈c} w_i · ∂L/∂w_i)²``, averaged over a
few training batches. Gradients come from the user's own ``trainer`` run with an optimizer whose
``step()`` records the gradients and changes nothing, so weights never move while being measured;
BatchNorm running statistics that the training-mode forward updates are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pruning.importance.base import Importance, channel_rows, is_batchnorm, out_axis

__all__ = ["MeasureOnlyOptimizer", "TaylorFOImportance", "run_trainer_measuring"]


class _EnoughBatches(Exception):
    """Raised from the measuring optimizer to stop the user's epoch after the batches we need."""


class MeasureOnlyOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``step()`` calls `on_step` and never touches a parameter.

    After `max_steps` steps it interrupts the trainer (the exception is caught by
    `run_trainer_measuring`), so measuring costs a few batches, not an epoch.
    """

    def __init__(self, params: Any, on_step: Callable[[], None], max_steps: int) -> None:
        super().__init__(params, {"lr": 0.0})
        self._on_step = on_step
        self._max_steps = max_steps
        self.steps = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._on_step()
        self.steps += 1
        if self.steps >= self._max_steps:
            raise _EnoughBatches
        return loss


def run_trainer_measuring(model: nn.Module, task: Any, on_step: Callable[[], None], batches: int) -> int:
    """Run ``task.trainer`` on `model` for at most `batches` optimizer steps without changing it.

    Returns the number of steps observed. The model's state (parameters and buffers) and its
    train/eval mode are restored afterwards.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    optimizer = MeasureOnlyOptimizer(model.parameters(), on_step, batches)
    criterion = task.make_criterion() if hasattr(task, "make_criterion") else nn.CrossEntropyLoss()
    try:
        task.trainer(model, optimizer, criterion, 0)
    except _EnoughBatches:
        pass
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return optimizer.steps


def _weight_param(module: nn.Module) -> nn.Parameter:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original  # type: ignore[union-attr,return-value]
    return module.weight  # type: ignore[return-value]


class TaylorFOImportance(Importance):
    """Per output filter, ``(Σ w·g)²`` averaged over `batches` trainer steps."""

    requires_task = True

    def __init__(self, batches: int = 4) -> None:
        self.batches = batches
        self._scores: dict[str, Tensor] = {}

    def collect(self, model: nn.Module, layer_names: Sequence[str], task: Any) -> None:
        modules = dict(model.named_modules())
        tracked = {n: modules[n] for n in layer_names if not is_batchnorm(modules[n])}
        sums = {n: torch.zeros(m.weight.shape[out_axis(m)], dtype=torch.float64) for n, m in tracked.items()}

        def on_step() -> None:
            for n, m in tracked.items():
                grad = _weight_param(m).grad
                if grad is None:
                    continue
                w = m.weight.detach()
                contribution = channel_rows(w * grad.to(w.dtype), out_axis(m)).sum(dim=1)
                sums[n] += contribution.double().pow(2).cpu()

        steps = run_trainer_measuring(model, task, on_step, self.batches)
        if steps == 0:
            raise RuntimeError("taylorfo: the trainer never called optimizer.step(), so no gradients were seen")
        self._scores = {n: (s / steps).float() for n, s in sums.items()}

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        if is_batchnorm(module):
            return None
        if name not in self._scores:
            raise RuntimeError(f"taylorfo: no statistics for {name!r}; call collect() first")
        return self._scores[name]
