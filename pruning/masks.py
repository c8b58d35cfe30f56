"""Masks that survive training: apply, read back, strip.

A mask is a 0/1 tensor shaped like a layer's weight, keyed by the layer's module name. It is applied as
a `torch.nn.utils.parametrize` parametrization, so ``module.weight`` is ``original * mask`` in every
forward pass: gradients of pruned entries are zero, and whatever an optimizer does to the stored
``original`` (momentum, weight decay) never reaches the weights the model computes with. Pruned
originals are also zeroed when a mask is applied, so stripping leaves exact zeros.

Structured masks (whole output channels) also mask the layer's bias, and BatchNorm masks cover both
its weight and bias, so a pruned channel outputs exactly zero, the same as after physical shrinking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pruning.importance.base import channel_rows, out_axis

if TYPE_CHECKING:
    from pruning.config import PruningProblem

__all__ = ["Mask", "achieved_sparsity", "apply_masks", "is_channel_mask", "masks_of", "strip"]


class Mask(nn.Module):
    """Parametrization ``w ↦ w * mask``; the mask is a buffer, so it follows ``.to()`` and state_dict."""

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: Tensor) -> Tensor:
        # A fill rather than a product: pruned entries become +0.0, never -0.0, so they compress as zeros.
        return weight.masked_fill(self.mask == 0, 0.0)


def is_channel_mask(mask: Tensor, axis: int = 0) -> bool:
    """True when every output channel (numbered along `axis`, see `out_axis`) of `mask` is all ones or all zeros."""
    flat = channel_rows(mask, axis)
    return bool(torch.equal(flat.amin(dim=1), flat.amax(dim=1)))


def _channel_vector(mask: Tensor, axis: int = 0) -> Tensor:
    return channel_rows(mask, axis).amax(dim=1)


def _mask_of(module: nn.Module, tensor_name: str) -> Mask | None:
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in cast(nn.ModuleList, cast(nn.ModuleDict, module.parametrizations)[tensor_name]):
        if isinstance(p, Mask):
            return p
    return None


def _set_mask(module: nn.Module, tensor_name: str, mask: Tensor) -> None:
    current = getattr(module, tensor_name)
    if mask.shape != current.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tensor_name} {tuple(current.shape)}")
    mask = mask.to(device=current.device, dtype=current.dtype)
    existing = _mask_of(module, tensor_name)
    if existing is None:
        parametrize.register_parametrization(module, tensor_name, Mask(mask))
    else:
        # Update in place: the optimizer keeps pointing at the same `original` Parameter.
        existing.mask.copy_(mask)
    with torch.no_grad():
        original = cast(Tensor, cast(nn.ModuleDict, module.parametrizations)[tensor_name].original)
        original.masked_fill_(mask == 0, 0.0)


def apply_masks(model: nn.Module, masks: dict[str, Tensor], structured: bool | None = None) -> nn.Module:
    """Mask `model` in place (replacing masks already there) and return it.

    `structured` says whether masks remove whole output channels; then biases of removed channels are
    masked too (BatchNorm masks always mask the bias). ``None`` infers it: structured when every
    Conv/Linear mask is constant per output channel. Pass it explicitly when you know it — a
    fine-grained mask of a tiny layer can be channel-constant by chance.
    """
    modules = dict(model.named_modules())
    missing = [name for name in masks if name not in modules]
    if missing:
        raise ValueError(f"masks name layers the model does not have: {missing}")
    if structured is None:
        structured = all(is_channel_mask(m, out_axis(modules[n])) for n, m in masks.items())
    for name, mask in masks.items():
        module = modules[name]
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        _set_mask(module, "weight", mask)
        bias = getattr(module, "bias", None)
        if bias is not None and (structured or is_bn):
            _set_mask(module, "bias", _channel_vector(mask, out_axis(module)))
    return model


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """The weight masks currently applied to `model`, keyed by module name (copies)."""
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        found = _mask_of(module, "weight")
        if found is not None:
            out[name] = found.mask.detach().clone()
    return out


def _unmask_module(module: nn.Module) -> None:
    """Remove our masks from one module, leaving ``original * mask`` in the *same* Parameter objects.

    torch's ``remove_parametrizations`` deletes the property from the module's dynamically created
    class, and a deep copy of a masked model shares that class: removing masks from the copy would
    break the original. When masks are the module's only parametrizations we therefore undo them by
    hand on this instance; otherwise we defer to torch for the masked tensors.
    """
    if not parametrize.is_parametrized(module):
        return
    plists = cast(nn.ModuleDict, module.parametrizations)
    ours = [t for t in plists.keys() if _mask_of(module, t) is not None]
    only_ours = all(len(cast(nn.ModuleList, plists[t])) == 1 and t in ours for t in plists.keys())
    if not only_ours:
        for tensor_name in ours:
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
        return
    originals: dict[str, nn.Parameter] = {}
    with torch.no_grad():
        for tensor_name in ours:
            value = getattr(module, tensor_name).detach().clone()
            original = cast(nn.Parameter, plists[tensor_name].original)
            original.set_(value)
            originals[tensor_name] = original
    module.__class__ = module.__class__.__bases__[0]  # the class parametrize subclassed
    del module._modules["parametrizations"]
    for tensor_name, original in originals.items():
        module.register_parameter(tensor_name, original)


def strip(model: nn.Module) -> nn.Module:
    """Remove all masking machinery in place, leaving plain modules with zeros in place; returns `model`.

    The masked parameters keep their identity (an optimizer built on the masked model still points at
    them), now holding ``original * mask``.
    """
    for module in model.modules():
        _unmask_module(module)
    return model


def achieved_sparsity(model_or_masks: nn.Module | dict[str, Tensor], problem: PruningProblem) -> dict[str, float]:
    """Per prunable layer of `problem`: the fraction of zero weights (fine-grained) or of fully-zero
    output channels (structured), read from masks, a masked model, or a plain model's zeros."""
    if isinstance(model_or_masks, nn.Module):
        masks = masks_of(model_or_masks)
        modules = dict(model_or_masks.named_modules())
        for layer in problem.layers:
            if layer.name not in masks:
                weight = modules[layer.name].weight.detach()
                masks[layer.name] = (weight != 0).to(weight.dtype)
    else:
        masks = model_or_masks
    out: dict[str, float] = {}
    for layer in problem.layers:
        mask = masks.get(layer.name)
        if mask is None:
            out[layer.name] = 0.0
        elif problem.structured:
            axis = 1 if layer.op_type == "Conv1D" else 0
            out[layer.name] = float((_channel_vector(mask, axis) == 0).float().mean())
        else:
            out[layer.name] = float((mask == 0).float().mean())
    return out
