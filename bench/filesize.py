"""File size of the compact export against the dense file at 10–90% fine-grained sparsity, beside the TensorFlow
iterative-pruning reference's published sizes (12.49 MB dense; 21.86 MB at 10%, 12.23 MB at 50%, 2.61 MB at 90%).

Each model is pruned with ``level`` on every Conv2d and Linear weight; the dense file is the plain safetensors file
of the unpruned model; the compact file is ``pruning.export.save_compact`` of the pruned one (bitmask or index
layout per tensor, whichever is smaller). For context, the gzip'd dense-with-zeros file (what a generic compressor
does with sparsity) is measured too. Ratios are against the dense file of the same model.

    python -m bench.filesize [--quick]
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bench.common import main
from bench.models import MobileNetV2, ResNet18, randomise
from pruning.config import initial_distribution, resolve_config_list
from pruning.export import load_compact, save_compact, state_dict_for_export
from pruning.pruner import prune

# The TensorFlow iterative-pruning reference: sizes in MB as published.
TF_REFERENCE = {"dense_mb": 12.49, "sizes_mb": {0.1: 21.86, 0.5: 12.23, 0.9: 2.61}}


def _digits() -> torch.nn.Module:
    from examples.digits import DigitsCNN

    return DigitsCNN()


MODELS = {
    "digits CNN": (_digits, (1, 1, 8, 8)),
    "ResNet-18": (ResNet18, (1, 3, 224, 224)),
    "MobileNetV2": (MobileNetV2, (1, 3, 224, 224)),
}


def _sizes(state: dict[str, torch.Tensor], tmp: str, gzip: bool) -> tuple[int, int, int | None, bool]:
    dense_path, compact_path = os.path.join(tmp, "dense.safetensors"), os.path.join(tmp, "compact.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, dense_path)
    save_compact(state, compact_path)
    loaded = load_compact(compact_path)
    exact = all(torch.equal(loaded[k], v) for k, v in state.items())
    gz = len(zlib.compress(Path(dense_path).read_bytes(), 6)) if gzip else None
    return os.path.getsize(dense_path), os.path.getsize(compact_path), gz, exact


def run(quick: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    sparsities = (0.1, 0.5, 0.9) if quick else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    models = ("digits CNN", "ResNet-18") if quick else tuple(MODELS)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            make, shape = MODELS[name]
            dense = randomise(make())
            x = torch.zeros(shape)
            dense_state = state_dict_for_export(dense)
            dense_size, _, dense_gz, _ = _sizes(dense_state, tmp, gzip=not quick)
            rows = []
            for s in sparsities:
                model = copy.deepcopy(dense)
                problem = resolve_config_list(model, [{"sparsity": s, "op_types": ["default"]}], "level", x)
                prune(model, problem, initial_distribution(problem))
                state = state_dict_for_export(model)
                zeros_size, compact, gz, exact = _sizes(state, tmp, gzip=not quick)
                nonzero = sum(int(torch.count_nonzero(v)) for v in state.values() if v.is_floating_point())
                total = sum(v.numel() for v in state.values() if v.is_floating_point())
                rows.append(
                    {
                        "sparsity": s,
                        "overall_zero_fraction": 1 - nonzero / total,
                        "compact_bytes": compact,
                        "compact_ratio": compact / dense_size,
                        "dense_with_zeros_bytes": zeros_size,
                        "gzip_ratio": gz / dense_size if gz else None,
                        "roundtrip_exact": exact,
                        "tf_ratio": (TF_REFERENCE["sizes_mb"][s] / TF_REFERENCE["dense_mb"])
                        if s in TF_REFERENCE["sizes_mb"]
                        else None,
                    }
                )
            results.append(
                {
                    "model": name,
                    "dense_bytes": dense_size,
                    "dense_gzip_ratio": dense_gz / dense_size if dense_gz else None,
                    "rows": rows,
                }
            )
            print(_format(results[-1]), flush=True)
    return {
        "results": results,
        "tf_reference": {
            "dense_mb": TF_REFERENCE["dense_mb"],
            "sizes_mb": {str(k): v for k, v in TF_REFERENCE["sizes_mb"].items()},
        },
        "wall_s": time.perf_counter() - started,
    }


def _format(r: dict[str, Any]) -> str:
    lines = [f"\n{r['model']}: dense {r['dense_bytes'] / 1e6:.2f} MB"]
    for row in r["rows"]:
        tf = f"  TF reference x{row['tf_ratio']:.2f}" if row["tf_ratio"] else ""
        gz = f"  gzip x{row['gzip_ratio']:.2f}" if row["gzip_ratio"] else ""
        lines.append(
            f"  {row['sparsity']:>4.0%}  compact x{row['compact_ratio']:.3f}{gz}{tf}  exact={row['roundtrip_exact']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(run, __doc__)
