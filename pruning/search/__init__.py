"""Pruning searches as ask/tell state machines (see :mod:`pruning.search.base` for the protocol).

``make_strategy(config)`` builds the strategy for a validated algorithm config
(:mod:`pruning.search.configs`).
Job kinds that belong to one strategy are executed by that strategy's module (:data:`EXECUTORS`).
"""

from __future__ import annotations

from importlib import import_module
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
    SensitivityConfig,
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
    "SensitivityConfig",
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


# algorithm -> (module, search class, state class); imported on use so that importing the package (the API
# does) stays light.
_STRATEGIES: dict[str, tuple[str, str, str]] = {
    "uniform": ("pruning.search.uniform", "UniformSearch", "UniformState"),
    "annealing": ("pruning.search.annealing", "AnnealingSearch", "AnnealingState"),
    "netadapt": ("pruning.search.netadapt", "NetAdaptSearch", "NetAdaptState"),
    "admm": ("pruning.search.admm", "ADMMSearch", "ADMMState"),
    "autocompress": ("pruning.search.autocompress", "AutoCompressSearch", "AutoCompressState"),
    "optuna": ("pruning.search.optuna_search", "OptunaSearch", "OptunaState"),
    "agp": ("pruning.search.schedules", "AGPSearch", "AGPState"),
    "iterative": ("pruning.search.schedules", "IterativeSearch", "IterativeState"),
    "lottery_ticket": ("pruning.search.schedules", "LotteryTicketSearch", "LotteryTicketState"),
    "sensitivity": ("pruning.search.sensitivity", "SensitivitySearch", "SensitivityState"),
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
    algorithm = getattr(config, "algorithm", None)
    if algorithm not in _STRATEGIES:
        raise ValueError(f"no strategy for algorithm {algorithm!r}; known: {ALGORITHMS}")
    module, search, _ = _STRATEGIES[algorithm]
    finalists = config.finalist_count
    guarded = config.uniform_guarded
    if not finalists and not guarded:
        return getattr(import_module(module), search)(config)  # type: ignore[no-any-return]
    from pruning.search.finalists import FinalistSearch, reserve

    limit = config.max_trials
    if limit is not None:  # the round's trials come out of max_trials
        config = config.model_copy(update={"max_trials": reserve(limit, finalists)})
    inner = getattr(import_module(module), search)(config)
    epochs = config.candidate_eval.finalist_epochs
    return FinalistSearch(inner, finalists, epochs, max_trials=limit, against_search=guarded)


def state_type(algorithm: str) -> type[SearchState]:
    """The state class of ``algorithm``, to reload a persisted state:
    ``state_type(algorithm).model_validate_json(text)``."""
    module, _, state = _STRATEGIES[algorithm]
    return getattr(import_module(module), state)  # type: ignore[no-any-return]
