"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2023, "Outlier Weighed Layerwise Sparsity").

Per layer, the outlier ratio ``D`` is the fraction of its wanda scores (``|W| x ||X_j||``) above ``m`` times the
layer's mean score. Layers with more outliers are pruned less: ratios are mapped linearly onto ``[0, 2 lambda]``
and subtracted from the target around their (weight-count weighted) mean, so the layers' sparsities span at
most ``2 lambda`` around the target (``+/- lambda`` when the outlier ratios are spread evenly) and the overall,
weight-weighted sparsity is the target (a layer pushed past ``[0, max_sparsity]`` is clipped and the rest
rescaled). The annealing search with
``prior: "owl"`` starts from this allocation instead of a uniform one.
"""

from __future__ import annotations

from typing import Any

from pruning.config import PruningProblem, rescale

__all__ = ["owl_allocation", "outlier_ratios"]


def outlier_ratios(model: Any, problem: PruningProblem, task: Any, m: float = 5.0) -> dict[str, float]:
    """Per unit (fine-grained layers only): the fraction of wanda scores above ``m`` x the layer's mean."""
    from pruning.importance import get_importance

    if problem.structured:
        raise ValueError("prior 'owl' allocates fine-grained layer sparsity; use base_algo 'level' or 'wanda'")
    importance = get_importance("wanda")
    importance.collect(model, problem.unit_names(), task)
    modules = dict(model.named_modules())
    out: dict[str, float] = {}
    for unit in problem.units:
        scores = importance(unit.name, modules[unit.name])
        if scores is None:
            raise ValueError(f"prior 'owl': layer {unit.name!r} is not a Linear layer, so it has no wanda scores")
        out[unit.name] = float((scores > m * scores.mean()).double().mean())
    return out


def owl_allocation(
    ratios: dict[str, float], problem: PruningProblem, target: float, lam: float = 0.08
) -> dict[str, float]:
    """The OWL sparsity per unit for outlier ``ratios`` at overall ``target`` (see the module docstring)."""
    lo, hi = min(ratios.values()), max(ratios.values())
    spread = {n: (r - lo) / (hi - lo) * 2 * lam if hi > lo else 0.0 for n, r in ratios.items()}
    weights = {u.name: float(u.weight_count) for u in problem.units}
    centre = sum(spread[n] * weights[n] for n in weights) / sum(weights.values())
    raw = {n: target - (spread[n] - centre) for n in weights}
    clipped = {u.name: min(max(raw[u.name], 0.0), u.max_sparsity) for u in problem.units}
    if clipped == raw:
        return raw
    return rescale(clipped, target, problem)  # a bound was hit: keep the budget with the library's bounded rescale
