"""Physical shrinking ("speedup") of structured masks with Torch-Pruning's dependency graph.

Removing an output channel also removes every input that consumes it: the next conv's input
channels, BatchNorm entries, the matching slice of a concatenation, the channels of a depthwise
convolution, and the ``H*W`` features a flatten turns a channel into for the next Linear. A channel is
removed only when every masked layer coupled with it has it masked, so the shrunk model computes
exactly what the masked model computes (channels that are masked but not removable stay as zeros).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from pruning import _blocks, _graph
from pruning._graph import TraceTimeout
from pruning.config import PruningProblem, _check_keys
from pruning.importance.base import channel_rows, channel_shape, out_axis, weight_of
from pruning.masks import strip
from pruning.metrics import count_params_flops
from pruning.pruner import select_channels

T = TypeVar("T")

__all__ = [
    "ShrinkRecipe",
    "TraceTimeout",
    "apply_recipe",
    "predict_params_flops",
    "predicted_shrunk",
    "shrink",
    "shrunk_copy",
]


class ShrinkRecipe(BaseModel):
    """What `shrink` removed: layer name → output channel indices, numbered as in the original model.

    JSON-serialisable; `apply_recipe` replays it on a fresh copy of the original model.
    """

    removed: dict[str, list[int]] = Field(default_factory=dict)


class _Shrinker:
    """Prunes groups one root at a time while tracking each layer's original channel numbering."""

    def __init__(self, model: nn.Module, dummy_input: Any) -> None:
        self.model = model
        self.graph = _graph.build(model, dummy_input)
        self.modules = dict(model.named_modules())
        self.order = {n: i for i, n in enumerate(self.modules)}
        # original index of each current output channel, per maskable layer
        self.origin: dict[str, Tensor] = {
            n: torch.arange(_graph.out_dim_size(m))
            for n, m in self.modules.items()
            if isinstance(m, _graph.MASKABLE) and m in self.graph.dg.module2node
        }
        self.removed: dict[str, list[int]] = {}

    def prune_root(self, root: str, current_idxs: list[int]) -> None:
        module = self.modules[root]
        rg, group = _graph.root_group(self.graph, module, current_idxs)
        if rg.blocked_reason is not None:
            raise ValueError(f"cannot remove output channels of {root!r}: {rg.blocked_reason}")
        group.prune(record_history=False)
        for item in rg.items:
            origin = self.origin[item.name]
            idxs = torch.tensor(sorted(set(item.idxs)), dtype=torch.long)
            self.removed.setdefault(item.name, []).extend(origin[idxs].tolist())
            keep = torch.ones(origin.numel(), dtype=torch.bool)
            keep[idxs] = False
            self.origin[item.name] = origin[keep]

    def full_group(self, root: str) -> _graph.RootGroup:
        module = self.modules[root]
        rg, _ = _graph.root_group(self.graph, module, list(range(_graph.out_dim_size(module))))
        return rg


def _zero_channels(mask: Tensor, axis: int = 0) -> Tensor:
    return channel_rows(mask.detach(), axis).amax(dim=1).cpu() == 0


def _outside_blocks(names: list[str]) -> ValueError:
    return ValueError(
        f"{names} lie outside the model's attention heads and MLP channels: their output channels are the "
        "hidden (residual) dimension or the model's output, which prunehub does not prune"
    )


def _shrink_blocks(model: nn.Module, scan: _blocks.BlockScan, masks: dict[str, Tensor]) -> ShrinkRecipe:
    """Transformers: remove each block's unit channels that every producer has fully masked."""
    modules = dict(model.named_modules())
    by_producer = scan.producer_block()
    outside = [n for n in masks if n not in by_producer]
    if outside:
        raise _outside_blocks(outside)
    removed: dict[str, list[int]] = {}
    for block in scan.blocks:
        if not any(p in masks for p in block.producers):
            continue
        missing = [p for p in block.producers if p not in masks]
        if missing:
            # a head whose value rows are not masked still contributes: removing it would change the output
            raise ValueError(f"masks for {block.module!r} must cover all of {block.producers}; missing {missing}")
        keep = torch.ones(block.channels, dtype=torch.bool)
        for producer in block.producers:
            zero = _zero_channels(masks[producer], out_axis(modules[producer]))
            index = torch.tensor(block.channel_index[producer], dtype=torch.long)
            dead = torch.ones(block.channels, dtype=torch.long)
            dead.scatter_reduce_(0, index, zero.long(), reduce="amin")  # a unit channel is dead when all its rows are
            keep &= dead == 0
        if bool(keep.all()):
            continue
        if not bool(keep.any()):
            raise ValueError(f"masks remove every head/channel of {block.module!r}; at least one must stay")
        removed.update(_blocks.shrink_block(model, block, keep))
    order = {n: i for i, n in enumerate(modules)}
    return ShrinkRecipe(removed={n: removed[n] for n in sorted(removed, key=order.__getitem__)})


