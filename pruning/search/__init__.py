"""Pruning searches as ask/tell state machines (see :mod:`pruning.search.base` for the protocol).

``make_strategy(config)`` builds the strategy for a validated algorithm config
(:mod:`pruning.search.configs`).
Job kinds that belong to one strategy are executed by that strategy's module (:data:`EXECUTORS`).
"""

from __future__ import annotations

from typing import Any

from pruning.search.base import Job, RandomState, Result, SearchProblem, SearchState, Strategy, better
from pruning.search.configs import (
    ALGORITHMS,
    ADMMConfig,
    AGPConfig,
    AlgorithmConfig,
    AnnealingConfig,
    AutoCompressConfig,
    IterativeConfig,
    LotteryTicketConfig,
    NetAdaptConfig,
    OptunaConfig,
    SearchCommon,
    UniformConfig,
    parse_algorithm_config,
)

__all__ = [
    "ALGORITHMS",
    "EXECUTORS",
    "ADMMConfig",
    "AGPConfig",
    "AlgorithmConfig",
    "AnnealingConfig",
    "AutoCompressConfig",
    "IterativeConfig",
    "Job",
    "LotteryTicketConfig",
    "NetAdaptConfig",
    "OptunaConfig",
    "RandomState",
    "Result",
    "SearchCommon",
    "SearchProblem",
    "SearchState",
    "Strategy",
    "UniformConfig",
    "better",
    "make_strategy",
    "parse_algorithm_config",
    "state_type",
]

# Job kind -> module exposing ``execute(task, problem, job, store, device) -> Result``; ``evaluate`` and
# ``finetune_and_evaluate`` are :func:`pruning.jobs.execute_job`'s own.
EXECUTORS: dict[str, str] = {
    "admm_train": "pruning.search.admm",
    "netadapt_candidate": "pruning.search.netadapt",
    "agp_step": "pruning.search.schedules",
    "iterative_round": "pruning.search.schedules",
    "lottery_round": "pruning.search.schedules",
}


def make_strategy(config: SearchCommon | dict[str, Any]) -> Strategy[Any]:
    """The strategy for ``config`` (a validated config, or a raw dict validated here).

    Example::

        config_list = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]
        strategy = make_strategy({"algorithm": "annealing", "config_list": config_list})
        state = strategy.start(problem)
    """
    if isinstance(config, dict):
        config = parse_algorithm_config(config)
    # Imported here so that importing the package (the API does) stays light.
    if isinstance(config, UniformConfig):
        from pruning.search.uniform import UniformSearch

        return UniformSearch(config)  # type: ignore[return-value]
    if isinstance(config, AnnealingConfig):
        from pruning.search.annealing import AnnealingSearch

        return AnnealingSearch(config)  # type: ignore[return-value]
    if isinstance(config, NetAdaptConfig):
        from pruning.search.netadapt import NetAdaptSearch

        return NetAdaptSearch(config)  # type: ignore[return-value]
    if isinstance(config, ADMMConfig):
        from pruning.search.admm import ADMMSearch

        return ADMMSearch(config)  # type: ignore[return-value]
    if isinstance(config, AutoCompressConfig):
        from pruning.search.autocompress import AutoCompressSearch

        return AutoCompressSearch(config)  # type: ignore[return-value]
    if isinstance(config, OptunaConfig):
        from pruning.search.optuna_search import OptunaSearch

        return OptunaSearch(config)  # type: ignore[return-value]
    if isinstance(config, AGPConfig):
        from pruning.search.schedules import AGPSearch

        return AGPSearch(config)  # type: ignore[return-value]
    if isinstance(config, IterativeConfig):
        from pruning.search.schedules import IterativeSearch

        return IterativeSearch(config)  # type: ignore[return-value]
    if isinstance(config, LotteryTicketConfig):
        from pruning.search.schedules import LotteryTicketSearch

        return LotteryTicketSearch(config)  # type: ignore[return-value]
    raise ValueError(f"no strategy for algorithm {getattr(config, 'algorithm', None)!r}; known: {ALGORITHMS}")


def state_type(algorithm: str) -> type[SearchState]:
    """The state class of ``algorithm``, to reload a persisted state:
    ``state_type(algorithm).model_validate_json(text)``."""
    from importlib import import_module

    module, name = {
        "uniform": ("pruning.search.uniform", "UniformState"),
        "annealing": ("pruning.search.annealing", "AnnealingState"),
        "netadapt": ("pruning.search.netadapt", "NetAdaptState"),
        "admm": ("pruning.search.admm", "ADMMState"),
        "autocompress": ("pruning.search.autocompress", "AutoCompressState"),
        "optuna": ("pruning.search.optuna_search", "OptunaState"),
        "agp": ("pruning.search.schedules", "AGPState"),
        "iterative": ("pruning.search.schedules", "IterativeState"),
        "lottery_ticket": ("pruning.search.schedules", "LotteryTicketState"),
    }[algorithm]
    return getattr(import_module(module), name)  # type: ignore[no-any-return]
