"""Execute one search :class:`~pruning.search.base.Job` against the user's task and measure the result.

The runner (in-process or distributed) calls :func:`execute_job` for every job a strategy asks for. Generic kinds
(``evaluate``, ``finetune_and_evaluate``) are handled here; kinds that belong to one strategy (ADMM's training
step, NetAdapt's candidate search) are dispatched to that strategy's module, which exposes the same signature.

Weights travel through the :class:`~pruning.artifacts.ArtifactStore`:

* a *checkpoint* artifact (``format: prunehub.masked/1``) holds the full-shape weights (pruned entries zero) and
  the masks, in the original model's numbering — later jobs start from it;
* a *model* artifact (``format: prunehub.pruned/1``) holds the physically shrunk weights and the
  :class:`~pruning.shrink.ShrinkRecipe` that rebuilds their shape from the task's ``model()``
  (:func:`load_pruned`) — this is what users download.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
import traceback
from typing import Any

from pruning.artifacts import ArtifactStore
from pruning.config import PruningProblem, layer_distribution, overall_sparsity
from pruning.search import EXECUTORS
from pruning.search.base import Job, Result, SearchProblem
from pruning.task import Task

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "JobFailed",
    "execute_job",
    "load_checkpoint",
    "load_pruned",
    "measure_model",
    "measured_budget_ratio",
    "pattern_layers",
    "resolve_problem",
    "save_checkpoint",
    "save_pruned_model",
]

CHECKPOINT_FORMAT = "prunehub.masked/1"
MODEL_FORMAT = "prunehub.pruned/1"

class JobFailed(RuntimeError):
    """A job could not produce a valid result; the message is the trial's error."""


def save_checkpoint(store: ArtifactStore, model: Any, masks: dict[str, Any]) -> str:
    """Store full-shape (stripped) weights and masks; return the artifact id."""
    tensors = {f"w::{name}": value for name, value in model.state_dict().items()}
    tensors.update({f"m::{name}": mask for name, mask in masks.items()})
    return store.put(tensors, {"format": CHECKPOINT_FORMAT})


def load_checkpoint(task: Task, store: ArtifactStore, artifact_id: str | None) -> tuple[Any, dict[str, Any]]:
    """A fresh ``task.model()`` with the checkpoint's weights loaded, and its masks (empty without one)."""
    model = task.model()
    if artifact_id is None:
        return model, {}
    tensors, meta = store.get(artifact_id)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise JobFailed(f"artifact {artifact_id} is not a checkpoint ({meta.get('format')!r})")
    state = {name[3:]: value for name, value in tensors.items() if name.startswith("w::")}
    masks = {name[3:]: value for name, value in tensors.items() if name.startswith("m::")}
    model.load_state_dict(state)
    return model, masks


