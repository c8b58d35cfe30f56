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


_TASK_SOURCE = """
import functools
from pathlib import Path
from os.path import join

calls = []


class Spec:
    @staticmethod
    def model():
        return "m"

    @staticmethod
    def evaluator(model):
        return 1.0

    @staticmethod
    def dummy_input():
        return None


spec = Spec
instance = Spec()


def make():
    calls.append("make")
    return Spec()


def make_nothing():
    calls.append("make_nothing")
    return 42


def needs_args(size):
    calls.append("needs_args")
    return Spec()


def _private():
    calls.append("_private")
    return Spec()


alias = _private
cache = functools.lru_cache
builtin = print
"""


@pytest.fixture
def task_module(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A real task module file (factories are checked against the module that defines them)."""
    (tmp_path / "tmptasks").mkdir()
    (tmp_path / "tmptasks" / "__init__.py").write_text("")
    (tmp_path / "tmptasks" / "spec.py").write_text(_TASK_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tmptasks.spec"
    for name in ("tmptasks.spec", "tmptasks"):
        sys.modules.pop(name, None)


def test_attr_object_and_factory(task_module: str) -> None:
    assert load_task(f"{task_module}:spec").model() == "m"
    assert load_task(f"{task_module}:instance").model() == "m"
    assert load_task(f"{task_module}:make").model() == "m"
    assert sys.modules[task_module].calls == ["make"]
    with pytest.raises(TaskError, match="no attribute 'nope'"):
        load_task(f"{task_module}:nope")


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("Path", "'Path' of 'tmptasks.spec:Path' is a class"),
        ("cache", "'cache' of 'tmptasks.spec:cache' is a function imported from 'functools'"),
        ("builtin", "'builtin' of 'tmptasks.spec:builtin' is a builtin_function_or_method, neither an object"),
        ("join", "'join' of 'tmptasks.spec:join' is a function imported from 'posixpath'"),
        ("alias", "'alias' of 'tmptasks.spec:alias' is the private function '_private'"),
        ("needs_args", "'needs_args' of 'tmptasks.spec:needs_args' needs argument\\(s\\) size"),
        ("calls", "'calls' of 'tmptasks.spec:calls' is a list"),
        ("_private", "attribute '_private' is private"),
        ("__class__", "attribute '__class__' is private"),
    ],
)
def test_only_task_objects_and_public_module_factories_are_called(task_module: str, attr: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_task(f"{task_module}:{attr}")
    # Refused before anything was called (a private name before the module is even imported).
    assert task_module not in sys.modules or sys.modules[task_module].calls == []


def test_a_factory_that_returns_no_task_is_named(task_module: str) -> None:
    with pytest.raises(TaskError, match="'tmptasks.spec:make_nothing' returned a int without the task name"):
        load_task(f"{task_module}:make_nothing")


def test_the_shipped_example_private_helpers_are_refused() -> None:
    with pytest.raises(TaskError, match="'_train_dense' is private"):
        load_task("examples.digits:_train_dense", ["examples."])
    with pytest.raises(TaskError, match="'_train_dense' is private"):
        check_entrypoint("examples.digits:_train_dense", ["examples."])
    with pytest.raises(TaskError, match="not of the form"):
        check_entrypoint("examples.digits\n", ["examples."])  # "$" matched before a trailing newline


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
