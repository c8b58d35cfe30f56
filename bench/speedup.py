"""Real speed-up: CPU latency of dense vs masked vs physically shrunk models, as ratios measured in one run.

Models (random weights; timing does not depend on them): the digits CNN (``examples.digits``, 1x8x8), a
ResNet-18-shaped and a MobileNetV2-shaped network (``bench/models.py``; 3x224x224 at batch 1, and batch 64 at the
resolution in ``--b64-res``: 112 in the full run, 64 with ``--quick``; at 224 one dense ResNet-18 pass of batch 64
takes 3.5 s on this machine). Variants at 30/50/70% sparsity:

* filter (structured, l1 on every Conv2d): *masked* (full-shape weights, zeroed channels, prunehub's masks) and
  *shrunk* (channels physically removed by ``pruning.shrink``);
* fine-grained (``level`` on Conv2d + Linear): *masked* (parametrized) and *stripped* (zeros folded into dense
  weights) — dense kernels do the same work on zeros, so there is no speed-up to expect.

Every variant of one model and batch is timed right after the dense model, pairs in rotating order, over several
rounds; each latency is the fastest of a few passes (load from other processes only adds time); a ratio is the
median over rounds of (variant latency / the dense latency just before it).

    python -m bench.speedup [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import interleaved, loadavg
from bench.models import MobileNetV2, ResNet18, randomise
from pruning.config import initial_distribution, resolve_config_list
from pruning.masks import strip
from pruning.metrics import count_nonzero, count_params_flops
from pruning.pruner import prune
from pruning.shrink import shrink


def _digits() -> nn.Module:
    from examples.digits import DigitsCNN

    return DigitsCNN()


MODELS = {
    "digits CNN": (_digits, (1, 8, 8), (1, 8, 8)),
    "ResNet-18": (ResNet18, (3, 224, 224), None),
    "MobileNetV2": (MobileNetV2, (3, 224, 224), None),
}


def _variants(dense: nn.Module, x: torch.Tensor, sparsities: tuple[float, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"kind": "dense", "sparsity": 0.0, "model": dense}]
    for s in sparsities:
        masked = copy.deepcopy(dense)
        problem = resolve_config_list(masked, [{"sparsity": s, "op_types": ["Conv2d"]}], "l1", x)
        masks = prune(masked, problem, initial_distribution(problem))
        shrunk = copy.deepcopy(masked)
        shrink(shrunk, masks, x)
        out.append({"kind": "filter masked", "sparsity": s, "model": masked})
        out.append({"kind": "filter shrunk", "sparsity": s, "model": shrunk.eval()})
    for s in sparsities:
        fine = copy.deepcopy(dense)
        problem = resolve_config_list(fine, [{"sparsity": s, "op_types": ["default"]}], "level", x)
        prune(fine, problem, initial_distribution(problem))
        stripped = strip(copy.deepcopy(fine))
        out.append({"kind": "level masked", "sparsity": s, "model": fine})
        out.append({"kind": "level stripped", "sparsity": s, "model": stripped.eval()})
    return out


def _min_latency(model: nn.Module, x: torch.Tensor, repeat: int) -> float:
    """Fastest of `repeat` timed forward passes after one untimed one: load from other processes only ever adds
    time, so the minimum is the least disturbed measurement (timeit's rule)."""
    model.eval()
    with torch.inference_mode():
        model(x)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return best


def bench_model(
    name: str, batch: int, shape: tuple[int, ...], sparsities: tuple[float, ...], rounds: int, repeat: int
) -> dict[str, Any]:
    make = MODELS[name][0]
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    dense = randomise(make())
    dense_params, dense_flops = count_params_flops(dense, x[:1])
    variants = _variants(dense, x[:1], sparsities)
    for v in variants:  # one untimed pass each at the real batch (allocator warm-up)
        with torch.inference_mode():
            v["model"](x)
    load_before = loadavg()
    # Paired: every variant is timed right after the dense model, in rotating order, so each ratio compares two
    # measurements seconds apart (load from other processes drifts over a round of big models).
    dense_model = variants[0]["model"]
    fns = [
        lambda m=v["model"]: (_min_latency(dense_model, x, repeat), _min_latency(m, x, repeat)) for v in variants[1:]
    ]
    pairs = interleaved(fns, rounds)  # type: ignore[arg-type]
    dense_times = [d for per_variant in pairs for d, _ in per_variant]
    times = [dense_times] + [[t for _, t in per_variant] for per_variant in pairs]
    ratio_lists = [[1.0] * len(dense_times)] + [[t / d for d, t in per_variant] for per_variant in pairs]
    rows = []
    for v, t, ratios in zip(variants, times, ratio_lists, strict=True):
        model = v["model"]
        if v["kind"] == "filter shrunk":
            params, flops = count_params_flops(model, x[:1])
        else:
            _, flops = count_params_flops(model, x[:1])
            params = count_nonzero(model) if v["kind"] != "dense" else dense_params
        rows.append(
            {
                "kind": v["kind"],
                "sparsity": v["sparsity"],
                "latency_ms": statistics.median(t) * 1e3,
                "latency_ratio": statistics.median(ratios),
                "latency_ratio_min": min(ratios),
                "latency_ratio_max": max(ratios),
                "speedup": 1 / statistics.median(ratios),
                "flops_ratio": flops / dense_flops,
                "params_ratio": params / dense_params,
            }
        )
    return {
        "model": name,
        "batch": batch,
        "input": list(shape),
        "dense_params": dense_params,
        "dense_macs": dense_flops,
        "rounds": rounds,
        "repeat": repeat,
        "loadavg": [load_before, loadavg()],
        "rows": rows,
    }


def run(quick: bool = False, b64_res: int | None = None, threads: int | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sparsities = (0.5,) if quick else (0.3, 0.5, 0.7)
    res64 = b64_res or (64 if quick else 112)
    rounds = 3 if quick else 5
    results = []
    for name, (_, shape1, shape64) in MODELS.items():
        big = name != "digits CNN"
        results.append(bench_model(name, 1, shape1, sparsities, rounds + 2, 5 if big else 30))
        print(_format(results[-1]), flush=True)
        shape = shape64 or (shape1[0], res64, res64)
        results.append(bench_model(name, 64, shape, sparsities, 3 if big else rounds, 1 if big else 10))
        print(_format(results[-1]), flush=True)
    used = torch.get_num_threads()
    torch.set_num_threads(previous_threads)
    return {"results": results, "threads": used, "wall_s": time.perf_counter() - started}


def _format(r: dict[str, Any]) -> str:
    lines = [
        f"\n{r['model']} batch {r['batch']} input {r['input']}: dense {r['dense_params'] / 1e6:.2f} M params, "
        f"{r['dense_macs'] / 1e6:.1f} M MACs/sample"
    ]
    for row in r["rows"]:
        lines.append(
            f"  {row['kind']:<15} {row['sparsity']:>4.0%}  latency x{row['latency_ratio']:.2f} "
            f"({row['latency_ms']:.2f} ms)  speed-up {row['speedup']:.2f}  FLOPs x{row['flops_ratio']:.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--b64-res", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args.quick, args.b64_res, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
