"""Model size and speed: parameters, FLOPs (MACs) per layer and in total, non-zeros, latency."""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from pruning._graph import plain_copy, run_model
from pruning.importance.base import is_conv1d_transposed

__all__ = [
    "SMALL_FORWARD_MACS",
    "bookkeeping_threads",
    "count_nonzero",
    "count_params_flops",
    "layer_stats",
    "measure_latency",
    "measure_latency_samples",
    "to_device",
]


SMALL_FORWARD_MACS = 10_000_000
"""Below this many MACs per dummy forward, :func:`bookkeeping_threads` runs our passes over the model on one thread."""


@contextlib.contextmanager
def bookkeeping_threads(dense_macs: int | None) -> Iterator[None]:
    """One intra-op thread inside the block when the model's dummy forward is small (``dense_macs`` below
    :data:`SMALL_FORWARD_MACS`), for our own passes over it: tracing it to shrink it, counting its FLOPs.

    Such a forward takes well under a millisecond per op on one core, so a second thread can gain little, and each
    op's parallel region waits until every thread of the pool is scheduled: on a loaded machine that wait is
    milliseconds per op (measured on the two shared cores here, a 4x4-input conv: 0.02 ms mean on one thread,
    1.5 ms on two), and a no-op trial's two passes cost 25-50 ms instead of 9. Their outputs are discarded and
    what they yield (channel indices, counts) does not depend on the thread count. Never around a latency
    measurement or the user's code, which run with the process's threads; outside the block nothing changes.
    """
    threads = torch.get_num_threads()
    if dense_macs is None or dense_macs >= SMALL_FORWARD_MACS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _plain(model: nn.Module) -> nn.Module:
    # Torch-Pruning's counter keys on module types; masked (parametrized) modules are counted on a stripped copy.
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        return plain_copy(model)
    return model


def _shell(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree that shares every parameter and buffer with it (no tensor is copied)."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _count(model: nn.Module, inputs: Any, layer_wise: bool) -> Any:
    # Torch-Pruning's `count_ops_and_params`, run on a shell copy: it deep-copies the model itself (its hooks and
    # counters must not stay on the caller's modules), which for a 124M-parameter GPT-2 is a whole second copy of
    # the weights. The shell carries the hooks and counters instead and shares the tensors.
    from torch_pruning.utils import op_counter

    # Its counter keys hooks on exact types and treats unknown ones as zero-ops; Hugging Face's Conv1D (GPT-2)
    # computes exactly what a Linear does, so it is counted with the Linear hook (the mapping is per call).
    for module in model.modules():
        if is_conv1d_transposed(module):
            op_counter.CUSTOM_MODULES_MAPPING[type(module)] = op_counter.linear_flops_counter_hook
    shell = _shell(model)
    counting = op_counter.add_flops_counting_methods(shell)
    counting.eval()
    counting.start_flops_count(ost=sys.stdout, verbose=False, ignore_list=[])
    try:
        if isinstance(inputs, dict):
            counting(**inputs)
        else:
            run_model(counting, inputs)
        macs, params, shell_flops, shell_params = counting.compute_average_flops_cost()
    finally:
        counting.stop_flops_count()
        op_counter.CUSTOM_MODULES_MAPPING = {}
    if not layer_wise:
        return macs, params
    pairs = list(zip(model.modules(), shell.modules(), strict=True))
    return (
        macs,
        params,
        {ours: shell_flops.get(theirs) for ours, theirs in pairs},
        {ours: shell_params.get(theirs) for ours, theirs in pairs},
    )


def _as_inputs(dummy_input: Any) -> Any:
    # count_ops_and_params unpacks tuples/lists itself, the same rule as run_model.
    return list(dummy_input) if isinstance(dummy_input, tuple) else dummy_input


def count_params_flops(model: nn.Module, dummy_input: Any) -> tuple[int, int]:
    """Total parameters and MACs of `model` on `dummy_input` (Torch-Pruning's counter).

    Masked weights count as dense here: use `count_nonzero` for the sparse view.
    """
    was_training = model.training
    with torch.no_grad():
        macs, params = _count(_plain(model), _as_inputs(dummy_input), False)
    model.train(was_training)
    return int(params), int(macs)


def layer_stats(model: nn.Module, dummy_input: Any) -> dict[str, tuple[int, int]]:
    """Per-layer ``(params, MACs)`` for every leaf module that has parameters or does arithmetic."""
    work = _plain(model)
    was_training = model.training
    with torch.no_grad():
        _, _, flops, params = _count(work, _as_inputs(dummy_input), True)
    model.train(was_training)
    out: dict[str, tuple[int, int]] = {}
    for name, module in work.named_modules():
        if name == "" or any(True for _ in module.children()):
            continue
        p = params.get(module) or 0
        f = flops.get(module) or 0
        if p or f:
            out[name] = (int(p), int(f))
    return out


def count_nonzero(model: nn.Module) -> int:
    """Non-zero parameter entries, as the model computes with them (masks applied)."""
    work = _plain(model)
    return int(sum(int(torch.count_nonzero(p.detach())) for p in work.parameters()))


def to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``value`` (a tensor, or a tuple/list of them, nested) moved to ``device``, its floating-point tensors cast
    to ``dtype`` when given (token ids stay integers); anything else as is."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, dtype) for v in value)
    return value


def _resolved(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def _move(model: nn.Module, dev: torch.device) -> None:
    # Only when something is elsewhere: a semi-structured sparse weight (pruning.nm) refuses ``.to`` to any device
    # but the CPU, even its own.
    tensors = (*model.parameters(), *model.buffers())
    if any(t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index) for t in tensors):
        model.to(dev)


def measure_latency(
    model: nn.Module,
    dummy_input: Any,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    repeat: int = 10,
) -> float:
    """Median wall-clock seconds of one forward pass on `device` (see `measure_latency_samples`)."""
    return statistics.median(measure_latency_samples(model, dummy_input, device, warmup, repeat))


def measure_latency_samples(
    model: nn.Module,
    dummy_input: Any,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    repeat: int = 10,
) -> list[float]:
    """Wall-clock seconds of `repeat` forward passes on `device`, one sample each.

    Runs `warmup` untimed passes, then `repeat` timed ones under `torch.inference_mode`, synchronising
    CUDA before and after each pass so queued kernels are counted. The model is moved to `device` (when it is
    not there already) and put in eval mode (its previous mode is restored).
    """
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    dev = _resolved(device)
    _move(model, dev)
    inputs = to_device(dummy_input, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                run_model(model, inputs)
            sync()
            for _ in range(repeat):
                start = time.perf_counter()
                run_model(model, inputs)
                sync()
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return times