def shrink(
    model: nn.Module, masks: dict[str, Tensor], dummy_input: Any, timeout_s: float | None = None
) -> ShrinkRecipe:
    """Strip `model` and physically remove its masked output channels, in place.

    `masks` are structured masks as `pruning.pruner.compute_masks` returns them (layer name → weight
    mask). A channel is removed when all coupled layers present in `masks` have it fully masked;
    groups tied to the model's output are never shrunk. Returns the recipe (original numbering).
    Parameters are replaced: build optimizers after shrinking.

    A transformer (a model with attention blocks, see `pruning._blocks`) loses whole heads and MLP channels
    without tracing: q/k/v rows, the output projection's columns and the module's head counts. Other models go
    through Torch-Pruning's dependency graph, within `timeout_s` (`TraceTimeout` otherwise).
    """
    return _by_structure(
        model, "shrink it", timeout_s,
        blocks=lambda scan: _shrink_blocks(model, scan, masks),
        traced=lambda: _shrink_traced(model, masks, dummy_input),
    )


def _by_structure(
    model: nn.Module, purpose: str, timeout_s: float | None, *, blocks: Callable[[_blocks.BlockScan], T],
    traced: Callable[[], T],
) -> T:
    """Strip the masks, then do ``blocks(scan)`` for a model with attention blocks (no trace) or ``traced()``
    within the trace time limit for any other model."""
    strip(model)
    scan = _blocks.find_blocks(model)
    if scan.blocks:
        return blocks(scan)
    description = f"tracing {type(model).__name__} to {purpose}"
    with _graph.time_limit(_graph.trace_timeout_s(timeout_s), lambda: description):
        return traced()


def _shrink_traced(model: nn.Module, masks: dict[str, Tensor], dummy_input: Any) -> ShrinkRecipe:
    shrinker = _Shrinker(model, dummy_input)
    zero = {name: _zero_channels(mask, out_axis(shrinker.modules[name])) for name, mask in masks.items()}
    unknown = [n for n in zero if n not in shrinker.origin]
    if unknown:
        raise ValueError(f"masks name layers that are not prunable modules of the traced model: {unknown}")
    for name in sorted(zero, key=shrinker.order.__getitem__):
        origin = shrinker.origin[name]
        if not bool(zero[name][origin].any()):
            continue
        rg = shrinker.full_group(name)
        if rg.blocked_reason is not None:
            continue  # leave the zeros: removing them would change the model's output shape
        removable = torch.ones(origin.numel(), dtype=torch.bool)  # in the root's current numbering
        for item in rg.items:
            if item.name not in zero:
                continue
            member_zero = zero[item.name][shrinker.origin[item.name][torch.tensor(item.idxs, dtype=torch.long)]]
            agree = torch.ones(origin.numel(), dtype=torch.bool)
            agree[torch.tensor(item.root_idxs, dtype=torch.long)] = member_zero
            removable &= agree
        idxs = torch.nonzero(removable).flatten().tolist()
        if idxs:
            shrinker.prune_root(name, idxs)
    ordered = sorted(shrinker.removed, key=shrinker.order.__getitem__)
    return ShrinkRecipe(removed={n: sorted(shrinker.removed[n]) for n in ordered})


