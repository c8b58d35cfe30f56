"""The user's task module: the contract between prunehub and the user's own code.

An entrypoint is ``"pkg.module"`` (a module defining the names below) or ``"pkg.module:attr"`` (an object with
these attributes, or a public zero-argument function defined in that module that returns one; a class, a builtin,
an imported function or a private name is refused before anything is called). The names are NNI's, so NNI users
bring their code unchanged:

``model() -> nn.Module``
    The pretrained model, a fresh copy on every call.
``evaluator(model) -> float``
    Higher is better unless the experiment says ``optimize_mode: minimize``.
``dummy_input() -> Tensor | tuple``
    Used for tracing, FLOPs, shrinking and latency.
``trainer(model, optimizer, criterion, epoch, callback=None)``
    One epoch of training. Calls ``callback()`` between ``loss.backward()`` and ``optimizer.step()`` when given
    (ADMM adds its proximal gradient there). Needed by ADMM, AutoCompress, taylorfo and fine-tuning.
``fine_tuner(model, epochs=1)`` (optional)
    NNI's short-term fine-tuner. Default: ``epochs`` calls of ``trainer`` with a fresh optimizer.
``optimizer(model) -> Optimizer`` (optional)
    Default: SGD, lr 0.01, momentum 0.9. Rebuilt for every training call because the model may have shrunk.
``criterion`` (optional)
    A loss module or a zero-argument factory of one. Default: ``CrossEntropyLoss``.
``init_model() -> nn.Module`` (optional)
    The untrained, seeded network (lottery tickets rewind to it).
``calibration_data() -> Iterable`` (optional)
    Model inputs (tensors or tuples, as ``dummy_input`` returns) for re-estimating BatchNorm statistics before a
    candidate is scored. Without it the ``trainer`` runs with an optimizer that never steps, stopped after the
    configured number of batches.

Example::

    # mypkg/mytask.py
    def model(): ...
    def evaluator(model): return accuracy
    def dummy_input(): return torch.zeros(1, 3, 32, 32)
    def trainer(model, optimizer, criterion, epoch, callback=None): ...

    task = load_task("mypkg.mytask", allowed_prefixes=["mypkg."])

The worker calls :func:`load_task` in the process that runs the user's code; the API only calls
:func:`check_entrypoint` (a string check, no import).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["REQUIRED_NAMES", "Task", "TaskError", "check_entrypoint", "load_task"]

REQUIRED_NAMES = ("model", "evaluator", "dummy_input")
OPTIONAL_NAMES = ("trainer", "fine_tuner", "optimizer", "criterion", "init_model", "calibration_data")

# Positional parameters each callable must accept (name, minimum positional arity).
_ARITY = {
    "model": 0,
    "evaluator": 1,
    "dummy_input": 0,
    "trainer": 4,
    "fine_tuner": 1,
    "optimizer": 1,
    "init_model": 0,
    "calibration_data": 0,
}

# Always used with fullmatch: a "$" anchor would accept a trailing newline.
_ENTRYPOINT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?")


class TaskError(ValueError):
    """The user's task module is missing a name, has one of the wrong shape, or is not allowed."""


def _check_form(entrypoint: str) -> None:
    if not _ENTRYPOINT.fullmatch(entrypoint):
        raise TaskError(f"entrypoint {entrypoint!r} is not of the form 'package.module' or 'package.module:attr'")
    _, _, attr = entrypoint.partition(":")
    if attr.startswith("_"):
        # Private names (and dunders such as __class__) are never a task: they reach arbitrary callables.
        raise TaskError(
            f"entrypoint {entrypoint!r}: attribute {attr!r} is private; name a public task object or factory"
        )


def check_entrypoint(entrypoint: str, allowed_prefixes: Sequence[str]) -> None:
    """Validate the form of ``entrypoint`` and that its module is under one of ``allowed_prefixes``.

    The attribute of ``module:attr`` must be public (no leading underscore). A prefix ``"examples."`` allows
    ``examples.digits``; a prefix without a trailing dot allows the module
    itself and everything below it (``"examples"`` allows ``examples`` and ``examples.digits``, not
    ``examples_evil``). An empty allow-list allows nothing.
    """
    _check_form(entrypoint)
    module = entrypoint.split(":", 1)[0]
    for prefix in allowed_prefixes:
        if prefix.endswith("."):
            if module.startswith(prefix):
                return
        elif module == prefix or module.startswith(prefix + "."):
            return
    raise TaskError(
        f"entrypoint {entrypoint!r} is not allowed: its module must start with one of "
        f"{list(allowed_prefixes)} (PRUNEHUB_ALLOWED_ENTRYPOINTS)"
    )


