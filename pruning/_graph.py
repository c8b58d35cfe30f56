"""Channel coupling from Torch-Pruning's dependency graph (internal).

Torch-Pruning yields one group per *root* layer, and which group absorbs a shared layer depends on
trace order (two concatenated branches each get a group that contains the consumer). We instead union
output channels across every root's group, so a set of coupled layers always becomes exactly one
unit whatever the order, with a channel numbering shared by all its members.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

MASKABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, _BatchNorm)
ROOTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Torch-Pruning's placeholder ops: they carry channels through but hold no weights to mask.
_PASS_THROUGH = (
    tp.ops._ElementWiseOp,
    tp.ops._ConcatOp,
    tp.ops._SplitOp,
    tp.ops._ReshapeOp,
    tp.ops._SliceOp,
    tp.ops._UnbindOp,
    tp.ops._ExpandOp,
)


DEFAULT_TRACE_TIMEOUT_S = 60.0
TRACE_TIMEOUT_ENV = "PRUNEHUB_TRACE_TIMEOUT_S"


class TraceTimeout(TimeoutError):
    """Tracing a model did not finish within its time limit; the message names the model and the step."""


class _Expired(BaseException):
    # BaseException: an `except Exception` in the user's forward must not swallow the deadline.
    pass


def trace_timeout_s(seconds: float | None = None) -> float:
    """The trace time limit: `seconds` when given, else ``$PRUNEHUB_TRACE_TIMEOUT_S``, else 60 s (0 = none)."""
    if seconds is not None:
        return float(seconds)
    raw = os.environ.get(TRACE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TRACE_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{TRACE_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


_active = threading.local()


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    # CPython delivers it at the thread's next bytecode boundary; None cancels one still pending.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class _Deadlines:
    """One daemon thread per process that calls each armed deadline's callback when it passes. A trace per job
    used to start a ``threading.Timer`` of its own, and starting a thread waits until it is scheduled: on a loaded
    machine that was milliseconds per trace. Arming and disarming only take a lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._next = 0
        self._pid: int | None = None  # the thread does not survive a fork: started again in the child

    def arm(self, seconds: float, fire: Callable[[], None]) -> int:
        import time

        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="trace-deadlines", daemon=True).start()
            self._next += 1
            self._armed[self._next] = (time.monotonic() + seconds, fire)
            self._cond.notify()
            return self._next

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        import time

        while True:
            with self._cond:
                now = time.monotonic()
                due = [t for t, (at, _) in self._armed.items() if at <= now]
                fires = [self._armed.pop(t)[1] for t in due]
                if not fires:
                    soonest = min((at for at, _ in self._armed.values()), default=None)
                    self._cond.wait(None if soonest is None else soonest - now)
                    continue
            for fire in fires:
                fire()


_deadlines = _Deadlines()


@contextlib.contextmanager
def time_limit(seconds: float, describe: Callable[[], str]) -> Iterator[None]:
    """Raise `TraceTimeout` in this thread when the block runs past `seconds` (``<= 0``: no limit).

    Torch-Pruning's graph walk is Python code that can run for minutes on a model it does not understand, so
    the deadline is delivered asynchronously into the tracing thread (any thread, unlike SIGALRM) and checked
    between bytecodes. `describe()` says what was being traced when time ran out. Nested limits defer to the
    outermost one.
    """
    if seconds <= 0 or getattr(_active, "on", False):
        yield
        return
    thread_id = threading.get_ident()
    lock = threading.Lock()
    state = {"armed": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["armed"]:
                state["fired"] = True
                _raise_in(thread_id, _Expired)

    token: int | None = None
    _active.on = True
    try:
        try:
            token = _deadlines.arm(seconds, fire)
            yield
        finally:
            with lock:
                state["armed"] = False
                if state["fired"]:
                    _raise_in(thread_id, None)
            if token is not None:
                _deadlines.disarm(token)
            _active.on = False
    except _Expired:
        raise TraceTimeout(
            f"{describe()} did not finish within {seconds:g} s; raise the limit with trace_timeout_s or "
            f"${TRACE_TIMEOUT_ENV}, or select layers it can handle"
        ) from None
    if state["fired"]:  # the deadline passed as the block ended: it did not finish in time either
        raise TraceTimeout(f"{describe()} did not finish within {seconds:g} s")


def run_model(model: nn.Module, dummy_input: Any) -> Any:
    """Call `model` on a dummy input: a tuple/list is unpacked into positional arguments."""
    if isinstance(dummy_input, (tuple, list)):
        return model(*dummy_input)
    return model(dummy_input)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without mask parametrizations (zeros in place), safe to trace and to modify."""
    from pruning.masks import strip

    return strip(copy.deepcopy(model))


def out_dim_size(module: nn.Module) -> int:
    """Number of output channels of a maskable module."""
    if isinstance(module, _BatchNorm):
        return int(module.num_features)
    weight = module.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[0])


@dataclass
class Graph:
    """A dependency graph plus what we need to know about the model's outputs."""

    dg: tp.DependencyGraph
    names: dict[nn.Module, str]
    output_fns: set[Any]


def build(model: nn.Module, dummy_input: Any) -> Graph:
    """Trace `model` (restoring its train/eval mode) into a Torch-Pruning dependency graph."""
    captured: list[Any] = []

    def capture(out: Any) -> Any:
        captured.append(out)
        return out

    was_training = model.training
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=dummy_input,
                forward_fn=run_model,
                output_transform=capture,
                verbose=False,
            )
    finally:
        model.train(was_training)
    output_fns = {t.grad_fn for t in tp.utils.flatten_as_list(captured) if isinstance(t, Tensor)}
    names = {m: n for n, m in model.named_modules()}
    return Graph(dg=dg, names=names, output_fns=output_fns)


