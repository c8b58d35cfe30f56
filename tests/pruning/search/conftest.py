"""Fixtures for the search tests: the real digits task, its resolved problem, an artifact store, an executor."""

from __future__ import annotations

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


def executor(task, store) -> RealExecute:  # type: ignore[no-untyped-def]
    """An executor like the runner's: every job kind through :func:`pruning.jobs.execute_job`."""
    from pruning.jobs import execute_job

    def execute(problem: SearchProblem, job: Job) -> Result:
        return execute_job(task, problem, job, store, "cpu")

    execute.store = store  # type: ignore[attr-defined]
    return execute


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    from pruning.artifacts import ArtifactStore

    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def make_executor(store) -> Callable[..., RealExecute]:  # type: ignore[no-untyped-def]
    """:func:`executor` of a task on this test's artifact store (``execute.store``)."""
    return lambda task: executor(task, store)
