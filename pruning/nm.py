"""N:M semi-structured sparsity: in every group of M consecutive input weights of a Linear row, N are kept.

The mask is built from the base algorithm's element scores (``level``: |W|; ``wanda``: |W| x ||X_j||), group by
group along the input dimension, per output row. ``2:4`` (and ``1:4``, which is stricter) is the pattern NVIDIA's
sparse tensor cores run, and the layout ``torch.sparse.to_sparse_semi_structured`` takes: a dense, contiguous
2-D ``(out_features, in_features)`` tensor whose zeros follow the 2:4 pattern along each row, on CUDA, in
float16/bfloat16 (or float32/int8 with the CUTLASS backend), with both dimensions multiples of the backend's
minimum tile (16..64 rows, 16..128 columns, see ``_DTYPE_SHAPE_CONSTRAINTS`` in ``torch/sparse/semi_structured.py``).
``4:8`` has no PyTorch kernel: it is masked and exported the same way, and nothing is timed for it.

Timing (:func:`semi_structured_latency`): on CUDA with compute capability >= 8.0 a *timing copy* of the pruned model
(fp16, or the model's own bf16/fp16) is timed twice, first on the dense kernels and then with every kernel-eligible
weight replaced by its ``SparseSemiStructuredTensor``; the speed-up is the ratio of the two at the same dtype. fp32 is
not used for the sparse side: cuSPARSELt (the default backend) does not take it, and CUTLASS's fp32 path runs on
tensor cores while a dense fp32 GEMM (TF32 off, PyTorch's default) does not, so the ratio would not be the
sparsity's alone.

GPT-2's ``Conv1D`` stores its weight transposed, ``(in_features, out_features)``: its groups run along axis 0,
and the tensor to hand to the kernel is ``weight.t().contiguous()``.

This module imports nothing heavy at the top: the API validates patterns with :func:`parse_pattern`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "PATTERN_MS",
    "kernel_shape_ok",
    "nm_keep_mask",
    "parse_pattern",
    "pattern_text",
    "satisfies_pattern",
    "semi_structured_copy",
    "semi_structured_kernel",
    "semi_structured_latency",
    "semi_structured_why",
]

# M = 4 is the hardware pattern (2:4, and 1:4 which satisfies it); M = 8 (4:8 and the like) is the next
# pattern the literature studies (e.g. SparseGPT, Wanda report 4:8). Larger M is close to unstructured.
PATTERN_MS = (4, 8)
_PATTERN = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")
# The smallest (rows, columns) a weight needs for every backend in torch/sparse/semi_structured.py at fp16/bf16:
# CUTLASS asks for multiples of (32, 64), cuSPARSELt for (16, 16).
_KERNEL_MIN_SHAPE = (32, 64)


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ValueError saying what is wrong (N < M, M in :data:`PATTERN_MS`).

    >>> parse_pattern("2:4")
    (2, 4)
    """
    match = _PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if m not in PATTERN_MS:
        raise ValueError(f"pattern {text!r}: M must be one of {list(PATTERN_MS)}")
    if not n < m:
        raise ValueError(f"pattern {text!r}: N must be below M (N of every M weights are kept)")
    return n, m


def pattern_text(pattern: tuple[int, int]) -> str:
    """``(2, 4)`` -> ``"2:4"``."""
    return f"{pattern[0]}:{pattern[1]}"


def nm_keep_mask(scores: Tensor, pattern: tuple[int, int], input_axis: int = 1) -> Tensor:
    """Boolean keep-mask shaped like the 2-D `scores`: in every group of M consecutive entries along `input_axis`
    (per output row), the N highest scores survive. On ties the lower index is pruned first, as elsewhere."""
    import torch

    n, m = pattern
    if scores.dim() != 2:
        raise ValueError(f"N:M needs a 2-D weight, got shape {tuple(scores.shape)}")
    rows = scores if input_axis == 1 else scores.t()
    if rows.shape[1] % m:
        raise ValueError(f"N:M {n}:{m}: {rows.shape[1]} input features are not a multiple of {m}")
    grouped = torch.nan_to_num(rows.detach().double(), nan=float("-inf")).reshape(rows.shape[0], -1, m)
    # A stable ascending sort puts the M - N lowest (lower index first on ties) in front: those go.
    order = torch.sort(grouped, dim=-1, stable=True).indices
    keep = torch.ones_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], False)
    keep = keep.reshape(rows.shape)
    return keep if input_axis == 1 else keep.t().contiguous()


