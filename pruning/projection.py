"""The executor's side of budgets: predicting a distribution's physical ratio, and measuring the dense model.

:mod:`pruning.budget` holds the pure projection search; this module gives it the predictor for one task and
model. FLOPs and params come from :func:`pruning.shrink.predict_params_flops` (a shrunk copy, counted); latency
from timing that copy on the worker's device with the task's ``dummy_input()`` batch.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from torch import nn

from pruning.budget import Budget
from pruning.config import PruningProblem

__all__ = ["LATENCY_REPEAT", "dense_latency", "latency_stats", "ratio_predictor"]

# Timed forward passes per latency measurement (after 3 untimed ones); the median is the value.
LATENCY_REPEAT = 15


def latency_stats(model: nn.Module, dummy_input: Any, device: str, repeat: int = LATENCY_REPEAT) -> tuple[float, float]:
    """Median and spread (half the interquartile range) of one forward pass, in milliseconds."""
    from pruning.metrics import measure_latency_samples

    samples = sorted(1000.0 * t for t in measure_latency_samples(model, dummy_input, device=device, repeat=repeat))
    quartiles = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return statistics.median(samples), (quartiles[2] - quartiles[0]) / 2.0


def dense_latency(model: nn.Module, dummy_input: Any, device: str) -> tuple[float, float]:
    """The dense model's latency (median, spread) in ms: the denominator of a latency budget."""
    return latency_stats(model, dummy_input, device)


def _shrunk_for(model: nn.Module, problem: PruningProblem, distribution: dict[str, float], dummy_input: Any) -> Any:
    from pruning.metrics import bookkeeping_threads
    from pruning.shrink import predicted_shrunk

    with bookkeeping_threads(problem.dense_flops):
        return predicted_shrunk(model, problem, distribution, dummy_input)


def ratio_predictor(
    model: nn.Module,
    problem: PruningProblem,
    budget: Budget,
    dummy_input: Any,
    *,
    device: str = "cpu",
    dense_latency_ms: float | None = None,
) -> Callable[[dict[str, float]], float]:
    """``distribution -> ratio`` of the budget's resource for the physically shrunk model, against the dense one.

    Which channels go does not change sizes, so FLOPs and params are exact; latency is measured on ``device``.
    Fine-grained problems (params budgets only) count the weights that stay.
    """
    resource = budget.resource
    if not problem.structured:
        if resource != "params":
            raise ValueError(f"a {resource} budget needs a structured base algorithm")
        from pruning.config import pruned_count

        def fine_grained(distribution: dict[str, float]) -> float:
            removed = sum(pruned_count(distribution[u.name], u.weight_count) for u in problem.units)
            return (problem.dense_params - removed) / problem.dense_params

        return fine_grained
    if resource == "latency":
        if not dense_latency_ms:
            raise ValueError("a latency budget needs the dense model's measured latency")

        def latency(distribution: dict[str, float]) -> float:
            shrunk = _shrunk_for(model, problem, distribution, dummy_input)
            return latency_stats(shrunk, dummy_input, device)[0] / dense_latency_ms

        return latency
    from pruning.metrics import bookkeeping_threads
    from pruning.shrink import predict_params_flops

    index = 0 if resource == "params" else 1
    dense = problem.dense_params if resource == "params" else problem.dense_flops

    def size(distribution: dict[str, float]) -> float:
        with bookkeeping_threads(problem.dense_flops):
            return predict_params_flops(model, problem, distribution, dummy_input)[index] / dense

    return size