@dataclass
class OutItem:
    """One maskable layer whose output channels a root's pruning removes."""

    name: str
    idxs: list[int]
    root_idxs: list[int]


@dataclass
class RootGroup:
    """Torch-Pruning's group for one root, reduced to the layers that lose output channels."""

    items: list[OutItem]
    blocked_reason: str | None


def root_group(graph: Graph, module: nn.Module, idxs: list[int]) -> tuple[RootGroup, Any]:
    """The group that removing output channels `idxs` of `module` triggers, and Torch-Pruning's group."""
    dg = graph.dg
    pruner = dg.get_pruner_of_module(module)
    group = dg.get_pruning_group(module, pruner.prune_out_channels, idxs)
    items: list[OutItem] = []
    reason: str | None = None
    for item in group:
        dep = item.dep
        if not dg.is_out_channel_pruning_fn(dep.handler):
            continue
        target = dep.target.module
        if isinstance(target, tp.ops._OutputOp) or dep.target.grad_fn in graph.output_fns:
            reason = "its output channels are (coupled with) the model's output"
            continue
        if isinstance(target, _PASS_THROUGH):
            continue
        name = graph.names.get(target, repr(type(target).__name__))
        if not isinstance(target, MASKABLE):
            reason = reason or f"its channels are coupled with {name!r} ({type(target).__name__}), which is unsupported"
            continue
        if 1 < getattr(target, "groups", 1) < out_dim_size(target):
            reason = reason or f"it is coupled with the grouped convolution {name!r}"
            continue
        items.append(OutItem(name=name, idxs=list(item.idxs), root_idxs=list(item.root_idxs)))
    return RootGroup(items=items, blocked_reason=reason), group


@dataclass
class ChannelGroup:
    """Layers whose output channels are tied, with one shared channel numbering."""

    members: list[str]
    channels: int
    channel_index: dict[str, list[int]] = field(default_factory=dict)
    blocked_reason: str | None = None


def channel_groups(model: nn.Module, dummy_input: Any, timeout_s: float | None = None) -> list[ChannelGroup]:
    """All channel groups of `model` (no parametrizations), ordered by their first member.

    Raises `TraceTimeout` naming the step (building the graph, or the layer whose group it was walking) when
    it takes longer than `timeout_s` (see `trace_timeout_s`).
    """
    step = [f"tracing {type(model).__name__} into Torch-Pruning's dependency graph"]
    with time_limit(trace_timeout_s(timeout_s), lambda: step[0]):
        return _channel_groups(model, dummy_input, step)


def _channel_groups(model: nn.Module, dummy_input: Any, step: list[str]) -> list[ChannelGroup]:
    graph = build(model, dummy_input)
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    layers = [n for n, m in modules.items() if isinstance(m, MASKABLE) and m in graph.dg.module2node]
    offset: dict[str, int] = {}
    total = 0
    for n in layers:
        offset[n] = total
        total += out_dim_size(modules[n])

    src: list[Tensor] = []
    dst: list[Tensor] = []
    reasons: dict[str, str] = {}
    for n in layers:
        module = modules[n]
        if not isinstance(module, ROOTS):
            continue
        step[0] = f"walking the channel group of layer {n!r} ({type(module).__name__}) of {type(model).__name__}"
        rg, _ = root_group(graph, module, list(range(out_dim_size(module))))
        for it in rg.items:
            if it.name not in offset:
                continue
            src.append(torch.tensor(it.root_idxs, dtype=torch.long) + offset[n])
            dst.append(torch.tensor(it.idxs, dtype=torch.long) + offset[it.name])
        if rg.blocked_reason is not None:
            for it in rg.items:
                reasons.setdefault(it.name, rg.blocked_reason)
            reasons.setdefault(n, rg.blocked_reason)

    # Connected components over channels by min-label propagation (vectorised; converges in O(depth)).
    labels = torch.arange(total)
    if src:
        a, b = torch.cat(src), torch.cat(dst)
        while True:
            low = torch.minimum(labels[a], labels[b])
            new = labels.clone()
            new.scatter_reduce_(0, a, low, reduce="amin")
            new.scatter_reduce_(0, b, low, reduce="amin")
            new = new[new]  # pointer jumping speeds up long chains
            if torch.equal(new, labels):
                break
            labels = new

    # Layers sharing any channel component form one group.
    layer_of = torch.empty(total, dtype=torch.long)
    for i, n in enumerate(layers):
        layer_of[offset[n] : offset[n] + out_dim_size(modules[n])] = i
    parent = list(range(len(layers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_layer_of_label = layer_of[labels]  # the layer owning each channel's representative
    pairs = torch.stack([layer_of, first_layer_of_label], 1).unique(dim=0).tolist()  # per layer pair, not channel
    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    by_root: dict[int, list[str]] = {}
    for i, n in enumerate(layers):
        by_root.setdefault(find(i), []).append(n)
    groups: list[ChannelGroup] = []
    for members in by_root.values():
        members.sort(key=order.__getitem__)
        member_labels = {m: labels[offset[m] : offset[m] + out_dim_size(modules[m])] for m in members}
        classes = torch.unique(torch.cat(list(member_labels.values())))  # sorted
        channels = int(classes.numel())
        index: dict[str, list[int]] = {}
        for m, lab in member_labels.items():
            pos = torch.searchsorted(classes, lab)
            if pos.numel() != channels or not torch.equal(pos, torch.arange(channels)):
                index[m] = pos.tolist()
        reason = next((reasons[m] for m in members if m in reasons), None)
        groups.append(ChannelGroup(members=members, channels=channels, channel_index=index, blocked_reason=reason))
    groups.sort(key=lambda g: order[g.members[0]])
    return groups
