"""A pure-logic stand-in for the job executor: a synthetic problem and a deterministic score of a distribution.

It tests the strategies' logic only (ask/tell, resume, budgets, targets); the real-task tests run the same
contract through :func:`pruning.jobs.execute_job` on a trained network.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from pruning.budget import Budget, fills_slack, project
from pruning.config import PrunableLayer, PruningProblem, PruningUnit, layer_distribution, overall_sparsity
from pruning.search._common import evaluated_distribution
from pruning.search.base import Job, Result, SearchProblem
from pruning.search.netadapt import UNIFORM_MOVE

# (name, output channels, weight count, MACs): a small plain CNN.
_UNITS = [
    ("conv1", 16, 16 * 3 * 9, 16 * 3 * 9 * 256),
    ("conv2", 32, 32 * 16 * 9, 32 * 16 * 9 * 256),
    ("conv3", 32, 32 * 32 * 9, 32 * 32 * 9 * 64),
    ("conv4", 64, 64 * 32 * 9, 64 * 32 * 9 * 64),
    ("fc1", 64, 64 * 256, 64 * 256),
]
# How much each unit's pruning hurts the synthetic score (later layers are more robust).
_SENSITIVITY = {"conv1": 3.0, "conv2": 1.5, "conv3": 1.0, "conv4": 0.6, "fc1": 0.3}


def fake_problem(
    target: float = 0.5,
    structured: bool = True,
    optimize_mode: str = "maximize",
    resource: str = "params",
    seed: int = 0,
    max_trials: int | None = None,
    budget: dict[str, float] | None = None,
) -> SearchProblem:
    """The synthetic problem; with ``budget`` it is set up as the worker's resolution does: every unit starts at
    the uniform sparsity that meets the budget, which is the target sparsity."""
    if budget is not None:
        resource = next(iter(budget))  # as the worker resolves it: a budget names the experiment's resource
    problem = _fake_problem(target, structured, optimize_mode, resource, seed, max_trials)
    if budget is None:
        return problem
    problem = problem.model_copy(update={"budget": Budget.model_validate(budget)})
    if problem.budget is not None and problem.budget.resource == "latency":
        problem = problem.model_copy(update={"dense_latency_ms": problem.pruning.dense_flops / 1e5})
    executor = FakeExecutor()
    assert problem.budget is not None
    uniform = project(
        {u.name: 1.0 for u in problem.pruning.units},
        problem.pruning,
        lambda d: executor.ratio(problem, d),
        problem.budget.ratio,
        fill=fills_slack(problem.budget),
    ).distribution
    units = [u.model_copy(update={"initial_sparsity": uniform[u.name]}) for u in problem.pruning.units]
    pruning = problem.pruning.model_copy(update={"units": units})
    pruning.target_sparsity = overall_sparsity(uniform, pruning)
    return problem.model_copy(update={"pruning": pruning})


def _fake_problem(
    target: float,
    structured: bool,
    optimize_mode: str,
    resource: str,
    seed: int,
    max_trials: int | None,
) -> SearchProblem:
    layers = [
        PrunableLayer(
            name=name,
            op_type="Linear" if name.startswith("fc") else "Conv2d",
            weight_shape=[channels, weights // channels],
            weight_count=weights,
            params=weights + channels,
            flops=flops,
            unit=name,
        )
        for name, channels, weights, flops in _UNITS
    ]
    units = [
        PruningUnit(
            name=name,
            members=[name],
            channels=channels if structured else None,
            weight_count=weights,
            initial_sparsity=target,
        )
        for name, channels, weights, _ in _UNITS
    ]
    dense_params = sum(layer.params for layer in layers) + 650
    dense_flops = sum(layer.flops for layer in layers)
    pruning = PruningProblem(
        base_algo="l1" if structured else "level",
        structured=structured,
        layers=layers,
        units=units,
        target_sparsity=target,
        dense_params=dense_params,
        dense_flops=dense_flops,
    )
    return SearchProblem(
        pruning=pruning, optimize_mode=optimize_mode, resource=resource, seed=seed, max_trials=max_trials
    )  # type: ignore[arg-type]


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class FakeExecutor:
    """Deterministic results: ``score = scale * quality + offset`` (``quality`` in about [0, 1]), or the
    negated quality times ``scale`` for ``minimize`` problems (a loss)."""

    scale: float = 1.0
    offset: float = 0.0
    calls: list[Job] = field(default_factory=list)
    admm_iterations: dict[str, int] = field(default_factory=dict)

    def quality(self, distribution: dict[str, float], finetune_epochs: int) -> float:
        damage = sum(_SENSITIVITY[name] * s**2 for name, s in distribution.items())
        # A wavy term so the landscape has local structure, and fine-tuning helps a little.
        wave = 0.02 * sum(math.sin(7.0 * s + i) for i, s in enumerate(distribution.values()))
        return 1.0 - 0.25 * damage + wave + 0.01 * min(finetune_epochs, 3)

    def measure(self, problem: SearchProblem, distribution: dict[str, float]) -> dict[str, Any]:
        pruning = problem.pruning
        kept = {
            u.name: 1.0 - u.count(distribution[u.name]) / u.channels if u.channels else 1.0 - distribution[u.name]
            for u in pruning.units
        }
        params = pruning.dense_params - sum(layer.params * (1.0 - kept[layer.unit]) for layer in pruning.layers)
        flops = sum(layer.flops * kept[layer.unit] for layer in pruning.layers)
        return {
            "params": int(params),
            "flops": int(flops),
            "params_ratio": params / pruning.dense_params,
            "flops_ratio": flops / pruning.dense_flops,
            "latency_ms": flops / 1e5,
        }

    def achieved(self, problem: SearchProblem, distribution: dict[str, float]) -> dict[str, float]:
        out = {}
        for unit in problem.pruning.units:
            value = distribution[unit.name]
            out[unit.name] = unit.count(value) / unit.channels if unit.channels else value
        return out

    def ratio(self, problem: SearchProblem, distribution: dict[str, float]) -> float:
        """The budget's resource of ``distribution`` over the dense value (what the executor's predictor gives)."""
        assert problem.budget is not None
        metrics = self.measure(problem, distribution)
        if problem.budget.resource == "latency":
            return float(metrics["latency_ms"]) / (problem.pruning.dense_flops / 1e5)
        return float(metrics[f"{problem.budget.resource}_ratio"])

    def __call__(self, problem: SearchProblem, job: Job) -> Result:
        # The executor's budget rule, with the closed-form predictor: project, run, report the measured ratio.
        projection = None
        if job.budget_ratio is not None and problem.budget is not None and job.distribution and not job.projected:
            projection = project(
                job.distribution,
                problem.pruning,
                lambda d: self.ratio(problem, d),
                job.budget_ratio,
                job.floor or None,
                fill=fills_slack(problem.budget),
            )
            job = job.model_copy(update={"distribution": projection.distribution})
        result = self._run(problem, job)
        if projection is not None:
            result = result.model_copy(update={"extra": {"distribution": projection.distribution, **result.extra}})
        if problem.budget is not None and result.status == "succeeded" and job.distribution:
            ratio = self.ratio(problem, evaluated_distribution(result, job))
            result = result.model_copy(update={"budget_ratio": ratio, "feasible": problem.budget.met_by(ratio)})
        return result

    def _run(self, problem: SearchProblem, job: Job) -> Result:
        self.calls.append(job)
        sign = 1.0 if problem.optimize_mode == "maximize" else -1.0
        if job.kind in ("evaluate", "finetune_and_evaluate"):
            return self._evaluated(problem, job, sign, artifact=_hex(job.key) if job.save_artifact else None)
        if job.kind == "admm_train":
            return Result(
                key=job.key,
                artifact=_hex(job.key),
                extra={
                    "z": _hex(job.key + "z"),
                    "u": _hex(job.key + "u"),
                    "primal_residual": 1.0 / (1 + int(job.context["iteration"])),
                },
            )
        if job.kind == "netadapt_candidate":
            return self._netadapt(problem, job, sign)
        if job.kind in ("agp_step", "iterative_round", "lottery_round"):
            # A schedule step: the nominal distribution stands in for a global ranking's.
            extra: dict[str, Any] = {"distribution": dict(job.distribution)}
            if job.params.get("save_rewind"):
                extra["rewind_artifact"] = _hex(job.key + "rewind")
            if job.save_artifact:
                extra["model_artifact"] = _hex(job.key + "model")
            return self._evaluated(problem, job, sign, artifact=_hex(job.key), extra=extra)
        raise AssertionError(f"unexpected job kind {job.kind}")

    def _evaluated(
        self, problem: SearchProblem, job: Job, sign: float, artifact: str | None, extra: dict[str, Any] | None = None
    ) -> Result:
        """The result of pruning to ``job.distribution`` exactly, fine-tuning and evaluating."""
        return Result(
            key=job.key,
            score=sign * self.scale * self.quality(job.distribution, job.finetune_epochs) + self.offset,
            requested=layer_distribution(job.distribution, problem.pruning),
            achieved=self.achieved(problem, job.distribution),
            overall_sparsity=overall_sparsity(job.distribution, problem.pruning),
            artifact=artifact,
            extra=extra or {},
            **self.measure(problem, job.distribution),
        )

    def _netadapt(self, problem: SearchProblem, job: Job, sign: float) -> Result:
        target = float(job.params["target_resource"])
        if job.params["unit"] == UNIFORM_MOVE:
            candidates = [self._flat_step(problem, job.distribution, i / 100) for i in range(1, 101)]
        else:
            unit = problem.pruning.unit(job.params["unit"])
            assert unit.channels is not None
            low = unit.count(job.distribution[unit.name]) + 1
            high = min(unit.count(unit.max_sparsity), unit.channels - 1)
            candidates = [{**job.distribution, unit.name: count / unit.channels} for count in range(low, high + 1)]
        for distribution in candidates:
            metrics = self.measure(problem, distribution)
            value = metrics["latency_ms"] if problem.resource == "latency" else metrics[problem.resource]
            if value <= target:
                quality = self.quality(distribution, job.finetune_epochs)
                return Result(
                    key=job.key,
                    score=sign * self.scale * quality + self.offset,
                    achieved=self.achieved(problem, distribution),
                    overall_sparsity=overall_sparsity(distribution, problem.pruning),
                    artifact=_hex(job.key),
                    extra={"distribution": distribution, "reached": True},
                    **metrics,
                )
        return Result(key=job.key, status="failed", error=f"unit {job.params['unit']} cannot reach {target}")

    @staticmethod
    def _flat_step(problem: SearchProblem, parent: dict[str, float], fraction: float) -> dict[str, float]:
        """NetAdapt's uniform move: every unit loses ``fraction`` of what it has left, keeping one channel."""
        out = {}
        for unit in problem.pruning.units:
            assert unit.channels is not None
            bound = min(unit.count(unit.max_sparsity), unit.channels - 1) / unit.channels
            out[unit.name] = min(parent[unit.name] + (1.0 - parent[unit.name]) * fraction, bound)
        return out


def within_one_channel_of_uniform(distribution: dict[str, float], pruning: PruningProblem) -> bool:
    """Whether every structured unit is within one channel of one common sparsity (uniform-at-budget after its
    projection spends the rounding slack, one channel per unit at most): the common level is the largest value,
    the units that got no channel back sit at it."""
    level = max(distribution.values())
    units = {u.name: u for u in pruning.units}
    for name, value in distribution.items():
        channels = units[name].channels
        if channels is None:
            if abs(value - level) > 1e-6:
                return False
        elif abs(round(value * channels) - round(level * channels)) > 1:
            return False
    return True