def satisfies_pattern(weight: Tensor, pattern: tuple[int, int], input_axis: int = 1) -> bool:
    """Whether every group of M consecutive input weights of every row holds at most N non-zeros."""
    n, m = pattern
    rows = weight if input_axis == 1 else weight.t()
    if rows.dim() != 2 or rows.shape[1] % m:
        return False
    nonzero = (rows.detach() != 0).reshape(rows.shape[0], -1, m).sum(dim=-1)
    return bool((nonzero <= n).all())


def semi_structured_why(pattern: tuple[int, int], out_features: int, in_features: int) -> str | None:
    """Why ``torch.sparse.to_sparse_semi_structured`` cannot take an N:M weight of this (kernel-orientation) shape,
    or ``None`` when it can: a 2:4-compatible pattern and a shape every backend's tile divides."""
    n, m = pattern
    if m != 4 or n > 2:
        return f"{n}:{m} is not 2:4-compatible (at most 2 of every 4); only 2:4 and 1:4 have a kernel"
    if not kernel_shape_ok(out_features, in_features):
        rows, cols = _KERNEL_MIN_SHAPE
        return f"weight ({out_features}, {in_features}) is not a multiple of the kernel tile ({rows}, {cols})"
    return None


def kernel_shape_ok(out_features: int, in_features: int) -> bool:
    """Whether a ``(out_features, in_features)`` fp16/bf16 weight meets every semi-structured backend's tile."""
    rows, cols = _KERNEL_MIN_SHAPE
    return out_features % rows == 0 and in_features % cols == 0


def semi_structured_kernel(device: Any) -> str | None:
    """Why the semi-structured kernel cannot run on `device`, or ``None`` when it can (CUDA, compute
    capability >= 8.0). Each N:M trial records it, so that it says why no speed-up was measured rather than
    fake one."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return f"device {dev.type!r} has no semi-structured sparse kernel (CUDA with compute capability >= 8.0 has)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 has no semi-structured sparse tensor cores"
    return None


def _kernel_dtype(model: Any) -> Any:
    import torch

    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype if tensor.dtype in (torch.float16, torch.bfloat16) else torch.float16
    return torch.float16


def _cast_copy(model: Any, device: Any, dtype: Any) -> Any:
    """A deep copy of `model` whose floating-point tensors are `dtype` on `device` (integer ones only moved). Only
    the copy's tensors are allocated: where nothing changes, the copy shares the tensor (nothing writes to it)."""
    import copy

    from torch import nn

    memo: dict[int, Any] = {}
    for param in model.parameters():
        moved = param.detach().to(device=device, dtype=dtype if param.is_floating_point() else None)
        memo[id(param)] = nn.Parameter(moved, requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to(device=device, dtype=dtype if buffer.is_floating_point() else None)
    return copy.deepcopy(model, memo)


def _sparse_backend() -> Any:
    # cuSPARSELt is what ``to_sparse_semi_structured`` picks unless ``_FORCE_CUTLASS``; without it, CUTLASS. The
    # class is chosen here rather than by flipping the process-wide ``_FORCE_CUTLASS`` flag.
    import torch
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    if torch.backends.cusparselt.is_available() and not SparseSemiStructuredTensorCUTLASS._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUSPARSELT
    return SparseSemiStructuredTensorCUTLASS


def semi_structured_copy(model: Any, layers: dict[str, dict[str, Any]], device: Any) -> tuple[Any, list[str]]:
    """Make `model` (a timing copy, see :func:`semi_structured_latency`; changed in place) run its eligible N:M
    layers on the semi-structured kernel: each layer of `layers` (:func:`pruning.jobs.pattern_layers`) marked
    ``semi_structured`` gets its weight as a ``SparseSemiStructuredTensor``; a GPT-2 ``Conv1D`` becomes the
    ``nn.Linear`` it computes, over its transposed weight. Returns the model and the names converted.

    Raises whatever torch raises for a weight it does not take (a CPU tensor, a dtype or shape the backend
    refuses); the caller falls back to the dense timing.
    """
    import warnings

    from torch import nn

    backend = _sparse_backend()
    converted: list[str] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemiStructuredTensor")
        for name, layer in layers.items():
            if not layer.get("semi_structured"):
                continue
            module = model.get_submodule(name)
            weight = module.weight.detach()
            # The kernel takes (out_features, in_features), contiguous; Conv1D stores the transpose.
            dense = (weight.t() if layer["input_axis"] == 0 else weight).contiguous()
            sparse = nn.Parameter(backend.from_dense(dense), requires_grad=False)
            if layer["input_axis"] == 0:
                linear = nn.Linear(dense.shape[1], dense.shape[0], bias=False, device="meta")
                linear.weight = sparse
                linear.bias = module.bias
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, linear)
            else:
                module.weight = sparse
            del dense, weight
            converted.append(name)
    return model, converted


