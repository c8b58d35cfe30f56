"""Peak memory of resolving and shrinking a GPT-2-small-shaped model (issue 16, item 6).

    python -m bench.transformer_memory          # ~1 min; prints JSON and the markdown table

A random-init ``transformers.GPT2Model(GPT2Config())`` (124M parameters, 475 MiB of float32 weights) is built in
a fresh subprocess; its peak RSS is reset after construction (``/proc/self/clear_refs``), and after each step the
peak (``VmHWM``) above that baseline is read and written as a multiple of the weight bytes. The model itself is
one copy, so "at most two copies of the weights" means at most 1.0 above the baseline. Two flows, each in its own
process: resolve → compute_masks → shrink (what shrinking needs), and the same with the masks applied to the model
in between (a masked model, as a trial evaluates it, holds its masks as buffers shaped like the weights).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT

CONFIG = [{"sparsity": 0.5, "op_types": ["Conv1D"]}]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(apply: bool) -> dict[str, Any]:
    """Run one flow in this process and return its peaks (multiples of the weight bytes) and step times."""
    import torch
    import transformers

    from pruning.config import resolve_config_list
    from pruning.masks import apply_masks
    from pruning.pruner import compute_masks
    from pruning.shrink import shrink

    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config()).eval()
    x = torch.randint(0, 50257, (1, 16))
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux ≥ 4.0)
    base = _status("VmRSS")
    steps: list[dict[str, Any]] = []

    def step(name: str, started: float) -> None:
        steps.append(
            {
                "step": name,
                "seconds": time.perf_counter() - started,
                "peak_above_baseline_x_weights": (_status("VmHWM") - base) / weight_bytes,
            }
        )

    t = time.perf_counter()
    problem = resolve_config_list(model, CONFIG, "l1", x)
    step("resolve_config_list", t)
    t = time.perf_counter()
    masks = compute_masks(model, problem, {n: 0.5 for n in problem.unit_names()})
    step("compute_masks", t)
    if apply:
        t = time.perf_counter()
        apply_masks(model, masks, structured=True)
        step("apply_masks", t)
    t = time.perf_counter()
    shrink(model, masks, x)
    step("shrink", t)
    peak = max(s["peak_above_baseline_x_weights"] for s in steps)
    return {
        "flow": " → ".join(s["step"] for s in steps),
        "params": params,
        "weight_bytes": weight_bytes,
        "baseline_rss_bytes": base,
        "steps": steps,
        "peak_above_baseline_x_weights": peak,
        "peak_copies_of_weights": 1 + peak,
        "total_seconds": sum(s["seconds"] for s in steps),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Both flows, each in a fresh subprocess (so neither sees the other's peak)."""
    flows = []
    for apply in (False, True):
        out = subprocess.run(
            [sys.executable, "-m", "bench.transformer_memory", "--child", "apply" if apply else "plain"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        )
        flows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {"model": "transformers.GPT2Model(GPT2Config()), random init", "flows": flows}
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict[str, Any]) -> str:
    first = result["flows"][0]
    lines = [
        f"Model: {result['model']}, {first['params'] / 1e6:.1f}M parameters, "
        f"{first['weight_bytes'] / 2**20:.0f} MiB of weights; dummy input 1×16 tokens; "
        "config `[{\"sparsity\": 0.5, \"op_types\": [\"Conv1D\"]}]`, `l1`, every unit at 0.5.",
        "",
        "| flow | step | time (s) | peak RSS above the built model (× weights) |",
        "|---|---|---:|---:|",
    ]
    for flow in result["flows"]:
        for s in flow["steps"]:
            lines.append(
                f"| {flow['flow']} | {s['step']} | {s['seconds']:.2f} | {s['peak_above_baseline_x_weights']:.2f} |"
            )
        lines.append(
            f"| **{flow['flow']}** | **whole flow** | **{flow['total_seconds']:.2f}** | "
            f"**{flow['peak_above_baseline_x_weights']:.2f} (= {flow['peak_copies_of_weights']:.2f} copies)** |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(apply=sys.argv[2] == "apply")))
    else:
        res = run()
        print(json.dumps({k: v for k, v in res.items() if k != "markdown"}, indent=1))
        print(res["markdown"])
