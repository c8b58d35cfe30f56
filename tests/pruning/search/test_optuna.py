"""The Optuna strategy: resume from our own history, samplers, Pareto front."""

from __future__ import annotations

import logging

from pruning.search import make_strategy
from pruning.search.optuna_search import OptunaState
from tests.pruning.search.driver import drive
from tests.pruning.search.fakes import FakeExecutor, fake_problem

CONFIG_LIST = [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]


def optuna_config(**extra: object) -> dict[str, object]:
    return {"algorithm": "optuna", "config_list": CONFIG_LIST, "num_trials": 12, "n_startup_trials": 3, **extra}


def test_study_resumes_to_the_same_next_proposal() -> None:
    problem = fake_problem(seed=11)
    executor = FakeExecutor()
    strategy = make_strategy(optuna_config())
    state = strategy.start(problem)
    for _ in range(6):  # past TPE's random start
        state, jobs = strategy.ask(state)
        state = strategy.tell(state, [executor(problem, job) for job in jobs])
    saved = state.model_dump_json()
    _, expected = strategy.ask(state)
    _, resumed = make_strategy(optuna_config()).ask(OptunaState.model_validate_json(saved))
    assert resumed == expected


def test_two_objectives_use_nsga2_and_give_a_pareto_front() -> None:
    config = optuna_config(objectives=["score", "flops"], population_size=4)
    strategy = make_strategy(config)
    state = strategy.start(fake_problem())
    study, _ = strategy._study(state, 0)  # type: ignore[attr-defined]
    assert type(study.sampler).__name__ == "NSGAIISampler"
    run = drive(config, fake_problem(), FakeExecutor())
    front = run.state.pareto_keys  # type: ignore[attr-defined]
    assert front and run.state.best_key is not None
    completed = [t for t in run.state.trials if t.state == "complete"]  # type: ignore[attr-defined]
    assert all(len(t.values) == 2 for t in completed)


def test_one_objective_uses_tpe_and_optuna_stays_quiet(caplog) -> None:  # type: ignore[no-untyped-def]
    strategy = make_strategy(optuna_config())
    study, _ = strategy._study(strategy.start(fake_problem()), 0)  # type: ignore[attr-defined]
    assert type(study.sampler).__name__ == "TPESampler"
    with caplog.at_level(logging.INFO, logger="optuna"):
        drive(optuna_config(num_trials=4), fake_problem(), FakeExecutor(), check_resume=False)
    assert not [r for r in caplog.records if r.name.startswith("optuna") and r.levelno <= logging.INFO]


def test_parallel_asks_are_distinct() -> None:
    run = drive(optuna_config(parallelism=4, num_trials=8), fake_problem(), FakeExecutor())
    distributions = [tuple(sorted(j.distribution.items())) for j in run.jobs]
    assert len(set(distributions)) == len(distributions) == 8


def test_first_trial_is_the_uniform_start_and_best_is_never_below_it() -> None:
    from pruning.config import initial_distribution

    problem = fake_problem(seed=5)
    run = drive(optuna_config(num_trials=6), problem, FakeExecutor())
    assert run.jobs[0].distribution == initial_distribution(problem.pruning)
    trials = run.state.trials  # type: ignore[attr-defined]
    uniform_score = trials[0].values[0]
    assert run.state.best_score is not None and run.state.best_score >= uniform_score
