"""Pruning schedules (agp, iterative, lottery_ticket) and global ranking on the real digits task.

Small budgets (an epoch is a fraction of a second on two CPU cores); everything is seeded, so runs repeat exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from pruning.config import PruningProblem, overall_sparsity, pruned_count
from pruning.jobs import execute_job, load_checkpoint
from pruning.schedule import agp_sparsity
from pruning.search import make_strategy, state_type
from pruning.search._common import rounding_slack
from pruning.search.base import Result, SearchProblem
from pruning.search.configs import parse_algorithm_config
from pruning.task import Task, TaskError
from tests.pruning.search.conftest import executor, real_problem
from tests.pruning.search.digits_task import PlainDigitsCNN, make_task
from tests.pruning.search.driver import drive

CONV = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]


def init_model() -> torch.nn.Module:
    """The untrained, seeded network (what a lottery ticket rewinds to)."""
    saved = torch.random.get_rng_state()
    torch.manual_seed(11)
    net = PlainDigitsCNN()
    torch.random.set_rng_state(saved)
    return net


def lottery_task(**changes: Any) -> Task:
    return dataclasses.replace(make_task("plain"), init_model=init_model, **changes)


def expected_layers(problem: PruningProblem, distribution: dict[str, float]) -> dict[str, float]:
    """Per layer, the sparsity a unit distribution prunes exactly: whole channels, blocks or elements."""
    out = {}
    for unit in problem.units:
        for member in unit.members:
            if unit.channels is not None:
                out[member] = unit.count(distribution[unit.name]) / unit.channels
            elif unit.block is not None:
                rows, cols = problem.layer(member).weight_shape[:2]
                bh, bw = unit.block
                assert rows % bh == 0 and cols % bw == 0
                blocks = (rows // bh) * (cols // bw)
                out[member] = pruned_count(distribution[unit.name], blocks) / blocks
            else:
                n = problem.layer(member).weight_count
                out[member] = pruned_count(distribution[unit.name], n) / n
    return out


def same_counts(achieved: dict[str, float], expected: dict[str, float]) -> bool:
    """Equal up to float32 rounding: far below one element, channel or block of any layer here."""
    return achieved.keys() == expected.keys() and all(abs(achieved[k] - expected[k]) < 1e-6 for k in expected)


def run_config(name: str, **extra: Any) -> dict[str, Any]:
    return {"algorithm": name, "config_list": CONV, **extra}


# --------------------------------------------------------------------------------------------- configs
def test_ranking_is_validated_against_the_base_algorithm() -> None:
    ok = parse_algorithm_config(run_config("uniform", ranking="global", base_algo="slim"))
    assert ok.ranking == "global"  # type: ignore[attr-defined]
    for algorithm in ("uniform", "agp", "iterative", "lottery_ticket"):
        with pytest.raises(ValidationError) as caught:
            parse_algorithm_config(run_config(algorithm, ranking="global", base_algo="fpgm"))
        assert caught.value.errors()[0]["loc"][-1] == "ranking"
    # searches choose their own distribution: ranking is not one of their fields
    with pytest.raises(ValidationError) as caught:
        parse_algorithm_config(run_config("annealing", ranking="global"))
    assert caught.value.errors()[0]["loc"][-1] == "ranking"


def test_schedule_fields_are_validated() -> None:
    with pytest.raises(ValidationError, match="end_step"):
        parse_algorithm_config(run_config("agp", begin_step=3, end_step=3))
    with pytest.raises(ValidationError, match="target_sparsity"):
        parse_algorithm_config(run_config("agp", initial_sparsity=0.5, target_sparsity=0.2))
    with pytest.raises(ValidationError, match="prune_iterations"):
        parse_algorithm_config(run_config("lottery_ticket", prune_iterations=0))
    with pytest.raises(ValidationError, match="rounds"):
        parse_algorithm_config(run_config("iterative", rounds=0))


def test_agp_steps_are_the_pruning_epochs() -> None:
    from pruning.search.schedules import AGPSearch

    config = parse_algorithm_config(run_config("agp", begin_step=1, end_step=6, frequency=2))
    assert AGPSearch(config).epochs() == [1, 3, 5, 6]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ formulas, exactly


@pytest.mark.slow
@pytest.mark.parametrize("base_algo", ["l1", "level"])
def test_agp_sparsity_after_each_step_is_the_cubic_curve(base_algo: str, store) -> None:  # type: ignore[no-untyped-def]
    task = make_task("plain")
    problem = real_problem(task, base_algo=base_algo)
    config = run_config(
        "agp", base_algo=base_algo, initial_sparsity=0.1, begin_step=1, end_step=4, frequency=2, finetune_epochs=1
    )
    run = drive(config, problem, executor(task, store), check_resume=False)
    assert run.state.done and run.state.best_key == "agp-step2", run.state.stop_reason
    epochs = [1, 3, 4]
    assert [job.context["epoch"] for job in run.jobs] == epochs
    # Training runs until the next pruning epoch, then the final fine-tune; dense training before begin_step.
    assert [job.finetune_epochs for job in run.jobs] == [2, 1, 1]
    assert run.jobs[0].params["pretrain_epochs"] == 1
    for job, t in zip(run.jobs, epochs, strict=True):
        result = run.results[job.key]
        assert result.status == "succeeded", result.error
        want = {u.name: agp_sparsity(t, 0.1, 0.5, 1, 4, 2, 3) for u in problem.pruning.units}
        assert same_counts(result.achieved, expected_layers(problem.pruning, want))
        assert job.context["sparsity"] == pytest.approx(overall_sparsity(want, problem.pruning))
    assert run.results["agp-step2"].extra["model_artifact"]
    decisions = [record.decision for record in run.state.history]  # type: ignore[attr-defined]
    assert decisions == ["step", "step", "final"]


@pytest.mark.slow
def test_iterative_rounds_compound_to_the_target_and_only_add_pruning(store) -> None:  # type: ignore[no-untyped-def]
    task = make_task("plain")
    problem = real_problem(task, base_algo="level")
    run = drive(
        run_config("iterative", base_algo="level", rounds=3, retrain_epochs=1),
        problem,
        executor(task, store),
        check_resume=False,
    )
    assert run.state.best_key == "iterative-round3"
    previous: dict[str, torch.Tensor] = {}
    for r, job in enumerate(run.jobs, start=1):
        result = run.results[job.key]
        assert job.context["round"] == r
        want = {u.name: 1 - (1 - 0.5) ** (r / 3) for u in problem.pruning.units}
        assert same_counts(result.achieved, expected_layers(problem.pruning, want))
        # each round pruned 1 - (1 - s) ** (1 / n) of what remained, and nothing pruned came back
        _, masks = load_checkpoint(task, store, result.artifact)
        for name, mask in masks.items():
            if name in previous:
                assert bool((mask <= previous[name]).all())
                kept_before, kept_now = float(previous[name].sum()), float(mask.sum())
                assert kept_now / kept_before == pytest.approx((1 - 0.5) ** (1 / 3), abs=2 / kept_before)
        previous = masks


@pytest.mark.slow
def test_lottery_rounds_rewind_survivors_to_the_initial_weights(store) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[int, dict[str, torch.Tensor]]] = []
    base = lottery_task()

    def recording_trainer(model, optimizer, criterion, epoch, callback=None):  # type: ignore[no-untyped-def]
        # What the network starts the epoch with (masked weights as the forward pass sees them, and buffers).
        state = {
            f"{name}.weight": module.weight.detach().clone()
            for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), torch.Tensor)
        }
        state.update({name: value.clone() for name, value in model.named_buffers() if "running" in name})
        seen.append((epoch, state))
        base.trainer(model, optimizer, criterion, epoch, callback)  # type: ignore[misc]

    task = dataclasses.replace(base, trainer=recording_trainer)
    problem = real_problem(task, base_algo="level")
    run = drive(
        run_config("lottery_ticket", base_algo="level", prune_iterations=2, epochs=1),
        problem,
        executor(task, store),
        check_resume=False,
    )
    assert [job.context["round"] for job in run.jobs] == [0, 1, 2]
    assert run.state.best_key == "lottery-round2"
    assert len(seen) == 3  # one epoch per round
    initial = init_model()
    init_weights = {
        f"{n}.weight": m.weight.detach()
        for n, m in initial.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    init_buffers = {name: value for name, value in initial.named_buffers() if "running" in name}
    for r, job in enumerate(run.jobs):
        result = run.results[job.key]
        want = {u.name: 1 - (1 - 0.5) ** (r / 2) for u in problem.pruning.units}
        assert same_counts(result.achieved, expected_layers(problem.pruning, want))
        _, masks = load_checkpoint(task, store, result.artifact)
        _, start = seen[r]
        for key, weight in init_weights.items():
            layer = key.rsplit(".", 1)[0]
            mask = masks.get(layer, torch.ones_like(weight))
            # survivors are exactly the initial values; pruned positions are zero
            assert torch.equal(start[key], weight * mask), key
        for key, value in init_buffers.items():
            assert torch.equal(start[key], value), key
    # accuracy per round, as NNI's reproduction plots it
    scores = [run.results[job.key].score for job in run.jobs]
    assert all(score is not None and 0 < score <= 1 for score in scores)


@pytest.mark.slow
def test_lottery_rewind_epoch_rewinds_to_the_weights_after_k_epochs(store) -> None:  # type: ignore[no-untyped-def]
    task = lottery_task()
    problem = real_problem(task, base_algo="l1")
    run = drive(
        run_config("lottery_ticket", prune_iterations=1, epochs=1, rewind_epoch=1),
        problem,
        executor(task, store),
        check_resume=False,
    )
    assert run.state.best_key == "lottery-round1", run.state.stop_reason
    rewind_id = run.results["lottery-round0"].extra["rewind_artifact"]
    assert run.jobs[1].params["rewind"] == rewind_id and run.jobs[1].params["first_epoch"] == 1
    rewound, _ = load_checkpoint(task, store, rewind_id)
    expected = init_model()  # one epoch of the user's trainer from init_model(), independently
    optimizer = task.make_optimizer(expected)
    assert task.trainer is not None
    task.trainer(expected, optimizer, task.make_criterion(), 0)
    for (name, value), (other, want) in zip(rewound.state_dict().items(), expected.state_dict().items(), strict=True):
        assert name == other and torch.equal(value, want), name


def test_lottery_without_init_model_is_a_task_error_naming_it(store) -> None:  # type: ignore[no-untyped-def]
    task = make_task("plain")
    problem = real_problem(task)
    strategy = make_strategy(run_config("lottery_ticket", prune_iterations=1))
    _, jobs = strategy.ask(strategy.start(problem))
    with pytest.raises(TaskError, match="init_model"):
        execute_job(task, problem, jobs[0], store, "cpu")


# -------------------------------------------------------------------------------------------- resuming
SCHEDULES = {
    "agp": run_config("agp", end_step=2, finetune_epochs=1),
    "iterative": run_config("iterative", rounds=2, ranking="global"),
    "lottery_ticket": run_config("lottery_ticket", prune_iterations=2, epochs=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_killed_worker_resumes_between_rounds_with_the_same_history(name: str, store) -> None:  # type: ignore[no-untyped-def]
    task = lottery_task()
    problem = real_problem(task, seed=4)
    execute = executor(task, store)
    config = SCHEDULES[name]
    uninterrupted = drive(config, problem, execute, check_resume=False)

    strategy = make_strategy(config)
    state = strategy.start(problem)
    persisted = state.model_dump_json()
    results: list[Result] = []
    state, jobs = strategy.ask(state)
    results += [execute(problem, job) for job in jobs]
    state = strategy.tell(state, results[-len(jobs) :])
    persisted = state.model_dump_json()  # the runner saves the state after every tell
    state, jobs = strategy.ask(state)  # the worker dies while round 2 runs (before its tell)
    lost = jobs[0].key
    del strategy, state

    strategy = make_strategy(parse_algorithm_config(config))
    state = state_type(config["algorithm"]).model_validate_json(persisted)
    while True:
        state, jobs = strategy.ask(state)
        if not jobs:
            break
        results += [execute(problem, job) for job in jobs]
        state = strategy.tell(state, results[-len(jobs) :])
    assert state.model_dump_json() == uninterrupted.state.model_dump_json()
    assert [r.key for r in results] == [j.key for j in uninterrupted.jobs] and lost in [r.key for r in results]
    assert [r.score for r in results] == [uninterrupted.results[r.key].score for r in results]
    assert state.history == uninterrupted.state.history  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------- global ranking
@pytest.mark.slow
@pytest.mark.parametrize("base_algo", ["level", "l1", "l2", "slim"])
def test_global_ranking_gives_a_non_uniform_distribution_at_the_target(base_algo: str, store) -> None:  # type: ignore[no-untyped-def]
    task = make_task("plain")
    problem = real_problem(task, base_algo=base_algo, sparsity=0.6)
    pruning = problem.pruning
    run = drive(
        run_config(
            "uniform", base_algo=base_algo, ranking="global", config_list=[{"sparsity": 0.6, "op_types": ["Conv2d"]}]
        ),
        problem,
        executor(task, store),
    )
    best = run.results[run.state.best_key]  # type: ignore[index]
    distribution = run.state.best_distribution  # type: ignore[attr-defined]
    assert distribution == best.extra["distribution"]
    assert max(distribution.values()) - min(distribution.values()) > 0.05, distribution  # it emerged
    total = sum(u.weight_count for u in pruning.units)
    tolerance = 1 / total if not pruning.structured else rounding_slack(pruning)
    assert abs(overall_sparsity(distribution, pruning) - 0.6) <= tolerance
    assert best.overall_sparsity == pytest.approx(overall_sparsity(distribution, pruning))
    assert same_counts(best.achieved, expected_layers(pruning, distribution))  # the masks realise it exactly
    if base_algo == "level":
        # one threshold: every pruned weight is at most as large as every kept one, across all layers
        _, masks = load_checkpoint(task, store, best.artifact)
        model = task.model()
        modules = dict(model.named_modules())
        pruned = torch.cat([modules[n].weight.detach().abs()[m == 0] for n, m in masks.items()])
        kept = torch.cat([modules[n].weight.detach().abs()[m != 0] for n, m in masks.items()])
        assert float(pruned.max()) <= float(kept.min())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["agp", "iterative", "lottery_ticket"])
def test_schedules_rank_globally_at_the_formula_overall_sparsity(name: str, store) -> None:  # type: ignore[no-untyped-def]
    task = lottery_task()
    problem = real_problem(task, base_algo="level")
    config = {**SCHEDULES[name], "base_algo": "level", "ranking": "global"}
    run = drive(config, problem, executor(task, store), check_resume=False)
    assert run.state.best_key is not None, run.state.stop_reason
    total = sum(u.weight_count for u in problem.pruning.units)
    for job in run.jobs:
        result = run.results[job.key]
        formula = float(job.params["target"])
        assert abs(result.overall_sparsity - formula) <= 1 / total  # type: ignore[operator]
        assert same_counts(result.achieved, expected_layers(problem.pruning, result.extra["distribution"]))
    final = run.results[run.state.best_key]
    assert abs(final.overall_sparsity - 0.5) <= 1 / total  # type: ignore[operator]
    assert len(set(final.extra["distribution"].values())) > 1


# ------------------------------------------------------------------------------- every base algorithm
@pytest.mark.slow
@pytest.mark.parametrize(
    ("base_algo", "config_list"),
    [
        ("level", CONV),
        ("level", [*CONV, {"sparsity": 0.5, "op_types": ["Linear"], "block_height": 2, "block_width": 4}]),
        ("l1", CONV),
        ("l2", CONV),
        ("fpgm", CONV),
        ("slim", CONV),
        ("taylorfo", CONV),
        ("apoz", CONV),
        ("mean_activation", CONV),
    ],
)
def test_every_base_algorithm_follows_the_schedule(base_algo: str, config_list: list, store) -> None:  # type: ignore[no-untyped-def,type-arg]
    from pruning.config import resolve_config_list

    task = make_task("plain")
    pruning = resolve_config_list(task.model(), config_list, base_algo, task.dummy_input())
    problem = SearchProblem(pruning=pruning)
    config = {
        "algorithm": "iterative",
        "config_list": config_list,
        "base_algo": base_algo,
        "rounds": 2,
        "retrain_epochs": 0,
    }
    run = drive(config, problem, executor(task, store), check_resume=False)
    assert run.state.best_key == "iterative-round2", run.state.stop_reason
    for r, job in enumerate(run.jobs, start=1):
        want = {
            u.name: (1 - (1 - u.initial_sparsity) ** (r / 2)) if r < 2 else u.initial_sparsity for u in pruning.units
        }
        assert same_counts(run.results[job.key].achieved, expected_layers(pruning, want)), (base_algo, r)
    if any(u.block for u in pruning.units):
        _, masks = load_checkpoint(task, store, run.results["iterative-round2"].artifact)
        blocks = masks["fc"].reshape(5, 2, 128, 4).permute(0, 2, 1, 3).reshape(5, 128, 8)
        assert bool((blocks.amin(dim=2) == blocks.amax(dim=2)).all())  # whole blocks go
