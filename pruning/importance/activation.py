"""Activation statistics collected with forward hooks during one ``evaluator`` call (internal)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pruning.importance.base import Importance, is_conv1d_transposed

__all__ = ["ActivationImportance"]


def _channel_dim(module: nn.Module, out: Tensor) -> int:
    # Conv and BatchNorm outputs put channels in dim 1; Linear (and Hugging Face's Conv1D) outputs put them last.
    if isinstance(module, nn.Linear) or is_conv1d_transposed(module):
        return out.dim() - 1
    return 1 if out.dim() > 1 else 0


class ActivationImportance(Importance):
    """Base for criteria computed from ``relu(output)`` of each layer, per output channel.

    Hooks record, per channel, the number of observed values, how many were zero after ReLU, and
    their sum; the user's ``evaluator`` is called once with the hooks in place.
    """

    requires_task = True

    def __init__(self) -> None:
        self._count: dict[str, Tensor] = {}
        self._zeros: dict[str, Tensor] = {}
        self._sum: dict[str, Tensor] = {}

    def collect(self, model: nn.Module, layer_names: Sequence[str], task: Any) -> None:
        modules = dict(model.named_modules())
        handles = []
        self._count, self._zeros, self._sum = {}, {}, {}

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                out = output[0] if isinstance(output, (tuple, list)) else output
                act = torch.relu(out.detach()).float()
                dim = _channel_dim(module, act)
                moved = act.movedim(dim, 0).reshape(act.shape[dim], -1)
                zeros = (moved == 0).sum(dim=1).double().cpu()
                total = moved.sum(dim=1).double().cpu()
                count = torch.full_like(zeros, moved.shape[1])
                if name in self._count:
                    self._count[name] += count
                    self._zeros[name] += zeros
                    self._sum[name] += total
                else:
                    self._count[name], self._zeros[name], self._sum[name] = count, zeros, total

            return hook

        for name in layer_names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        try:
            task.evaluator(model)
        finally:
            for h in handles:
                h.remove()
        if not self._count:
            raise RuntimeError(f"{type(self).__name__}: the evaluator never ran the model's layers")

    def _stats(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        if name not in self._count:
            raise RuntimeError(f"no activation statistics for {name!r}: it did not run during evaluator()")
        return self._count[name], self._zeros[name], self._sum[name]

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        raise NotImplementedError