def _accepts_positional(func: Callable[..., Any], count: int) -> bool:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return True
    positional = 0
    for param in signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    required = sum(
        1
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    return positional >= count and required <= count


@dataclass(frozen=True)
class Task:
    """A loaded, checked task module. Optional names are ``None`` when the module does not define them."""

    entrypoint: str
    model: Callable[[], Any]
    evaluator: Callable[[Any], float]
    dummy_input: Callable[[], Any]
    trainer: Callable[..., Any] | None = None
    fine_tuner: Callable[..., Any] | None = None
    optimizer: Callable[[Any], Any] | None = None
    criterion: Any | None = None
    init_model: Callable[[], Any] | None = None
    calibration_data: Callable[[], Any] | None = None  # an iterable of model inputs (BatchNorm re-estimation)

    def require(self, name: str, needed_by: str) -> Callable[..., Any]:
        """Return the optional callable ``name`` or raise a :class:`TaskError` saying who needs it."""
        value = getattr(self, name)
        if value is None:
            raise TaskError(f"task {self.entrypoint!r} has no {name!r}, which {needed_by} needs")
        return value  # type: ignore[no-any-return]

    def make_optimizer(self, model: Any) -> Any:
        """A fresh optimizer for ``model`` (the user's factory, or SGD lr 0.01 momentum 0.9)."""
        if self.optimizer is not None:
            return self.optimizer(model)
        import torch

        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def make_criterion(self) -> Any:
        """The user's loss (a module, or a factory of one), or ``CrossEntropyLoss``."""
        import torch

        if self.criterion is None:
            return torch.nn.CrossEntropyLoss()
        if isinstance(self.criterion, torch.nn.Module):
            return self.criterion
        if callable(self.criterion):
            # A loss class or factory is called with no argument; a plain loss function is used as is.
            try:
                made = self.criterion()
            except TypeError:
                return self.criterion
            return made
        raise TaskError(f"task {self.entrypoint!r}: 'criterion' must be a loss module or a factory of one")

    def fine_tune(self, model: Any, epochs: int) -> None:
        """``epochs`` epochs of the user's fine-tuner, or of ``trainer`` with a fresh optimizer per call."""
        if epochs <= 0:
            return
        if self.fine_tuner is not None:
            self.fine_tuner(model, epochs=epochs)
            return
        trainer = self.require("trainer", "fine-tuning")
        optimizer = self.make_optimizer(model)
        criterion = self.make_criterion()
        for epoch in range(epochs):
            trainer(model, optimizer, criterion, epoch)

    def evaluate(self, model: Any) -> float:
        """Call the user's evaluator and check it returned a finite number."""
        import math

        value = self.evaluator(model)
        try:
            score = float(value)
        except (TypeError, ValueError) as exc:
            raise TaskError(f"evaluator of {self.entrypoint!r} returned {value!r}, not a number") from exc
        if not math.isfinite(score):
            raise TaskError(f"evaluator of {self.entrypoint!r} returned {score}, not a finite number")
        return score


def _task_factory(module: Any, attr: str, value: Any) -> Callable[[], Any]:
    """``value`` if it may be called as the task factory ``module:attr``, else a :class:`TaskError` naming it.

    Only a public function defined in the module itself qualifies: not a class (``:Path`` would construct
    anything), not a builtin or a wrapper (``:lru_cache``), not a function imported from elsewhere, not one whose
    own name is private; and it must take no required argument. Nothing is called before this check.
    """
    where = f"{module.__name__}:{attr}"
    if inspect.isclass(value):
        raise TaskError(
            f"task attribute {attr!r} of {where!r} is a class without the task names; name a task "
            "object or a factory function"
        )
    if not inspect.isfunction(value):
        raise TaskError(
            f"task attribute {attr!r} of {where!r} is a {type(value).__name__}, neither an object "
            f"with the task names ({', '.join(REQUIRED_NAMES)}) nor a factory function"
        )
    if value.__module__ != module.__name__:
        raise TaskError(
            f"task attribute {attr!r} of {where!r} is a function imported from {value.__module__!r}; "
            "a task factory must be defined in the task module"
        )
    if value.__name__.startswith("_"):
        raise TaskError(f"task attribute {attr!r} of {where!r} is the private function {value.__name__!r}")
    required = [
        p.name
        for p in inspect.signature(value).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        raise TaskError(
            f"task factory {attr!r} of {where!r} needs argument(s) {', '.join(required)}; a factory takes none"
        )
    return value  # type: ignore[no-any-return]


def load_task(entrypoint: str, allowed_prefixes: Sequence[str] | None = None) -> Task:
    """Import ``entrypoint`` and return its checked :class:`Task`.

    Raises :class:`TaskError` naming the missing or wrongly shaped name; import errors in the user's module
    surface as a :class:`TaskError` with the original message.
    """
    if allowed_prefixes is not None:
        check_entrypoint(entrypoint, allowed_prefixes)
    else:
        _check_form(entrypoint)
    module_name, _, attr = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's import-time code may raise anything
        raise TaskError(f"cannot import task module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    source: Any = module
    if attr:
        if not hasattr(module, attr):
            raise TaskError(f"task module {module_name!r} has no attribute {attr!r}")
        source = getattr(module, attr)
        if not all(hasattr(source, name) for name in REQUIRED_NAMES):
            factory = _task_factory(module, attr, source)
            try:
                source = factory()
            except Exception as exc:
                raise TaskError(f"task factory {entrypoint!r} raised {type(exc).__name__}: {exc}") from exc
            if not all(hasattr(source, name) for name in REQUIRED_NAMES):
                absent = ", ".join(name for name in REQUIRED_NAMES if not hasattr(source, name))
                raise TaskError(
                    f"task factory {entrypoint!r} returned a {type(source).__name__} without the task name(s) {absent}"
                )
    values: dict[str, Any] = {}
    missing = [name for name in REQUIRED_NAMES if getattr(source, name, None) is None]
    if missing:
        raise TaskError(f"task {entrypoint!r} is missing required name(s): {', '.join(missing)}")
    for name in REQUIRED_NAMES + OPTIONAL_NAMES:
        value = getattr(source, name, None)
        if value is None:
            continue
        if name != "criterion":
            if not callable(value):
                raise TaskError(f"task {entrypoint!r}: {name!r} must be callable, got {type(value).__name__}")
            if not _accepts_positional(value, _ARITY[name]):
                raise TaskError(
                    f"task {entrypoint!r}: {name!r} must accept {_ARITY[name]} positional argument(s) "
                    f"(see the task contract)"
                )
        values[name] = value
    return Task(entrypoint=entrypoint, **values)
