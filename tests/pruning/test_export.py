"""Compact export: bit-exact round trip; size follows density."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pruning.config import resolve_config_list
from pruning.export import load_compact, save_compact, state_dict_for_export
from pruning.pruner import prune


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 128)
    )


def _sparse_state(sparsity: float) -> dict[str, torch.Tensor]:
    model = _model()
    x = torch.randn(1, 3, 8, 8)
    problem = resolve_config_list(model, [{"sparsity": sparsity, "op_types": ["default"]}], "level", x)
    prune(model, problem, {n: sparsity for n in problem.unit_names()})
    return state_dict_for_export(model)


def _assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_round_trip_is_bit_exact_for_awkward_values(tmp_path: Path) -> None:
    weird = torch.zeros(1000)
    weird[:5] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-45, -3.5])
    state = {
        "weird": weird,
        "half": torch.tensor([0.0, -0.0, 1.5, 0.0], dtype=torch.float16),
        "bf16": torch.randn(64, dtype=torch.bfloat16),
        "steps": torch.tensor(7),
        "ints": torch.tensor([[0, 3], [0, 0]], dtype=torch.int64),
        "flags": torch.tensor([True, False, False]),
        "empty": torch.zeros(0, 3),
    }
    layouts = save_compact(state, tmp_path / "w.safetensors")
    assert layouts["weird"] == "index" and layouts["bf16"] == "dense"
    _assert_bit_exact(state, load_compact(tmp_path / "w.safetensors"))


@pytest.mark.parametrize(("sparsity", "bound"), [(0.1, 1.0), (0.5, 0.6), (0.9, 0.15)])
def test_file_size_follows_density(tmp_path: Path, sparsity: float, bound: float) -> None:
    state = _sparse_state(sparsity)
    dense_path, compact_path = tmp_path / "dense.safetensors", tmp_path / "compact.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(dense_path))
    layouts = save_compact(state, compact_path)
    ratio = compact_path.stat().st_size / dense_path.stat().st_size
    assert ratio <= bound, (ratio, layouts)
    _assert_bit_exact(state, load_compact(compact_path))


def test_rejects_foreign_files(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a"):
        load_compact(tmp_path / "plain.safetensors")
