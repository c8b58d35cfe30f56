"""The importance interface: one call from a layer to a score tensor (higher = keep)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "Importance",
    "channel_rows",
    "channel_shape",
    "effective_weight",
    "is_batchnorm",
    "is_conv1d_transposed",
    "out_axis",
    "weight_of",
]


def weight_of(module: nn.Module) -> Tensor:
    """``module.weight`` typed as a Tensor (masked if a mask is applied)."""
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def is_conv1d_transposed(module: nn.Module) -> bool:
    """True for Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored transposed,
    ``(in_features, out_features)``. Recognised by class name (also under a mask parametrization's subclass),
    so ``pruning`` never imports ``transformers``."""
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf")


def out_axis(module: nn.Module) -> int:
    """The weight axis that numbers output channels: 1 for Hugging Face's ``Conv1D``, 0 for everything else."""
    return 1 if is_conv1d_transposed(module) else 0


def channel_rows(tensor: Tensor, axis: int = 0) -> Tensor:
    """`tensor` as a 2-D view with one row per output channel (`axis` numbers the channels)."""
    moved = tensor.movedim(axis, 0) if axis else tensor
    return moved.reshape(moved.shape[0], -1)


def channel_shape(weight: Tensor, axis: int = 0) -> tuple[int, ...]:
    """The shape a per-channel vector takes to broadcast over `weight` along `axis` (``(C, 1, 1, 1)``, ``(1, C)``)."""
    return tuple(weight.shape[d] if d == axis else 1 for d in range(weight.dim()))


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the module computes with (masked if a mask is applied), detached, as float."""
    return weight_of(module).detach().float()


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm layers (scored only by ``slim`` and the activation criteria)."""
    return isinstance(module, _BatchNorm)


class Importance:
    """Scores one layer: per weight element (fine-grained) or per output channel (structured).

    ``__call__(name, module)`` returns a tensor of scores (higher = more important) or ``None`` when
    the criterion says nothing about that kind of layer (``l1`` about BatchNorm, ``slim`` about
    convolutions); the pruner then averages the members of a channel group that do have scores.
    Statistics criteria set ``requires_task`` and gather what they need in ``collect`` first, once
    for all layers. Subclasses are small; a new criterion is a new subclass.
    """

    requires_task: ClassVar[bool] = False
    structured: ClassVar[bool] = True

    def collect(self, model: nn.Module, layer_names: Sequence[str], task: Any) -> None:
        """Gather statistics for `layer_names` from the user's `task` (no-op for weight criteria)."""

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        raise NotImplementedError