def semi_structured_latency(
    model: Any, layers: dict[str, dict[str, Any]], dummy_input: Any, device: Any, repeat: int | None = None
) -> dict[str, Any]:
    """Dense and semi-structured latency of the pruned `model` on `device`, on one timing copy (`model` and its
    weights are not changed). The copy runs in fp16 (or the model's own bf16/fp16), the inputs' floating-point
    tensors cast to it; it is timed on the dense kernels, then its eligible layers are converted
    (:func:`semi_structured_copy`) and it is timed again, each time with :func:`pruning.projection.latency_stats`
    (CUDA synchronised before and after every pass). Call it where :func:`semi_structured_kernel` says the kernel
    runs.

    Returns ``{"device", "dtype", "backend", "layers": converted names, "synchronised", "dense_ms",
    "dense_spread_ms", "sparse_ms", "sparse_spread_ms", "speedup"}``. It never raises for the kernel: a step that
    fails (the copy, either timing, a conversion) leaves ``sparse_ms`` ``None`` and says which and why in
    ``"error"``, and the caller keeps the dense timing.
    """
    import torch

    from pruning.metrics import _resolved, to_device
    from pruning.projection import LATENCY_REPEAT, latency_stats

    dev = _resolved(device)
    dtype = _kernel_dtype(model)
    record: dict[str, Any] = {
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "backend": None,
        "layers": [],
        "synchronised": dev.type == "cuda",  # measure_latency_samples synchronises CUDA around every pass
        "dense_ms": None,
        "dense_spread_ms": None,
        "sparse_ms": None,
        "sparse_spread_ms": None,
        "speedup": None,
    }
    count = LATENCY_REPEAT if repeat is None else repeat
    stage = "copying the model"
    timing = None
    try:
        timing = _cast_copy(model, dev, dtype)
        inputs = to_device(dummy_input, dev, dtype)
        stage = f"timing the dense {record['dtype']} copy"
        record["dense_ms"], record["dense_spread_ms"] = latency_stats(timing, inputs, str(dev), count)
        stage = "converting to the semi-structured layout"
        record["backend"] = _sparse_backend().BACKEND
        timing, record["layers"] = semi_structured_copy(timing, layers, dev)
        if not record["layers"]:
            raise ValueError("no layer is marked semi_structured")
        stage = "timing the semi-structured copy"
        record["sparse_ms"], record["sparse_spread_ms"] = latency_stats(timing, inputs, str(dev), count)
        record["speedup"] = record["dense_ms"] / record["sparse_ms"] if record["sparse_ms"] else None
    except Exception as exc:  # noqa: BLE001 - a kernel that refuses fails the timing, never the trial
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        record["error"] = f"{stage}: {type(exc).__name__}: {detail[:300]}"
        record["sparse_ms"] = record["sparse_spread_ms"] = record["speedup"] = None
    finally:
        del timing
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the copy's blocks go back before the next trial measures memory or time
    return record
