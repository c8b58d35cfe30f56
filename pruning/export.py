"""Compact export of fine-grained sparsity: file size follows density, loads back bit-exactly.

Each tensor is stored in the smallest of three layouts, inside one safetensors file (no pickle):
- ``dense``: the tensor as is;
- ``bitmask``: one bit per entry (packed, MSB first) + the non-zero values in order;
- ``index``: int32 (int64 for huge tensors) flat positions of the non-zeros + their values.
"Zero" means all bits zero, so ``-0.0`` and NaN payloads survive bit-exactly. The layout of every
tensor (shape, dtype, layout) is a JSON document in the safetensors metadata.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["FORMAT", "load_compact", "save_compact", "state_dict_for_export"]

FORMAT = "prunehub-compact/1"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _nonzero_bits(flat: Tensor) -> Tensor:
    if flat.dtype == torch.bool:
        return flat
    view = _INT_VIEW.get(flat.element_size())
    if view is None or flat.is_complex():
        return flat != 0
    return flat.view(view) != 0


def _pack_bits(bits: Tensor) -> Tensor:
    pad = (-bits.numel()) % 8
    padded = torch.cat([bits.to(torch.uint8), torch.zeros(pad, dtype=torch.uint8)])
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, n: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()


def state_dict_for_export(model: torch.nn.Module) -> dict[str, Tensor]:
    """The state dict of `model` with masks folded in (a stripped copy), ready for `save_compact`."""
    from pruning._graph import plain_copy

    return {k: v.detach().cpu() for k, v in plain_copy(model).state_dict().items()}


def save_compact(state_dict: dict[str, Tensor], path: str | os.PathLike[str]) -> dict[str, str]:
    """Save `state_dict` compactly to `path` (safetensors); returns the layout chosen per tensor.

    Pass a plain state dict (masks folded in: see `state_dict_for_export`).
    """
    tensors: dict[str, Tensor] = {}
    header: dict[str, dict[str, Any]] = {}
    for name, value in state_dict.items():
        if "::" in name:
            raise ValueError(f"tensor name {name!r} contains '::', which the compact format reserves")
        t = value.detach().cpu().contiguous()
        flat = t.reshape(-1)
        n = flat.numel()
        size = t.element_size()
        bits = _nonzero_bits(flat)
        nnz = int(bits.sum())
        index_dtype = torch.int32 if n < 2**31 else torch.int64
        costs = {
            "dense": n * size,
            "bitmask": (n + 7) // 8 + nnz * size,
            "index": nnz * (size + (4 if index_dtype == torch.int32 else 8)),
        }
        layout = min(costs, key=lambda k: (costs[k], k != "dense"))  # ties keep the plain layout
        header[name] = {
            "layout": layout,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
        }
        if layout == "dense":
            tensors[name] = t.clone()
        elif layout == "bitmask":
            tensors[f"{name}::bits"] = _pack_bits(bits)
            tensors[f"{name}::values"] = flat[bits]
        else:
            tensors[f"{name}::index"] = torch.nonzero(bits).flatten().to(index_dtype)
            tensors[f"{name}::values"] = flat[bits]
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "layout": json.dumps(header)})
    return {k: v["layout"] for k, v in header.items()}


def load_compact(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a file written by `save_compact`; every tensor is bit-identical to the one saved."""
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        stored = {key: f.get_tensor(key) for key in f.keys()}
    header: dict[str, dict[str, Any]] = json.loads(metadata["layout"])
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        dtype = getattr(torch, info["dtype"])
        shape = tuple(info["shape"])
        n = math.prod(shape)
        if info["layout"] == "dense":
            out[name] = stored[name]
            continue
        flat = torch.zeros(n, dtype=dtype)
        values = stored[f"{name}::values"]
        if info["layout"] == "bitmask":
            flat[_unpack_bits(stored[f"{name}::bits"], n)] = values
        else:
            flat[stored[f"{name}::index"].long()] = values
        out[name] = flat.reshape(shape)
    return out