def _replay_blocks(model: nn.Module, scan: _blocks.BlockScan, recipe: ShrinkRecipe) -> nn.Module:
    by_producer = scan.producer_block()
    outside = [n for n in recipe.removed if n not in by_producer]
    if outside:
        raise _outside_blocks(outside)
    for block in scan.blocks:
        if not any(p in recipe.removed for p in block.producers):
            continue
        first = block.producers[0]
        index = torch.tensor(block.channel_index[first], dtype=torch.long)
        gone = torch.zeros(len(block.channel_index[first]), dtype=torch.bool)
        gone[torch.tensor(recipe.removed.get(first, []), dtype=torch.long)] = True
        dead = torch.zeros(block.channels, dtype=torch.bool).index_fill_(0, index[gone], True)
        removed = _blocks.shrink_block(model, block, ~dead)
        for producer in block.producers:
            if removed.get(producer, []) != sorted(recipe.removed.get(producer, [])):
                raise ValueError(f"recipe does not fit this model: {producer!r} would lose {removed.get(producer)}")
    return model


def apply_recipe(model: nn.Module, recipe: ShrinkRecipe, dummy_input: Any, timeout_s: float | None = None) -> nn.Module:
    """Replay `recipe` on a fresh, unmasked copy of the original model (in place); returns it."""
    return _by_structure(
        model, "replay a shrink recipe", timeout_s,
        blocks=lambda scan: _replay_blocks(model, scan, recipe),
        traced=lambda: _replay_traced(model, recipe, dummy_input),
    )


def _replay_traced(model: nn.Module, recipe: ShrinkRecipe, dummy_input: Any) -> nn.Module:
    shrinker = _Shrinker(model, dummy_input)
    for name, wanted in recipe.removed.items():
        if name not in shrinker.origin:
            raise ValueError(f"recipe names {name!r}, which is not a prunable layer of this model")
        origin = shrinker.origin[name]
        todo = torch.isin(origin, torch.tensor(wanted, dtype=torch.long))
        idxs = torch.nonzero(todo).flatten().tolist()
        if idxs:
            shrinker.prune_root(name, idxs)
    for name, wanted in recipe.removed.items():
        if sorted(shrinker.removed.get(name, [])) != sorted(wanted):
            raise ValueError(f"recipe does not fit this model: {name!r} lost {shrinker.removed.get(name)}")
    return model


def predict_params_flops(
    model: nn.Module, problem: PruningProblem, distribution: dict[str, float], dummy_input: Any
) -> tuple[int, int]:
    """Params and MACs the shrunk model will have for a structured `distribution`.

    Which channels go does not change the sizes, only how many, so this shrinks a copy with each unit's
    lowest-numbered channels masked and counts it. `model` is not modified.
    """
    return count_params_flops(predicted_shrunk(model, problem, distribution, dummy_input), dummy_input)


def predicted_shrunk(
    model: nn.Module, problem: PruningProblem, distribution: dict[str, float], dummy_input: Any
) -> nn.Module:
    """A shrunk copy of `model` with the shapes `distribution` gives (each unit's lowest-numbered channels
    removed): the right size and speed, not the right weights."""
    _check_keys(distribution, problem)
    if not problem.structured:
        raise ValueError("size prediction applies to structured problems; fine-grained pruning keeps shapes")
    work = _graph.plain_copy(model)
    modules = dict(work.named_modules())
    masks: dict[str, Tensor] = {}
    for unit in problem.units:
        assert unit.channels is not None
        k = unit.count(distribution[unit.name])
        keep = select_channels(unit, torch.zeros(unit.channels), k)  # ties → lowest-numbered channels go
        for member in unit.members:
            weight = weight_of(modules[member])
            idx = unit.channel_index.get(member)
            per = keep[torch.tensor(idx)] if idx is not None else keep
            axis = out_axis(modules[member])
            masks[member] = per.view(channel_shape(weight, axis)).expand_as(weight).to(weight.dtype)
    shrink(work, masks, dummy_input)
    return work


def shrunk_copy(model: nn.Module, masks: dict[str, Tensor], dummy_input: Any) -> tuple[nn.Module, ShrinkRecipe]:
    """`shrink` applied to a deep copy; returns the copy and the recipe."""
    work = copy.deepcopy(model)
    return work, shrink(work, masks, dummy_input)
