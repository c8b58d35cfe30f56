"""Drive a strategy through ask/tell like the runner does, checking the protocol's contract at every step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pruning.search import make_strategy
from pruning.search.base import Job, Result, SearchProblem, SearchState

Execute = Callable[[SearchProblem, Job], Result]


@dataclass
class Run:
    state: SearchState
    jobs: list[Job] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    states: list[str] = field(default_factory=list)  # JSON after every tell


def drive(
    config: dict[str, Any], problem: SearchProblem, execute: Execute, *, check_resume: bool = True, max_steps: int = 500
) -> Run:
    """Run ``config``'s strategy to completion. With ``check_resume``, at every step a *fresh* strategy continues
    from the state reloaded from JSON and must ask exactly the same jobs and reach exactly the same state."""
    strategy = make_strategy(config)
    state = strategy.start(problem)
    state_cls = type(state)
    run = Run(state=state)
    for _ in range(max_steps):
        text = state.model_dump_json()
        reloaded = state_cls.model_validate_json(text)
        assert reloaded.model_dump() == state.model_dump(), "state JSON round trip lost information"
        state, jobs = strategy.ask(state)
        if check_resume:
            fresh_state, fresh_jobs = make_strategy(config).ask(reloaded)
            assert fresh_jobs == jobs, "a fresh strategy from the reloaded state asked different jobs"
            assert fresh_state.model_dump_json() == state.model_dump_json()
        if not jobs:
            assert state.done, "no jobs but not done"
            break
        assert len({job.key for job in jobs}) == len(jobs)
        # Asking again before telling replays the same jobs (a runner that crashed between ask and tell).
        # (uniform, the lead's baseline, finishes on a second ask instead.)
        if config["algorithm"] != "uniform":
            again_state, again = strategy.ask(state)
            assert again == jobs and again_state.model_dump_json() == state.model_dump_json()
        results = [execute(problem, job) for job in jobs]
        run.jobs.extend(jobs)
        run.results.update({r.key: r for r in results})
        told = strategy.tell(state, results)
        if check_resume:
            after_ask = state_cls.model_validate_json(state.model_dump_json())
            fresh_told = make_strategy(config).tell(after_ask, results)
            assert fresh_told.model_dump_json() == told.model_dump_json()
        state = told
        run.states.append(state.model_dump_json())
    else:
        raise AssertionError("strategy did not finish")
    run.state = state
    return run


def best_distribution(state: SearchState) -> dict[str, float] | None:
    value = getattr(state, "best_distribution", None)
    if value is None and hasattr(state, "distribution") and state.best_key is not None:
        value = state.distribution  # uniform
    return value
