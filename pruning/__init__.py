"""prunehub's pure pruning library: config lists, importance criteria, masks, shrinking, metrics.

The package itself imports nothing heavy: names are loaded lazily on first access, so the API
process can ``import pruning.config`` (pydantic only) without importing torch.

>>> import pruning
>>> config = [{"sparsity": 0.5, "op_types": ["default"]}]
>>> problem = pruning.resolve_config_list(model, config, "l1", x)  # doctest: +SKIP
>>> masks = pruning.prune(model, problem, pruning.initial_distribution(problem))  # doctest: +SKIP
>>> from pruning.shrink import shrink  # the package attribute ``shrink`` is the module once it is imported
>>> recipe = shrink(model, masks, x)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "BASE_ALGOS",
    "STRUCTURED_ALGOS",
    "BaseAlgo",
    "ConfigEntry",
    "Distribution",
    "GradualPruner",
    "Importance",
    "PrunableLayer",
    "PruningProblem",
    "PruningUnit",
    "ShrinkRecipe",
    "SparsityDistribution",
    "TraceTimeout",
    "achieved_sparsity",
    "agp_sparsity",
    "apply_masks",
    "apply_recipe",
    "compute_masks",
    "count_nonzero",
    "count_params_flops",
    "get_importance",
    "global_distribution",
    "initial_distribution",
    "is_structured",
    "layer_distribution",
    "layer_stats",
    "load_compact",
    "load_pruned",
    "load_task",
    "masks_of",
    "measure_latency",
    "overall_sparsity",
    "predict_params_flops",
    "prune",
    "pruned_count",
    "rescale",
    "resolve_config_list",
    "save_compact",
    "shrink",
    "state_dict_for_export",
    "strip",
    "validate_config_list",
]

# Where the names above live. A name is looked up in each module's ``__all__`` in this order, torch-free modules
# first, so reaching a config or task name never imports torch.
_MODULES = (
    "pruning.config",
    "pruning.task",
    "pruning.importance",
    "pruning.pruner",
    "pruning.masks",
    "pruning.shrink",
    "pruning.metrics",
    "pruning.export",
    "pruning.schedule",
    "pruning.jobs",
)


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module_name in _MODULES:
            module = importlib.import_module(module_name)
            if name in module.__all__:
                return getattr(module, name)
    raise AttributeError(f"module 'pruning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # static checkers see the real names
    from pruning.config import (
        BASE_ALGOS,
        STRUCTURED_ALGOS,
        BaseAlgo,
        ConfigEntry,
        Distribution,
        PrunableLayer,
        PruningProblem,
        PruningUnit,
        SparsityDistribution,
        initial_distribution,
        is_structured,
        layer_distribution,
        overall_sparsity,
        pruned_count,
        rescale,
        resolve_config_list,
        validate_config_list,
    )
    from pruning.export import load_compact, save_compact, state_dict_for_export
    from pruning.importance import Importance, get_importance
    from pruning.jobs import load_pruned
    from pruning.masks import achieved_sparsity, apply_masks, masks_of, strip
    from pruning.metrics import count_nonzero, count_params_flops, layer_stats, measure_latency
    from pruning.pruner import compute_masks, global_distribution, prune
    from pruning.schedule import GradualPruner, agp_sparsity
    from pruning.shrink import ShrinkRecipe, TraceTimeout, apply_recipe, predict_params_flops, shrink
    from pruning.task import load_task
