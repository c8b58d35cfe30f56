"""The task loader names exactly what is missing or wrongly shaped."""

from __future__ import annotations

import sys
import types

import pytest

from pruning.task import TaskError, check_entrypoint, load_task


def _module(name: str, **attrs: object) -> str:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return name


def test_a_complete_module_loads_with_defaults() -> None:
    task = load_task("examples.digits", ["examples."])
    assert task.trainer is not None and task.fine_tuner is not None and task.init_model is not None
    criterion = task.make_criterion()
    assert type(criterion).__name__ == "CrossEntropyLoss"


def test_missing_required_names_are_named() -> None:
    name = _module("tmp_task_missing", model=lambda: None)
    with pytest.raises(TaskError, match="evaluator, dummy_input"):
        load_task(name)


def test_wrong_arity_is_named() -> None:
    name = _module(
        "tmp_task_arity", model=lambda: None, evaluator=lambda: 1.0, dummy_input=lambda: None
    )
    with pytest.raises(TaskError, match="'evaluator' must accept 1 positional"):
        load_task(name)
    name = _module(
        "tmp_task_trainer",
        model=lambda: None,
        evaluator=lambda m: 1.0,
        dummy_input=lambda: None,
        trainer=lambda model, optimizer: None,
    )
    with pytest.raises(TaskError, match="'trainer' must accept 4"):
        load_task(name)


def test_not_callable_is_named() -> None:
    name = _module("tmp_task_value", model=lambda: None, evaluator=0.5, dummy_input=lambda: None)
    with pytest.raises(TaskError, match="'evaluator' must be callable"):
        load_task(name)


def test_attr_object_and_factory() -> None:
    class Spec:
        @staticmethod
        def model():  # type: ignore[no-untyped-def]
            return "m"

        @staticmethod
        def evaluator(model):  # type: ignore[no-untyped-def]
            return 1.0

        @staticmethod
        def dummy_input():  # type: ignore[no-untyped-def]
            return None

    name = _module("tmp_task_attr", spec=Spec, make=lambda: Spec())
    assert load_task(f"{name}:spec").model() == "m"
    assert load_task(f"{name}:make").model() == "m"
    with pytest.raises(TaskError, match="no attribute 'nope'"):
        load_task(f"{name}:nope")


def test_import_errors_and_allow_list() -> None:
    with pytest.raises(TaskError, match="cannot import task module 'examples.absent'"):
        load_task("examples.absent", ["examples."])
    with pytest.raises(TaskError, match="not allowed"):
        check_entrypoint("os.path", ["examples."])
    with pytest.raises(TaskError, match="not allowed"):
        check_entrypoint("examples_evil", ["examples"])
    check_entrypoint("examples", ["examples"])
    check_entrypoint("examples.digits:task", ["examples"])
    with pytest.raises(TaskError, match="not of the form"):
        check_entrypoint("examples.digits; rm -rf /", ["examples."])


def test_evaluate_rejects_non_numbers() -> None:
    name = _module("tmp_task_nan", model=lambda: None, evaluator=lambda m: float("nan"), dummy_input=lambda: None)
    with pytest.raises(TaskError, match="not a finite number"):
        load_task(name).evaluate(None)
