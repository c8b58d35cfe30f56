"""CPU latency and export size of dense vs masked vs shrunk models at 30/50/70% filter sparsity.

Prints ratios against the dense model measured in the same run (never absolute claims across runs):
    python bench/pruning_latency.py [--repeat 20] [--threads N]
Models: a digits-like CNN (1x8x8 input) and a ResNet-18-shaped network with random weights (3x224x224).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruning.config import initial_distribution, resolve_config_list  # noqa: E402
from pruning.export import save_compact, state_dict_for_export  # noqa: E402
from pruning.metrics import count_params_flops, measure_latency  # noqa: E402
from pruning.pruner import prune  # noqa: E402
from pruning.shrink import shrink  # noqa: E402


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomise(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)  # type: ignore[union-attr]
    return model.eval()


def _file_size(state: dict[str, Tensor], compact: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        if compact:
            save_compact(state, path)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, path)
        return os.path.getsize(path)


def _interleaved(models: list[nn.Module], x: Tensor, repeat: int, rounds: int = 5) -> list[float]:
    """Latency of each model relative to models[0], measured in alternating rounds (median of the
    per-round ratios), so load from other processes drifting during the run hits all models alike."""
    ratios: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        times = [measure_latency(m, x, warmup=2, repeat=repeat) for m in models]
        for i, t in enumerate(times):
            ratios[i].append(t / times[0])
    return [statistics.median(r) for r in ratios]


def bench(name: str, make: type[nn.Module], x: Tensor, repeat: int) -> None:
    dense = _randomise(make())
    dense_latency = measure_latency(dense, x, warmup=3, repeat=repeat)
    dense_params, dense_flops = count_params_flops(dense, x)
    dense_file = _file_size(state_dict_for_export(dense), compact=False)
    print(
        f"\n{name}: dense {dense_params / 1e6:.2f} M params, {dense_flops / 1e6:.1f} M MACs, "
        f"{dense_latency * 1e3:.2f} ms, {dense_file / 1e6:.2f} MB"
    )
    print(
        f"{'sparsity':>8} {'masked lat':>10} {'shrunk lat':>10} {'params':>7} {'MACs':>7} "
        f"{'compact file':>12} {'shrunk file':>11} {'level file':>10}"
    )
    for sparsity in (0.3, 0.5, 0.7):
        model = copy.deepcopy(dense)
        problem = resolve_config_list(model, [{"sparsity": sparsity, "op_types": ["Conv2d"]}], "l1", x)
        masks = prune(model, problem, initial_distribution(problem))
        compact = _file_size(state_dict_for_export(model), compact=True)
        shrunk = copy.deepcopy(model)
        shrink(shrunk, masks, x)
        _, masked_ratio, shrunk_ratio = _interleaved([dense, model, shrunk], x, repeat)
        model = shrunk
        params, flops = count_params_flops(model, x)
        shrunk_file = _file_size(state_dict_for_export(model), compact=False)
        # fine-grained (level) export at the same sparsity over conv + linear weights
        fine = copy.deepcopy(dense)
        fine_problem = resolve_config_list(fine, [{"sparsity": sparsity, "op_types": ["default"]}], "level", x)
        prune(fine, fine_problem, initial_distribution(fine_problem))
        fine_file = _file_size(state_dict_for_export(fine), compact=True)
        print(
            f"{sparsity:>8.0%} {masked_ratio:>10.2f} {shrunk_ratio:>10.2f} "
            f"{params / dense_params:>7.2f} {flops / dense_flops:>7.2f} {compact / dense_file:>12.2f} "
            f"{shrunk_file / dense_file:>11.2f} {fine_file / dense_file:>10.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeat}; ratios vs dense")
    bench("digits CNN (1x1x8x8)", DigitsCNN, torch.randn(1, 1, 8, 8), args.repeat * 5)
    bench("ResNet-18 shaped (1x3x224x224)", ResNet18, torch.randn(1, 3, 224, 224), args.repeat)
    print(f"\n(ran in {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