def pattern_layers(pruning: PruningProblem, distribution: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per N:M layer that the distribution patterns: its pattern, the axis its groups run along, and whether
    ``torch.sparse.to_sparse_semi_structured`` takes its weight (a 2:4-compatible pattern and a kernel-sized shape;
    the weight is stored dense with exact zeros, Conv1D's transposed: hand the kernel ``weight.t()``), and when it
    does not, why (``kernel_why``)."""
    from pruning.nm import pattern_text, semi_structured_why

    out: dict[str, dict[str, Any]] = {}
    for unit in pruning.units:
        if unit.pattern is None or distribution.get(unit.name, 0.0) == 0.0:
            continue
        layer = pruning.layer(unit.name)
        transposed = layer.op_type == "Conv1D"
        rows, cols = (layer.weight_shape[1], layer.weight_shape[0]) if transposed else layer.weight_shape[:2]
        why = semi_structured_why(unit.pattern, rows, cols)
        out[unit.name] = {
            "pattern": pattern_text(unit.pattern),
            "input_axis": 0 if transposed else 1,
            "semi_structured": why is None,
        }
        if why is not None:
            out[unit.name]["kernel_why"] = why
    return out


def _nm_record(
    layers: dict[str, dict[str, Any]], metrics: dict[str, Any], shrunk: Any, dummy: Any, device: str
) -> dict[str, Any]:
    """``extra["nm"]`` of an N:M trial. Where the kernel runs and latency is measured, the timing copy is timed
    dense and semi-structured (:func:`pruning.nm.semi_structured_latency`) and the trial's latency (``metrics``,
    updated here) becomes the semi-structured one; everywhere else the record says why no speed-up is measured."""
    from pruning.nm import semi_structured_kernel, semi_structured_latency

    record: dict[str, Any] = {"layers": layers}
    dense = "FLOPs and latency are of the dense kernels"
    why = semi_structured_kernel(device)
    if why is None and not any(layer["semi_structured"] for layer in layers.values()):
        why = "no patterned layer takes the kernel (see each layer's kernel_why)"
    if why is None and "latency_ms" not in metrics:
        why = "the experiment does not measure latency (resource or budget 'latency' does)"
    if why is not None:
        record["speedup"] = f"not measured: {dense}; the semi-structured kernel is not timed ({why})"
        return record
    timing = semi_structured_latency(shrunk, layers, dummy, device)
    timing["model_dense_ms"] = metrics["latency_ms"]  # the model as given: its own dtype, dense kernels
    record["latency"] = timing
    if timing["sparse_ms"] is None:
        record["speedup"] = (
            f"not measured: {dense}; timing the semi-structured kernel failed, {timing['error']}"
        )
        return record
    metrics["latency_ms"], metrics["latency_spread_ms"] = timing["sparse_ms"], timing["sparse_spread_ms"]
    record["speedup"] = (
        f"measured on {timing['device']} ({timing['backend']}, {timing['dtype']}, {len(timing['layers'])} "
        f"layer(s) semi-structured): dense {timing['dense_ms']:.4g} ms, semi-structured {timing['sparse_ms']:.4g} "
        f"ms, {timing['speedup']:.3g}x; the trial's latency is the semi-structured one"
    )
    return record


def save_pruned_model(
    store: ArtifactStore,
    model: Any,
    recipe: Any,
    *,
    entrypoint: str,
    base_algo: str,
    score: float | None,
    patterns: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Store the shrunk model's weights and the recipe that rebuilds its shape; return the artifact id.
    ``patterns`` (see :func:`pattern_layers`) records each N:M layer in the metadata."""
    meta = {
        "format": MODEL_FORMAT,
        "entrypoint": entrypoint,
        "base_algo": base_algo,
        "score": score,
        "recipe": recipe.model_dump(mode="json") if recipe is not None else None,
    }
    if patterns:
        meta["patterns"] = patterns
    return store.put(dict(model.state_dict()), meta)


def load_pruned(task: Task, files: tuple[str, str] | list[str] | dict[str, Any]) -> Any:
    """Rebuild the downloaded pruned model: ``files`` = (weights ``.safetensors``, recipe ``.json``) paths.

    The task's ``model()`` gives the architecture; the recipe removes the same channels; the weights load into it.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from pruning.shrink import ShrinkRecipe, apply_recipe

    weights_path, recipe_path = (files["weights"], files["recipe"]) if isinstance(files, dict) else files
    meta = json.loads(Path(recipe_path).read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{recipe_path} is not a prunehub pruned-model recipe")
    model = task.model()
    if meta.get("recipe"):
        apply_recipe(model, ShrinkRecipe.model_validate(meta["recipe"]), task.dummy_input())
    model.load_state_dict(load_file(str(weights_path)))
    return model


def measure_model(
    model: Any, masks: dict[str, Any], problem: SearchProblem, dummy_input: Any, device: str
) -> tuple[dict[str, Any], Any, Any]:
    """Physical metrics of a masked (stripped) model: shrink a copy for structured masks.

    Returns (metrics, shrunk model or the model itself, recipe or None).
    """
    from pruning.metrics import bookkeeping_threads, count_nonzero, count_params_flops

    pruning = problem.pruning
    with bookkeeping_threads(pruning.dense_flops):
        if pruning.structured:
            from pruning.shrink import shrink

            shrunk = copy.deepcopy(model)
            recipe = shrink(shrunk, masks, dummy_input)
            params, flops = count_params_flops(shrunk, dummy_input)
        else:
            # Fine-grained sparsity leaves dense kernels: FLOPs do not fall, only the non-zeros do.
            shrunk, recipe = model, None
            params = count_nonzero(model)
            _, flops = count_params_flops(model, dummy_input)
    metrics: dict[str, Any] = {
        "params": int(params),
        "flops": int(flops),
        "params_ratio": params / pruning.dense_params if pruning.dense_params else None,
        "flops_ratio": flops / pruning.dense_flops if pruning.dense_flops else None,
    }
    budget = problem.budget
    if problem.resource == "latency" or (budget is not None and budget.resource == "latency"):
        from pruning.projection import latency_stats

        metrics["latency_ms"], metrics["latency_spread_ms"] = latency_stats(shrunk, dummy_input, device)
    return metrics, shrunk, recipe


def measured_budget_ratio(result: Result, problem: SearchProblem) -> float | None:
    """The measured value of the budget's resource over the dense model's (``None`` without a budget)."""
    budget = problem.budget
    if budget is None:
        return None
    if budget.resource == "flops":
        return result.flops_ratio
    if budget.resource == "params":
        return result.params_ratio
    if result.latency_ms is None or not problem.dense_latency_ms:
        return None
    return result.latency_ms / problem.dense_latency_ms


def _check_achieved(pruning: PruningProblem, requested: dict[str, float], achieved: dict[str, float]) -> str | None:
    """A reason when a layer's achieved sparsity is more than one channel/element away from the request."""
    for layer in pruning.layers:
        if layer.name not in requested:
            continue
        unit = pruning.unit(layer.unit)
        if pruning.structured and unit.channels:
            n, what = unit.channels, "channel"
        elif unit.block is not None:
            # Block sparsity prunes whole blocks: the request rounds to a whole number of them.
            n, what = max(1, layer.weight_count // (unit.block[0] * unit.block[1])), "block"
        else:
            n, what = layer.weight_count, "element"
        if abs(requested[layer.name] - achieved.get(layer.name, 0.0)) * n > 1.0 + 1e-6:
            return (
                f"layer {layer.name}: requested sparsity {requested[layer.name]:.4f} but achieved "
                f"{achieved.get(layer.name, 0.0):.4f} (more than one {what})"
            )
    return None


def _prune_finetune_evaluate(task: Task, problem: SearchProblem, job: Job, store: ArtifactStore, device: str) -> Result:
    from pruning.masks import achieved_sparsity, apply_masks, strip
    from pruning.pruner import collected_importance, compute_masks, global_distribution

    pruning = problem.pruning
    # Pruning is monotonic: what the parent removed (`previous`) ranks first and stays removed.
    model, previous = load_checkpoint(task, store, job.parent_artifact)
    importance = collected_importance(model, pruning, task)  # statistics once, for both calls below
    distribution = job.distribution
    extra: dict[str, Any] = {}
    if job.params.get("ranking") == "global":
        # One threshold across all units at the requested overall sparsity: the per-unit split emerges here.
        def ranked(target: float) -> dict[str, float]:
            return global_distribution(model, pruning, target, importance=importance, previous=previous)

        if job.budget_ratio is not None and problem.budget is not None:
            # The global threshold is the one scale: the least overall sparsity whose ranking meets the budget.
            from pruning.budget import fills_slack, project_scalar

            ratio_of = _ratio_predictor(task, problem, model, device)
            capacity = sum(u.weight_count * u.max_sparsity for u in pruning.units) / sum(
                u.weight_count for u in pruning.units
            )
            projection = project_scalar(
                ranked, min(capacity, 0.999), ratio_of, job.budget_ratio, pruning,
                fill=fills_slack(problem.budget) and not previous,  # a parent's removed channels stay removed
            )
            distribution = projection.distribution
            extra["projection"] = {"scale": projection.scale, "predicted_ratio": projection.ratio}
        else:
            distribution = ranked(overall_sparsity(distribution, pruning))
        extra["distribution"] = distribution
    masks = compute_masks(model, pruning, distribution, importance=importance, previous=previous)
    apply_masks(model, masks, structured=pruning.structured)
    if job.finetune_epochs:
        task.fine_tune(model, job.finetune_epochs)
    evaluation: dict[str, Any] = {"finetune_epochs": job.finetune_epochs, "bn_recalibration": False}
    if problem.bn_recalibration:
        from pruning.calibration import recalibrate_batchnorm

        used = recalibrate_batchnorm(model, task, problem.calibration_batches)
        evaluation |= {"bn_recalibration": used > 0, "calibration_batches": used}
    score = task.evaluate(model)
    strip(model)
    requested = layer_distribution(distribution, pruning)
    achieved = achieved_sparsity(masks, pruning)
    dummy = task.dummy_input()
    metrics, shrunk, recipe = measure_model(model, masks, problem, dummy, device)
    if any(u.pattern is not None and distribution.get(u.name, 0.0) > 0 for u in pruning.units):
        # params count the non-zeros; FLOPs stay dense; latency is the semi-structured kernel's where it is timed.
        extra["nm"] = _nm_record(pattern_layers(pruning, distribution), metrics, shrunk, dummy, device)
    spread = metrics.pop("latency_spread_ms", None)
    if spread is not None:
        extra["latency_spread_ms"] = spread
    result = Result(
        key=job.key,
        score=score,
        requested=requested,
        achieved=achieved,
        overall_sparsity=overall_sparsity(distribution, pruning),
        extra=extra,
        evaluation=evaluation,
        **metrics,
    )
    mismatch = _check_achieved(pruning, requested, achieved)
    if mismatch:
        return result.model_copy(update={"status": "failed", "error": mismatch})
    if job.save_artifact:
        checkpoint = save_checkpoint(store, model, masks)
        model_id = save_pruned_model(
            store, shrunk, recipe, entrypoint=task.entrypoint, base_algo=pruning.base_algo, score=score,
            patterns=pattern_layers(pruning, distribution),
        )
        result = result.model_copy(update={"artifact": checkpoint, "extra": {**extra, "model_artifact": model_id}})
    return result


def execute_job(task: Task, problem: SearchProblem, job: Job, store: ArtifactStore, device: str = "cpu") -> Result:
    """Run ``job`` and return its :class:`Result`; failures of the job become a failed result with the reason.

    Errors in the user's code that concern the whole experiment (a missing function) propagate as
    :class:`~pruning.task.TaskError` so the runner can fail the experiment instead of one trial.
    """
    from pruning.task import TaskError

    started = time.perf_counter()
    projected: dict[str, Any] = {}
    try:
        if (
            job.budget_ratio is not None
            and problem.budget is not None
            and job.distribution
            and not job.projected
            and job.params.get("ranking") != "global"
        ):
            # Every candidate meets the budget: project its shape first (global ranking projects its threshold).
            job, projected = _projected(task, problem, job, device)
        if job.kind in ("evaluate", "finetune_and_evaluate"):
            result = _prune_finetune_evaluate(task, problem, job, store, device)
        elif job.kind in EXECUTORS:  # kinds one strategy owns are executed by its module
            module = importlib.import_module(EXECUTORS[job.kind])
            result = module.execute(task, problem, job, store, device)
        else:
            raise JobFailed(f"no executor for job kind {job.kind!r}")
    except TaskError:
        raise
    except Exception as exc:  # the user's trainer/evaluator may raise anything: it fails this trial
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        result = Result(
            key=job.key,
            status="failed",
            error=detail,
            requested=layer_distribution(job.distribution, problem.pruning) if job.distribution else {},
            extra={"traceback": traceback.format_exc(limit=20)},
        )
    if result.score is not None and not math.isfinite(result.score):
        result = result.model_copy(update={"status": "failed", "error": f"score is {result.score}"})
    update: dict[str, Any] = {"duration_s": time.perf_counter() - started}
    if projected:
        update["extra"] = {"distribution": dict(job.distribution), **result.extra, "projection": projected}
    if problem.budget is not None:
        ratio = measured_budget_ratio(result, problem)
        update |= {"budget_ratio": ratio, "feasible": problem.budget.met_by(ratio) if ratio is not None else None}
    return result.model_copy(update=update)


def _ratio_predictor(task: Task, problem: SearchProblem, model: Any, device: str) -> Any:
    from pruning.projection import ratio_predictor

    assert problem.budget is not None
    return ratio_predictor(
        model, problem.pruning, problem.budget, task.dummy_input(), device=device,
        dense_latency_ms=problem.dense_latency_ms,
    )


def _projected(task: Task, problem: SearchProblem, job: Job, device: str) -> tuple[Job, dict[str, Any]]:
    """``job`` with its distribution projected onto ``job.budget_ratio`` (see :func:`pruning.budget.project`)."""
    from pruning.budget import BudgetUnreachable, fills_slack, project

    assert job.budget_ratio is not None
    ratio_of = _ratio_predictor(task, problem, task.model(), device)
    try:
        projection = project(
            job.distribution, problem.pruning, ratio_of, job.budget_ratio, floor=job.floor or None,
            fill=fills_slack(problem.budget),
        )
    except BudgetUnreachable as exc:
        raise JobFailed(str(exc)) from exc
    info = {"scale": projection.scale, "predicted_ratio": projection.ratio, "proposal": dict(job.distribution)}
    return job.model_copy(update={"distribution": projection.distribution}), info


def resolve_problem(task: Task, config: Any, device: str = "cpu") -> SearchProblem:
    """The experiment's :class:`SearchProblem` for a validated algorithm ``config``: the config list resolved on
    the task's model, and with a budget the measurements the projection needs.

    With a budget every unit starts at the one uniform sparsity that meets it (the ``uniform`` baseline), and
    that is the problem's target sparsity, the level the strategies' proposals are rescaled to before each is
    projected exactly onto the budget.
    """
    from pruning.calibration import has_batchnorm
    from pruning.config import resolve_config_list

    model = task.model()
    dummy = task.dummy_input()
    pruning = resolve_config_list(model, list(config.config_list), config.base_algo, dummy)
    recalibrate = config.candidate_eval.bn_recalibration
    if recalibrate is None:
        recalibrate = has_batchnorm(model)
    problem = SearchProblem(
        pruning=pruning,
        optimize_mode=config.optimize_mode,
        # A budget names the resource the experiment is about (NetAdapt reduces it, Pareto fronts plot it).
        resource=config.budget.resource if config.budget is not None else config.resource,
        seed=config.seed,
        max_trials=config.max_trials,
        budget=config.effective_budget,
        bn_recalibration=bool(recalibrate),
        calibration_batches=config.candidate_eval.calibration_batches,
    )
    problem = _owl_prior(task, config, model, problem)
    budget = problem.budget
    if budget is None:
        return problem
    if budget.resource == "latency":
        from pruning.projection import dense_latency

        median, spread = dense_latency(model, dummy, device)
        problem = problem.model_copy(update={"dense_latency_ms": median, "dense_latency_spread_ms": spread})
    if config.budget is None:
        return problem  # NetAdapt's older fields: it reduces step by step to the budget itself
    from pruning.budget import BudgetUnreachable, fills_slack, project
    from pruning.projection import ratio_predictor

    ratio_of = ratio_predictor(model, pruning, budget, dummy, dense_latency_ms=problem.dense_latency_ms, device=device)
    try:
        shape = {u.name: 1.0 for u in pruning.units}
        uniform = project(shape, pruning, ratio_of, budget.ratio, fill=fills_slack(budget))
    except BudgetUnreachable as exc:
        raise ValueError(f"budget {budget.resource}={budget.ratio}: {exc}") from exc
    units = [u.model_copy(update={"initial_sparsity": uniform.distribution[u.name]}) for u in pruning.units]
    pruning = pruning.model_copy(update={"units": units})
    pruning.target_sparsity = overall_sparsity(uniform.distribution, pruning)
    return _owl_prior(task, config, model, problem.model_copy(update={"pruning": pruning}))


def _owl_prior(task: Task, config: Any, model: Any, problem: SearchProblem) -> SearchProblem:
    """With ``prior: "owl"``, every unit starts at its OWL sparsity around the problem's target (the search starts
    from its initial distribution, which this sets)."""
    if getattr(config, "prior", None) != "owl":
        return problem
    from pruning.owl import outlier_ratios, owl_allocation

    pruning = problem.pruning
    allocation = owl_allocation(outlier_ratios(model, pruning, task), pruning, pruning.target_sparsity)
    units = [u.model_copy(update={"initial_sparsity": allocation[u.name]}) for u in pruning.units]
    return problem.model_copy(update={"pruning": pruning.model_copy(update={"units": units})})

