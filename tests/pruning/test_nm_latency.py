"""Timing N:M layers with the semi-structured kernel: which layers are eligible, what an N:M trial records where the
kernel cannot run (this CPU), the fallback when torch refuses the conversion, and that the stored model never changes.
The kernel itself needs CUDA with compute capability >= 8.0: ``bench/gpu_check.py`` times it there."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from pruning.config import resolve_config_list
from pruning.metrics import to_device
from pruning.task import Task
from tests.pruning.models import model_factory


class KernelSized(nn.Module):
    """Weights (out, in): fc1 (32, 64) meets every backend's tile, fc2 (64, 32) does not; fc3 and fc4 (64, 64) do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 64)
        self.fc3 = nn.Linear(64, 64, bias=False)
        self.fc4 = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc4(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


CONFIG = [
    {"pattern": "2:4", "op_names": ["fc1", "fc2"]},
    {"pattern": "4:8", "op_names": ["fc4"]},
]


def _task() -> Task:
    torch.manual_seed(0)
    model = model_factory(KernelSized, KernelSized().state_dict())
    inputs = [torch.randn(8, 64) for _ in range(2)]
    return Task(
        entrypoint="tests.nm_latency",
        model=model,
        evaluator=lambda net: float(net(inputs[0]).detach().sum()),
        dummy_input=lambda: inputs[0],
        calibration_data=lambda: iter(inputs),
    )


def _run(task: Task, config: list[dict[str, Any]], resource: str, tmp_path: Any) -> Any:
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import execute_job
    from pruning.search.base import Job, SearchProblem

    pruning = resolve_config_list(task.model(), config, "level", task.dummy_input())
    distribution = {u.name: u.pattern_sparsity for u in pruning.units}
    problem = SearchProblem(pruning=pruning, resource=resource)  # type: ignore[arg-type]
    job = Job(key="uniform-0", distribution=distribution, save_artifact=True)
    return execute_job(task, problem, job, ArtifactStore(tmp_path))


def test_pattern_layers_decide_the_kernel_per_layer() -> None:
    from pruning.jobs import pattern_layers

    task = _task()
    config = [*CONFIG, {"pattern": "1:4", "op_names": ["fc3"]}]
    pruning = resolve_config_list(task.model(), config, "level", task.dummy_input())
    layers = pattern_layers(pruning, {u.name: u.pattern_sparsity for u in pruning.units})
    assert {name: layer["semi_structured"] for name, layer in layers.items()} == {
        "fc1": True, "fc2": False, "fc3": True, "fc4": False,
    }
    assert "weight (64, 32) is not a multiple of the kernel tile (32, 64)" in layers["fc2"]["kernel_why"]
    assert "4:8 is not 2:4-compatible" in layers["fc4"]["kernel_why"]
    assert "kernel_why" not in layers["fc1"] and "kernel_why" not in layers["fc3"]
    # A dense (unpatterned) unit is not listed.
    assert set(pattern_layers(pruning, {"fc1": 0.5, "fc2": 0.0, "fc3": 0.0, "fc4": 0.0})) == {"fc1"}


def test_conv1d_eligibility_reads_its_transposed_shape() -> None:
    transformers = pytest.importorskip("transformers")
    from pruning.jobs import pattern_layers

    class Gpt2Like(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Conv1D(nf=out, nx=in) stores (in, out): a is (64, 32) -> kernel (32, 64), b is (32, 64) -> (64, 32).
            self.a = transformers.pytorch_utils.Conv1D(32, 64)
            self.b = transformers.pytorch_utils.Conv1D(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Gpt2Like()
    pruning = resolve_config_list(model, [{"pattern": "2:4", "op_names": ["a", "b"]}], "level", torch.zeros(2, 64))
    layers = pattern_layers(pruning, {"a": 0.5, "b": 0.5})
    assert layers["a"] == {"pattern": "2:4", "input_axis": 0, "semi_structured": True}
    assert layers["b"]["semi_structured"] is False and "(64, 32)" in layers["b"]["kernel_why"]


def test_cpu_trial_says_no_speedup_is_measured_and_why(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _run(_task(), CONFIG, "latency", tmp_path)
    assert result.status == "succeeded", result.error
    record = result.extra["nm"]
    assert record["speedup"].startswith("not measured: FLOPs and latency are of the dense kernels")
    assert "device 'cpu' has no semi-structured sparse kernel" in record["speedup"]
    assert "latency" not in record  # nothing was timed with the kernel
    assert result.latency_ms is not None and result.latency_ms > 0  # the dense timing the resource asked for


def test_fallback_when_torch_refuses_the_conversion(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The device decision is pure logic: pretend this CPU is a capable GPU. Everything after it is real, and torch
    # refuses to convert a CPU tensor, so the trial must fall back to the dense timing and say why.
    import pruning.nm

    monkeypatch.setattr(pruning.nm, "semi_structured_kernel", lambda device: None)
    task = _task()
    result = _run(task, CONFIG, "latency", tmp_path)
    assert result.status == "succeeded", result.error
    record = result.extra["nm"]
    timing = record["latency"]
    assert timing["sparse_ms"] is None and timing["speedup"] is None
    assert timing["error"].startswith("converting to the semi-structured layout: RuntimeError")
    assert "Only CUDA tensors are currently supported" in timing["error"]
    assert timing["dense_ms"] > 0 and timing["dtype"] == "float16" and timing["device"] == "cpu"
    assert record["speedup"].startswith("not measured") and "timing the semi-structured kernel failed" in record[
        "speedup"
    ]
    assert result.latency_ms == timing["model_dense_ms"]  # the trial keeps the model's own dense latency
    assert result.extra["latency_spread_ms"] is not None


def test_capable_device_without_latency_or_eligible_layers_says_why(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pruning.nm

    monkeypatch.setattr(pruning.nm, "semi_structured_kernel", lambda device: None)
    task = _task()
    params = _run(task, CONFIG, "params", tmp_path)
    assert "the experiment does not measure latency" in params.extra["nm"]["speedup"]
    assert params.latency_ms is None and "latency" not in params.extra["nm"]
    ineligible = _run(task, [{"pattern": "2:4", "op_names": ["fc2"]}], "latency", tmp_path)
    assert "no patterned layer takes the kernel" in ineligible.extra["nm"]["speedup"]


def test_timing_copy_leaves_the_model_unchanged() -> None:
    from pruning.jobs import pattern_layers
    from pruning.nm import semi_structured_latency

    task = _task()
    model = task.model()
    pruning = resolve_config_list(model, CONFIG, "level", task.dummy_input())
    layers = pattern_layers(pruning, {u.name: u.pattern_sparsity for u in pruning.units})
    before = {name: value.clone() for name, value in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    record = semi_structured_latency(model, layers, task.dummy_input(), "cpu", repeat=2)
    assert record["error"].startswith("converting")  # CPU: the conversion is refused, after the dense timing
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == torch.float32 and type(after[name]) is torch.Tensor
        assert torch.equal(after[name], value), name
    assert {name: p for name, p in model.named_parameters()} == params  # the same Parameter objects
    assert type(model.fc1) is nn.Linear and not isinstance(model.fc1.weight, torch.sparse.SparseSemiStructuredTensor)


class _IdentityBackend:
    """Stands in for torch's semi-structured class (which needs CUDA): ``from_dense`` hands back the dense tensor,
    so that what the copy computes can be compared with the original. Checks what torch's own class checks."""

    BACKEND = "identity"
    seen: list[tuple[int, int]] = []

    @classmethod
    def from_dense(cls, tensor: torch.Tensor) -> torch.Tensor:
        assert tensor.dim() == 2 and tensor.is_contiguous()
        cls.seen.append(tuple(tensor.shape))  # type: ignore[arg-type]
        return tensor


def test_semi_structured_copy_converts_linear_and_transposed_conv1d(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    import pruning.nm
    from pruning.nm import _cast_copy, semi_structured_copy

    monkeypatch.setattr(pruning.nm, "_sparse_backend", lambda: _IdentityBackend)
    _IdentityBackend.seen = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), transformers.pytorch_utils.Conv1D(64, 32), nn.Linear(64, 64))
    layers = {
        "0": {"pattern": "2:4", "input_axis": 1, "semi_structured": True},
        "1": {"pattern": "2:4", "input_axis": 0, "semi_structured": True},
        "2": {"pattern": "4:8", "input_axis": 1, "semi_structured": False},
    }
    x = torch.randn(3, 5, 64)
    expected = model(x)
    copy, converted = semi_structured_copy(_cast_copy(model, torch.device("cpu"), torch.float32), layers, "cpu")
    assert converted == ["0", "1"]
    assert _IdentityBackend.seen == [(32, 64), (64, 32)]  # (out_features, in_features) for both
    assert type(copy[1]) is nn.Linear and type(model[1]) is transformers.pytorch_utils.Conv1D
    assert torch.allclose(copy(x), expected, atol=1e-6)
    assert copy[2].weight is not model[2].weight and torch.equal(copy[2].weight, model[2].weight)


def test_to_device_casts_floats_only() -> None:
    ids, features = torch.tensor([[1, 2]]), torch.ones(1, 2)
    moved = to_device((ids, [features]), torch.device("cpu"), torch.float16)
    assert moved[0].dtype == torch.int64 and moved[1][0].dtype == torch.float16
    assert to_device(features, torch.device("cpu")).dtype == torch.float32
