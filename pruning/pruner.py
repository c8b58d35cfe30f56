"""From a distribution to masks: score, rank, keep.

Counts are exact: a unit at sparsity s loses ``round(s * n)`` of its n elements (fine-grained), blocks
(block sparsity) or channels (structured; at least one channel always survives). Among equal scores
the lower index is pruned first. Ranking uses `torch.kthvalue` on flattened scores (linear time), so
masks for a 25M-parameter model take a fraction of a second on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pruning.config import PruningProblem, PruningUnit, _check_keys, pruned_count
from pruning.importance import Importance, block_scores, expand_block_mask, get_importance
from pruning.importance.base import channel_rows, channel_shape, out_axis, weight_of
from pruning.masks import apply_masks

__all__ = [
    "collected_importance",
    "compute_masks",
    "global_distribution",
    "keep_mask",
    "prune",
    "select_channels",
    "unit_scores",
]


def keep_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask over a 1-D `scores` that drops exactly the `k` lowest (lower index first on ties)."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot prune {k} of {n} entries")
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if k == 0:
        return keep
    if k == n:
        return ~keep
    flat = scores.reshape(-1)
    if flat.is_floating_point():
        flat = torch.nan_to_num(flat, nan=float("-inf"))  # a NaN score says nothing: prune it first
    threshold = torch.kthvalue(flat.cpu() if flat.device.type == "mps" else flat, k).values
    below = flat < threshold
    keep &= ~below
    missing = k - int(below.sum())
    if missing > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:missing]
        keep[ties] = False
    return keep


def select_channels(unit: PruningUnit, scores: Tensor, k: int) -> Tensor:
    """Channels of a structured unit to keep when `k` go: the `k` lowest scores, except that every
    member keeps at least one channel (a concatenated branch cannot shrink to nothing).

    The swap that saves a member replaces its best channel by the next-lowest channel that no other
    member needs, so the count stays exact whenever that is physically possible.
    """
    keep = keep_mask(scores, k)
    if not unit.channel_index:
        return keep
    members = [torch.tensor(idx, dtype=torch.long) for idx in unit.channel_index.values()]
    order = torch.sort(scores.double(), stable=True).indices.tolist()
    for idx in members:
        if bool(keep[idx].any()):
            continue
        keep[idx[torch.argmax(scores[idx])]] = True
        for candidate in order:  # loops over members' rescues, not over every channel
            if not keep[candidate]:
                continue
            keep[candidate] = False
            if all(bool(keep[other].any()) for other in members):
                break
            keep[candidate] = True
    return keep


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _member_index(unit: PruningUnit, member: str, size: int, device: torch.device) -> Tensor:
    if member in unit.channel_index:
        return torch.tensor(unit.channel_index[member], dtype=torch.long, device=device)
    return torch.arange(size, device=device)


def unit_scores(model: nn.Module, unit: PruningUnit, importance: Importance, normalize: bool = True) -> Tensor:
    """Channel scores of a structured unit: the mean over members that the criterion scores.

    With `normalize`, each member's scores are divided by their mean first, so a member with large
    weights does not outvote the others (Torch-Pruning's default group reduction).
    """
    if unit.channels is None:
        raise ValueError(f"unit {unit.name!r} is fine-grained")
    modules = _modules(model)
    total = torch.zeros(unit.channels, dtype=torch.float64)
    count = torch.zeros(unit.channels, dtype=torch.float64)
    for member in unit.members:
        scores = importance(member, modules[member])
        if scores is None:
            continue
        scores = scores.detach().double().cpu().reshape(-1)
        if normalize:
            mean = scores.mean()
            if mean > 0:
                scores = scores / mean
        idx = _member_index(unit, member, scores.numel(), scores.device)
        total.index_add_(0, idx, scores)
        count.index_add_(0, idx, torch.ones_like(scores))
    if bool((count == 0).any()):
        raise ValueError(
            f"{_criterion_name(importance)} scores no layer of unit {unit.name!r} (members {unit.members}); "
            + ("slim needs a BatchNorm in every channel group" if "Slim" in _criterion_name(importance) else "")
        )
    return total / count


class _SurvivorsFirst(Importance):
    """`inner`'s scores with what the `previous` masks removed scored just below every survivor of its layer, so
    a ranking re-selects the removed entries first (for any criterion, not only those that score zeros lowest).
    The offset is tiny, so a member's mean (structured normalisation) barely moves."""

    def __init__(self, inner: Importance, previous: dict[str, Tensor], channels: bool) -> None:
        self.inner = inner
        self.previous = previous
        self.channels = channels

    def __call__(self, name: str, module: nn.Module) -> Tensor | None:
        scores = self.inner(name, module)
        mask = self.previous.get(name)
        if scores is None or mask is None:
            return scores
        gone = (channel_rows(mask, out_axis(module)).amax(dim=1) == 0) if self.channels else (mask == 0)
        if not bool(gone.any()):
            return scores
        low = min(0.0, float(scores.min()))
        floor = low - 1e-6 * (abs(float(scores.max())) + abs(low) + 1.0)
        return torch.where(gone.to(scores.device).reshape(scores.shape), torch.full_like(scores, floor), scores)


def _criterion_name(importance: Importance) -> str:
    return type(importance.inner if isinstance(importance, _SurvivorsFirst) else importance).__name__


def collected_importance(model: nn.Module, problem: PruningProblem, task: Any = None) -> Importance:
    """`problem`'s criterion with its statistics collected from `task` (activations or gradients), ready to pass
    as ``importance=`` to several calls on the same weights, so the user's code runs once, not per call."""
    importance = get_importance(problem.base_algo)
    if importance.requires_task:
        if task is None:
            raise ValueError(f"base algorithm {problem.base_algo!r} needs the task (trainer/evaluator) for statistics")
        importance.collect(model, [m for u in problem.units for m in u.members], task)
    return importance


def _ready_importance(
    model: nn.Module,
    problem: PruningProblem,
    importance: Importance | None,
    task: Any,
    previous: dict[str, Tensor] | None,
) -> Importance:
    """The criterion to rank with: the caller's (ready as given) or `problem`'s with its statistics collected,
    survivors first over `previous`."""
    importance = importance or collected_importance(model, problem, task)
    return _SurvivorsFirst(importance, previous, problem.structured) if previous else importance


def compute_masks(
    model: nn.Module,
    problem: PruningProblem,
    distribution: dict[str, float],
    task: Any = None,
    importance: Importance | None = None,
    *,
    previous: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Masks (layer name → 0/1 tensor shaped like its weight) realising `distribution` on `model`.

    Fine-grained units prune their lowest-scored elements (or blocks); structured units prune their
    lowest-scored channels, one channel mask shared by every member. Statistics criteria read `task`
    (see `pruning.importance`). `importance` overrides the criterion of ``problem.base_algo``. The
    model is not modified.

    `previous` (masks of an earlier step, as this function returns them) makes pruning monotonic: what they
    removed ranks just below every survivor, so it goes first and each count stays exact, and it stays removed
    even where the new sparsity is lower.
    """
    _check_keys(distribution, problem)
    importance = _ready_importance(model, problem, importance, task, previous)
    modules = _modules(model)
    masks: dict[str, Tensor] = {}
    for unit in problem.units:
        sparsity = distribution[unit.name]
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity of unit {unit.name!r} must lie in [0, 1], got {sparsity}")
        if unit.channels is None:
            module = modules[unit.name]
            weight = weight_of(module)
            scores = importance(unit.name, module)
            if scores is None:
                raise ValueError(f"{_criterion_name(importance)} cannot score layer {unit.name!r}")
            if unit.pattern is not None:
                keep = _pattern_keep(unit, module, scores, sparsity)
            elif unit.block is not None:
                blocks = block_scores(scores, unit.block, unit.block_pooling)
                keep = keep_mask(blocks.reshape(-1), pruned_count(sparsity, blocks.numel())).view(blocks.shape)
                keep = expand_block_mask(keep, unit.block, tuple(weight.shape))
            else:
                keep = keep_mask(scores.reshape(-1), pruned_count(sparsity, scores.numel())).view(weight.shape)
            masks[unit.name] = keep.to(dtype=weight.dtype, device=weight.device)
        else:
            channel_keep = select_channels(unit, unit_scores(model, unit, importance), unit.count(sparsity))
            for member in unit.members:
                weight = weight_of(modules[member])
                axis = out_axis(modules[member])
                idx = _member_index(unit, member, weight.shape[axis], channel_keep.device)
                per_channel = channel_keep[idx].to(dtype=weight.dtype, device=weight.device)
                masks[member] = per_channel.view(channel_shape(weight, axis)).expand_as(weight).contiguous()
    if previous:
        masks = {name: mask * previous[name].to(mask) if name in previous else mask for name, mask in masks.items()}
    return masks


def _pattern_keep(unit: PruningUnit, module: nn.Module, scores: Tensor, sparsity: float) -> Tensor:
    """An N:M unit is patterned (sparsity ``1 - N/M``) or dense (0); anything else is a request it cannot meet."""
    from pruning.nm import nm_keep_mask, pattern_text

    assert unit.pattern is not None and unit.pattern_sparsity is not None
    if sparsity == 0.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if abs(sparsity - unit.pattern_sparsity) > 1e-9:
        raise ValueError(
            f"unit {unit.name!r} has pattern {pattern_text(unit.pattern)}: its sparsity is 0 or "
            f"{unit.pattern_sparsity:g}, not {sparsity:g}"
        )
    return nm_keep_mask(scores, unit.pattern, input_axis=0 if out_axis(module) == 1 else 1)


def prune(
    model: nn.Module,
    problem: PruningProblem,
    distribution: dict[str, float],
    task: Any = None,
    importance: Importance | None = None,
) -> dict[str, Tensor]:
    """`compute_masks` then `apply_masks` on `model` (in place); returns the masks."""
    masks = compute_masks(model, problem, distribution, task=task, importance=importance)
    apply_masks(model, masks, structured=problem.structured)
    return masks


def global_distribution(
    model: nn.Module,
    problem: PruningProblem,
    target: float,
    task: Any = None,
    importance: Importance | None = None,
    *,
    normalize: bool | None = None,
    previous: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """The distribution that one global ranking implies: one threshold across all selected layers.

    Every unit's candidates (elements, blocks with block sparsity, or channels of a structured unit) are
    ranked together, lowest first, and removed until the removed weights are as close as possible to `target`
    of all units' weights (exactly ``round(target * total)`` elements for fine-grained units); each unit's
    sparsity is the fraction of its candidates removed. A unit never goes past its ``max_sparsity`` (nor, if
    structured, its last channel): its candidates beyond that bound are not ranked, so the others take up the
    rest. Feed the result to `compute_masks`, which removes the same candidates unit by unit.

    Scores are compared raw for element magnitudes (``level``, as ``torch.nn.utils.prune.global_unstructured``
    does) and BatchNorm scales (``slim``, Network Slimming's rule); with other structured criteria each member's
    channel scores are divided by their mean first (`normalize`; Torch-Pruning's default for global pruning),
    because raw filter norms grow with fan-in and would empty the first layer. With `previous`, what those masks
    removed ranks first, as in `compute_masks` (pass the same masks to both).
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    importance = _ready_importance(model, problem, importance, task, previous)
    if normalize is None:
        normalize = problem.structured and problem.base_algo != "slim"
    modules = _modules(model)
    scores: list[Tensor] = []
    weights: list[Tensor] = []
    owners: list[Tensor] = []
    sizes: list[int] = []
    for i, unit in enumerate(problem.units):
        if unit.channels is not None:
            candidates = unit_scores(model, unit, importance, normalize=normalize)
            bound = unit.count(unit.max_sparsity)
        else:
            module = modules[unit.name]
            element_scores = importance(unit.name, module)
            if element_scores is None:
                raise ValueError(f"{_criterion_name(importance)} cannot score layer {unit.name!r}")
            if unit.block is not None:
                element_scores = block_scores(element_scores, unit.block, unit.block_pooling)
            candidates = element_scores.detach().reshape(-1).double().cpu()
            bound = pruned_count(unit.max_sparsity, candidates.numel())
        candidates = torch.nan_to_num(candidates.double(), nan=float("-inf"))
        sizes.append(candidates.numel())
        # Only a unit's `bound` lowest candidates can go (lower index first on ties, as keep_mask does).
        lowest = torch.sort(candidates, stable=True).values[:bound]
        scores.append(lowest)
        weights.append(torch.full((lowest.numel(),), unit.weight_count / candidates.numel(), dtype=torch.float64))
        owners.append(torch.full((lowest.numel(),), i, dtype=torch.long))
    all_scores, all_weights, all_owners = torch.cat(scores), torch.cat(weights), torch.cat(owners)
    order = torch.sort(all_scores, stable=True).indices
    budget = target * sum(float(u.weight_count) for u in problem.units)
    cum = torch.cumsum(all_weights[order], 0)
    # The cut whose removed weight is nearest to the budget (cum[-1] when the bounds cannot reach it).
    cut = int(torch.searchsorted(cum, torch.tensor(budget, dtype=torch.float64), right=True))
    if cut < cum.numel():
        below = float(cum[cut - 1]) if cut > 0 else 0.0
        if float(cum[cut]) - budget < budget - below:
            cut += 1
    removed = torch.bincount(all_owners[order[:cut]], minlength=len(problem.units))
    return {unit.name: int(removed[i]) / sizes[i] for i, unit in enumerate(problem.units)}
