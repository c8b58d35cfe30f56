"""Fixtures for the search tests: the real digits task, its resolved problem, an artifact store, an executor."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pytest

from pruning.search.base import Job, Result, SearchProblem

RealExecute = Callable[[SearchProblem, Job], Result]


def real_problem(task, base_algo: str = "l1", sparsity: float = 0.5, **fields) -> SearchProblem:  # type: ignore[no-untyped-def]
    from pruning.config import resolve_config_list

    config_list = [{"sparsity": sparsity, "op_types": ["Conv2d"]}]
    pruning = resolve_config_list(task.model(), config_list, base_algo, task.dummy_input())
    return SearchProblem(pruning=pruning, **fields)


@pytest.fixture
def make_executor(tmp_path: Path) -> Callable[..., RealExecute]:
    """An executor like the runner's: generic kinds through :func:`pruning.jobs.execute_job`, strategy kinds
    through the module :data:`pruning.search.EXECUTORS` names (until the lead's dispatch lists them all)."""
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import STRATEGY_KINDS, execute_job
    from pruning.search import EXECUTORS

    store = ArtifactStore(tmp_path / "artifacts")

    def factory(task) -> RealExecute:  # type: ignore[no-untyped-def]
        def execute(problem: SearchProblem, job: Job) -> Result:
            if job.kind in EXECUTORS and job.kind not in STRATEGY_KINDS:
                result = importlib.import_module(EXECUTORS[job.kind]).execute(task, problem, job, store, "cpu")
                return result
            return execute_job(task, problem, job, store, "cpu")

        execute.store = store  # type: ignore[attr-defined]
        return execute

    return factory
